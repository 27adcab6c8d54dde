"""Measurements behind docs/results-methods.md: deep vs plain prompts, ensembles, multi-task, prompt transfer.

    python -m bench.methods [--exp deep-minilm deep-smollm ensemble multitask transfer] [--out runs/methods]
                            [--results bench/results/methods.jsonl]

Small CPU-sized runs (minilm-l6 for most, two short smollm2-135m runs). Each finished run is appended to
bench/results/methods.jsonl (--results; committed, so a new machine resumes the study) and skipped when the script is
run again, so an interrupted session resumes; the prompts, data samples and other run files go to --out. Data:
fixed-seed samples of ../shared/data (never copied into the repository); skips with a reason when it is absent.
"""

from __future__ import annotations

import argparse
import csv
import random
import sys
import time
from pathlib import Path
from typing import Any

from bench._common import ResultLog

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"
EXAMPLES = ROOT / "examples" / "data"
RESULTS = ROOT / "bench" / "results" / "methods.jsonl"  # one JSON object per finished run


def write_tsv(rows: list[list[str]], header: list[str], dst: Path) -> str:
    with open(dst, "w", encoding="utf-8") as f:
        f.writelines("\t".join(r) + "\n" for r in [header, *rows])
    return str(dst)


def read_tsv(src: Path) -> list[list[str]]:
    with open(src, encoding="utf-8") as f:
        return [r for r in csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE) if r]


def data(tmp: Path) -> dict[str, dict[str, str]]:
    """Train/eval files: SST-2 (2,000 train sample, full dev), AG News (2,000 train / 500 held out), RTE (the
    2,240 train rows, the 277 validation rows), tickets."""
    sst = read_tsv(SHARED / "sst2" / "train.tsv")[1:]
    random.Random(0).shuffle(sst)
    ag = read_tsv(SHARED / "agnews" / "train10k.tsv")
    random.Random(0).shuffle(ag)
    return {
        "sst2": {
            "train": write_tsv(sst[:2000], ["sentence", "label"], tmp / "sst2_train.tsv"),
            "eval": str(SHARED / "sst2" / "dev.tsv"),
            "labels": "0=negative,1=positive",
        },
        "agnews": {
            "train": write_tsv(ag[:2000], ["text", "label"], tmp / "ag_train.tsv"),
            "eval": write_tsv(ag[2000:2500], ["text", "label"], tmp / "ag_eval.tsv"),
            "labels": "Business=business,Sci/Tech=technology,Sports=sports,World=world",
        },
        "rte": {
            "train": str(SHARED / "rte" / "train.jsonl"),
            "eval": str(SHARED / "rte" / "val.jsonl"),
            "labels": "entailment=true,not_entailment=false",
        },
        "tickets": {
            "train": str(EXAMPLES / "train.jsonl"),
            "eval": str(EXAMPLES / "test.jsonl"),
            "labels": "account=account,billing=billing,shipping=shipping,technical=technical",
        },
    }


class Runner:
    def __init__(self, out: Path, results: Path) -> None:
        self.out = out
        self.log = ResultLog(results)
        self.done = self.log.done
        self.backbones: dict[str, Any] = {}

    def backbone(self, name: str):
        from softprompt import load_backbone

        if name not in self.backbones:
            self.backbones[name] = load_backbone(name, progress=False)
        return self.backbones[name]

    def record(self, r: dict[str, Any]) -> dict[str, Any]:
        return self.log.record(r, hide=("curve",))

    def train(self, name: str, model: str, task: dict[str, str], **opts: Any) -> dict[str, Any]:
        """One `softprompt train` run (Python API); options are RunConfig fields by their flag names."""
        if name in self.done:
            return self.done[name]
        from softprompt import RunConfig, train
        from softprompt.config import apply_options

        cfg = RunConfig()
        cfg.model.model = model
        cfg.data.train, cfg.data.eval, cfg.data.labels = task["train"], task["eval"], task["labels"]
        cfg.train.out = str(self.out / f"{name}.safetensors")
        cfg.train.progress = False
        apply_options(cfg, opts, name)
        t0 = time.time()
        res = train(cfg, backbone=self.backbone(model), log=lambda s: print(s, file=sys.stderr))
        curve = [(h["step"], h.get(f"eval_{cfg.train.metric}")) for h in res.history if f"eval_{cfg.train.metric}" in h]
        return self.record(
            {
                "name": name,
                "model": model,
                "opts": opts,
                "accuracy": res.metrics.get("accuracy"),
                "best_step": res.best_step,
                "steps": res.steps,
                "curve": curve,
                "out": res.out,
                "wall_s": round(time.time() - t0, 1),
            }
        )

    def evaluate(self, name: str, prompts: list[str], data_path: str, combine: str = "mean") -> dict[str, Any]:
        if name in self.done:
            return self.done[name]
        from softprompt import Predictor

        pred = Predictor.load(prompts, combine=combine)
        t0 = time.time()
        m = pred.evaluate(data_path)
        return self.record(
            {
                "name": name,
                "prompts": prompts,
                "combine": combine,
                "accuracy": m["accuracy"],
                "macro_f1": m["macro_f1"],
                "wall_s": round(time.time() - t0, 1),
            }
        )


MINILM = {"num_tokens": 10, "max_steps": 150, "batch_size": 16, "eval_every": 75, "warmup_steps": 10}


def exp_deep_minilm(r: Runner, d: dict) -> None:
    for head in ("linear", "similarity"):
        for method in ("prompt", "deep"):
            r.train(
                f"sst2-minilm-{head}-{method}",
                "minilm-l6",
                d["sst2"],
                template="{sentence}",
                head=head,
                method=method,
                **MINILM,
            )


def exp_deep_seeds(r: Runner, d: dict) -> None:
    """Deep vs plain over three seeds (minilm-l6, similarity head), and the no-prompt baseline."""
    for seed in (1, 2):
        r.train(
            f"sst2-minilm-similarity-deep-seed{seed}",
            "minilm-l6",
            d["sst2"],
            template="{sentence}",
            head="similarity",
            method="deep",
            seed=seed,
            **MINILM,
        )
    name = "sst2-minilm-similarity-none"
    if name not in r.done:  # zero-shot: an empty prompt with the same task metadata
        from softprompt.checkpoint import load_prompt, save_prompt

        src = load_prompt(r.out / "sst2-minilm-similarity-prompt.safetensors")
        empty = r.out / f"{name}.safetensors"
        save_prompt(empty, src.prompt[:0], {**src.meta, "metrics": None}, {})
        r.evaluate(name, [str(empty)], d["sst2"]["eval"])


def exp_deep_smollm(r: Runner, d: dict) -> None:
    for method in ("prompt", "deep"):
        r.train(
            f"sst2-smollm-{method}",
            "smollm2-135m",
            d["sst2"],
            template="Review: {sentence}\nSentiment:",
            method=method,
            num_tokens=10,
            max_steps=60,
            batch_size=8,
            warmup_steps=5,
            eval_max=200,
        )


def exp_smollm_full_dev(r: Runner, d: dict) -> None:
    """The two smollm2 prompts (and no prompt) on the full SST-2 dev set (872), not only the 200 seen in training."""
    for method in ("prompt", "deep"):
        r.evaluate(
            f"sst2-smollm-{method}-dev872", [str(r.out / f"sst2-smollm-{method}.safetensors")], d["sst2"]["eval"]
        )
    name = "sst2-smollm-none-dev872"
    if name not in r.done:
        from softprompt.checkpoint import load_prompt, save_prompt

        src = load_prompt(r.out / "sst2-smollm-prompt.safetensors")
        empty = r.out / "sst2-smollm-none.safetensors"
        save_prompt(empty, src.prompt[:0], {**src.meta, "metrics": None}, {})
        r.evaluate(name, [str(empty)], d["sst2"]["eval"])


def exp_ensemble(r: Runner, d: dict) -> None:
    names = []
    for seed in (0, 1, 2):
        name = "sst2-minilm-similarity-prompt" if seed == 0 else f"sst2-minilm-similarity-prompt-seed{seed}"
        r.train(
            name, "minilm-l6", d["sst2"], template="{sentence}", head="similarity", method="prompt", seed=seed, **MINILM
        )
        names.append(str(r.out / f"{name}.safetensors"))
    for combine in ("mean", "vote"):
        r.evaluate(f"sst2-minilm-similarity-ensemble3-{combine}", names, d["sst2"]["eval"], combine)


def exp_multitask(r: Runner, d: dict) -> None:
    r.train(
        "agnews-minilm-linear-prompt",
        "minilm-l6",
        d["agnews"],
        template="{text}",
        head="linear",
        method="prompt",
        **MINILM,
    )
    name = "multi-minilm-sst2-agnews"
    if name in r.done:
        return
    from softprompt.multitask import parse_multi_config, train_multi

    raw = {
        "model": "minilm-l6",
        "shared_tokens": 5,
        "num_tokens": 5,
        "max_steps": 300,
        "batch_size": 16,
        "eval_every": 150,
        "warmup_steps": 10,
        "head": "linear",
        "progress": False,
        "out": str(r.out / name),
        "tasks": [
            {"name": "sst2", "template": "{sentence}", **d["sst2"]},
            {"name": "agnews", "template": "{text}", **d["agnews"]},
        ],
    }
    mc = parse_multi_config(raw, name)
    t0 = time.time()
    res = train_multi(mc, backbone=r.backbone("minilm-l6"), log=lambda s: print(s, file=sys.stderr))
    r.record(
        {
            "name": name,
            "exports": res.exports,
            "best_step": res.best_step,
            "steps": res.steps,
            "accuracy": {k: m.get("accuracy") for k, m in res.metrics.items()},
            "curve": [
                {k: v for k, v in h.items() if k.endswith("accuracy") or k == "step"}
                for h in res.history
                if any(k.endswith("accuracy") for k in h)
            ],
            "wall_s": round(time.time() - t0, 1),
        }
    )
    for task in ("sst2", "agnews"):  # the exported files, served alone
        r.evaluate(f"multi-export-{task}", [res.exports[task]], d[task]["eval"])


def exp_transfer(r: Runner, d: dict) -> None:
    from softprompt.transfer import similarity

    tickets = dict(d["tickets"])
    base = {
        "template": "{text}",
        "head": "linear",
        "method": "prompt",
        "num_tokens": 10,
        "batch_size": 16,
        "warmup_steps": 5,
    }
    probe = r.train("tickets-minilm-probe", "minilm-l6", tickets, max_steps=20, **base)
    sources = {
        "sst2": str(r.out / "sst2-minilm-linear-prompt.safetensors"),
        "agnews": str(r.out / "agnews-minilm-linear-prompt.safetensors"),
        "multi-sst2": str(r.out / "multi-minilm-sst2-agnews" / "sst2.safetensors"),
        "multi-agnews": str(r.out / "multi-minilm-sst2-agnews" / "agnews.safetensors"),
    }
    sources = {k: v for k, v in sources.items() if Path(v).exists()}
    if "similarity-tickets" not in r.done:
        ranks = similarity(list(sources.values()), probe["out"])
        r.record(
            {
                "name": "similarity-tickets",
                "ranking": [{k: x[k] for k in ("source", "mean_cosine", "flat_cosine", "rank")} for x in ranks],
            }
        )
    for label, init in [("vocab", "vocab"), ("labels", "labels"), *[(k, f"file:{v}") for k, v in sources.items()]]:
        r.train(f"tickets-minilm-from-{label}", "minilm-l6", tickets, max_steps=100, eval_every=10, init=init, **base)


def exp_transfer_agnews(r: Runner, d: dict) -> None:
    """SPoT on a harder target: AG News with the similarity head (no trained head: the prompt does the work)."""
    from softprompt.transfer import similarity

    base = {
        "template": "{text}",
        "head": "similarity",
        "method": "prompt",
        "num_tokens": 10,
        "batch_size": 16,
        "warmup_steps": 5,
    }
    probe = r.train("agnews-sim-probe", "minilm-l6", d["agnews"], max_steps=20, **base)
    sources = {
        "sst2-sim": str(r.out / "sst2-minilm-similarity-prompt.safetensors"),
        "tickets": str(r.out / "tickets-minilm-from-vocab.safetensors"),
        "multi-sst2": str(r.out / "multi-minilm-sst2-agnews" / "sst2.safetensors"),
    }
    if "similarity-agnews" not in r.done:
        ranks = similarity(list(sources.values()), probe["out"])
        r.record(
            {
                "name": "similarity-agnews",
                "ranking": [{k: x[k] for k in ("source", "mean_cosine", "flat_cosine", "rank")} for x in ranks],
            }
        )
    ranking = [x["source"] for x in r.done["similarity-agnews"]["ranking"]]
    label = {v: k for k, v in sources.items()}
    for name, init in [
        ("vocab", "vocab"),
        ("labels", "labels"),
        (label[ranking[0]], f"file:{ranking[0]}"),
        (label[ranking[-1]], f"file:{ranking[-1]}"),
    ]:
        r.train(f"agnews-sim-from-{name}", "minilm-l6", d["agnews"], max_steps=100, eval_every=25, init=init, **base)


EXPERIMENTS = {
    "deep-minilm": exp_deep_minilm,
    "deep-seeds": exp_deep_seeds,
    "deep-smollm": exp_deep_smollm,
    "smollm-dev": exp_smollm_full_dev,
    "ensemble": exp_ensemble,
    "multitask": exp_multitask,
    "transfer": exp_transfer,
    "transfer-agnews": exp_transfer_agnews,
}


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--exp", nargs="+", default=list(EXPERIMENTS), choices=list(EXPERIMENTS))
    ap.add_argument("--out", default=str(ROOT / "runs" / "methods"), help="prompts, data samples and run files")
    ap.add_argument("--results", default=str(RESULTS), help="the study's record (committed: a new machine resumes it)")
    return ap


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    if not (SHARED / "sst2" / "train.tsv").exists():
        print(f"skip: {SHARED} is absent (the shared benchmark data); nothing measured")
        return 0
    import torch

    torch.manual_seed(0)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / "data"
    tmp.mkdir(exist_ok=True)
    d = data(tmp)
    r = Runner(out, Path(args.results))
    for name in args.exp:
        EXPERIMENTS[name](r, d)
    return 0


if __name__ == "__main__":
    sys.exit(main())
