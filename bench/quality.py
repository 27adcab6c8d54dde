"""Evidence that it learns: prompt tuning on real benchmarks, written to docs/results.md with plots in docs/img/.

    python -m bench.quality --quick          # minutes: small samples, few steps (a smoke run of every table,
                                             # page written to runs/quality/quick/docs/results.md)
    python -m bench.quality                  # full budgets (hours on 2 CPU cores)
    python -m bench.quality --only sst2,ablation   # some experiments; finished runs are cached and reused

Every run drives softprompt's own API (the same code as the CLI). Results are cached per run in
runs/quality/<mode>/results.json, so an interrupted study resumes where it stopped; the page is rewritten from
the cache after every run. Data comes from ../shared/data (never copied into the repo); experiments whose data
is absent are skipped with a note on the page.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"
DOCS = ROOT / "docs"


@dataclass
class Budget:
    train_n: int  # training examples sampled (fixed seed)
    eval_n: int  # evaluation examples (0: all); a task's own `eval_n` caps it further
    steps: int  # the main runs (SST-2, AG News, minilm-l6, PEFT)
    pair_steps: int  # RTE and BoolQ, per seed
    ablation_steps: int  # each prompt-length x init and learning-rate run
    batch: int = 16
    seeds: tuple[int, ...] = (0,)
    agnews_steps: int = 0  # 0: `steps`
    boolq_steps: int = 0  # 0: `pair_steps` (BoolQ's passages are ~4x SST-2's sentences)
    ablation_eval_n: int = 0  # ablation runs evaluate their final prompt on the first N eval rows (0: all)


# quick: a smoke run of every table and plot (does each path run end to end?), ~10 min on one thread
QUICK = Budget(
    train_n=200, eval_n=64, steps=8, pair_steps=4, ablation_steps=3, batch=8, boolq_steps=2, ablation_eval_n=32
)
# "full" is sized for 2 CPU cores (~2.5 h in two `--only` streams): the main runs get the 300 steps of
# batch 16 (AG News 200, as in the probe); RTE/BoolQ and the 20 ablation runs get short budgets, stated on
# every row of the page.
FULL = Budget(
    train_n=4000,
    eval_n=0,
    steps=300,
    pair_steps=50,
    ablation_steps=20,
    seeds=(0, 1, 2),
    agnews_steps=200,
    boolq_steps=16,
    ablation_eval_n=200,
)


@dataclass
class Task:
    name: str
    train: str
    eval: str | None
    template: str
    labels: str
    columns: str | None = None
    holdout: int = 0  # split this many rows off train for evaluation (AG News)
    eval_n: int = 0  # cap on evaluation rows in the full budget (BoolQ's 3,270 long passages cost ~15 min a pass)
    few_shot: bool = False  # small training data: report mean ± std over the budget's seeds (else seed 0 only)
    train_n: int = 0  # training rows (0: the budget's train_n); AG News 9k: every row that is not held out
    dedup: bool = False  # drop training rows whose text is a held-out row's (train10k repeats a few articles)
    extra: dict[str, Any] = field(default_factory=dict)


TASKS = {
    "sst2": Task("SST-2", "sst2/train.tsv", "sst2/dev.tsv", "Review: {sentence}\nSentiment:", "0=negative,1=positive"),
    "agnews": Task(
        "AG News",
        "agnews/train10k.tsv",
        None,
        "Article: {text}\nTopic:",
        "World=world,Sports=sports,Business=business,Sci/Tech=technology",
        columns="text,label",
        holdout=1000,
    ),
    "rte": Task(
        "RTE",
        "rte/train.jsonl",
        "rte/val.jsonl",
        "{premise}\nQuestion: {hypothesis} True or false?\nAnswer:",
        "entailment=true,not_entailment=false",
    ),
    "boolq": Task(
        "BoolQ",
        "boolq/train32.jsonl",
        "boolq/val.jsonl",
        "{passage}\nQuestion: {question}?\nAnswer:",
        "true=yes,false=no",
        eval_n=200,
        few_shot=True,
    ),
}


# the same held-out 1,000 rows (same shuffle); trains on all 9,000 others, less the 5 that repeat a held-out article
# (2 of them are in the 4,000-row sample of "agnews")
TASKS["agnews9k"] = replace(TASKS["agnews"], train_n=9000, dedup=True)


class Study:
    """Runs experiments, caches each run's result, and renders the results page."""

    def __init__(self, mode: str, budget: Budget) -> None:
        self.mode, self.budget = mode, budget
        self.dir = ROOT / "runs" / "quality" / mode
        self.dir.mkdir(parents=True, exist_ok=True)
        self.cache_path = self.dir / "results.json"
        self.results: dict[str, Any] = json.loads(self.cache_path.read_text()) if self.cache_path.exists() else {}
        self._bb: dict[str, Any] = {}
        self.tasks = TASKS  # for bench.quality_experiments (which does not import this module)

    def backbone(self, name: str):
        from softprompt import load_backbone

        if name not in self._bb:
            self._bb[name] = load_backbone(name, progress=False)
        return self._bb[name]

    def save(self) -> None:
        """Merge this process's runs into the cache (several `--only` streams may run at once), atomically."""
        import fcntl

        with open(self.dir / ".lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            disk = json.loads(self.cache_path.read_text()) if self.cache_path.exists() else {}
            self.results = {**disk, **self.results}
            tmp = self.cache_path.with_suffix(f".{os.getpid()}.tmp")
            tmp.write_text(json.dumps(self.results, indent=1))
            tmp.replace(self.cache_path)

    # ---- data -------------------------------------------------------------------------------------------------
    def files(self, key: str) -> tuple[str, str]:
        """Train/eval files for this budget (fixed-seed samples written under runs/, never into the repo)."""
        from softprompt.data import read_records

        t = TASKS[key]
        out_tr, out_ev = self.dir / f"{key}.train.jsonl", self.dir / f"{key}.eval.jsonl"
        if out_tr.exists() and out_ev.exists():
            return str(out_tr), str(out_ev)
        rows = [r for _, r in read_records(str(SHARED / t.train), t.columns.split(",") if t.columns else None)]
        rng = random.Random(0)
        rng.shuffle(rows)
        if t.holdout:
            ev, rows = rows[: t.holdout], rows[t.holdout :]
            if t.dedup:
                seen = {r.get("text") for r in ev}
                rows = [r for r in rows if r.get("text") not in seen]
        else:
            assert t.eval is not None
            ev = [r for _, r in read_records(str(SHARED / t.eval))]
        n = t.train_n or self.budget.train_n
        tr = rows[: min(n, self.budget.train_n) if self.mode == "quick" else n]  # quick: the smoke budget's size
        cap = min(n for n in (self.budget.eval_n, t.eval_n, len(ev)) if n)
        if cap < len(ev):
            ev = random.Random(1).sample(ev, cap)
        for path, data in ((out_tr, tr), (out_ev, ev)):
            path.write_text("".join(json.dumps(r) + "\n" for r in data))
        return str(out_tr), str(out_ev)

    # ---- runs -------------------------------------------------------------------------------------------------
    def run(self, run_id: str, fn, *args, **kw) -> dict[str, Any]:
        if run_id in self.results:
            return self.results[run_id]
        print(f"[{time.strftime('%H:%M:%S')}] {run_id} ...", flush=True)
        t0 = time.time()
        res = fn(*args, **kw)
        res["wall_s"] = round(time.time() - t0, 1)
        res["date"] = time.strftime("%Y-%m-%d %H:%M")
        self.results[run_id] = res
        self.save()
        print(f"    {json.dumps({k: v for k, v in res.items() if k != 'curve'})}", flush=True)
        return res

    def zero_shot(self, key: str, model: str = "smollm2-135m") -> dict[str, Any]:
        from softprompt.config import DataConfig
        from softprompt.evaluate import evaluate_examples
        from softprompt.prompted import PromptedModel
        from softprompt.task import BoundTask, TaskSpec

        t = TASKS[key]
        tr, ev = self.files(key)
        pm = PromptedModel(self.backbone(model))
        task = BoundTask(
            TaskSpec.from_config(DataConfig(train=tr, template=t.template, labels=t.labels)), pm, num_tokens=0
        )
        data, _, _ = task.encode_file(ev)
        assert task.spec.verbalizer is not None
        m = evaluate_examples(
            pm,
            pm.build_prefix([None]),
            data,
            task="classify",
            label_ids=task.label_ids,
            labels=task.spec.verbalizer.labels,
        )
        return {"accuracy": m["accuracy"], "macro_f1": m["macro_f1"], "trainable": 0, "steps": 0, "bytes": 0}

    def majority(self, key: str) -> dict[str, Any]:
        from collections import Counter

        from softprompt.data import read_records

        tr, ev = self.files(key)
        major = Counter(r["label"] for _, r in read_records(tr)).most_common(1)[0][0]
        gold = [r["label"] for _, r in read_records(ev)]
        labels = sorted(set(gold))
        acc = sum(g == major for g in gold) / len(gold)
        f1 = [2 * acc / (1 + acc) if lab == major else 0.0 for lab in labels]  # F1 of the predicted class only
        return {"accuracy": acc, "macro_f1": sum(f1) / len(labels), "trainable": 0, "steps": 0, "bytes": 0}

    def prompt_tune(
        self,
        key: str,
        *,
        model: str = "smollm2-135m",
        num_tokens: int = 20,
        init: str = "labels",
        optimizer: str = "adamw",
        lr: float = 0.01,
        seed: int = 0,
        head: str = "lm",
        head_lr: float = 0.0,
        steps: int | None = None,
        evals: int = 4,
        eval_max: int = 0,
        method: str = "prompt",
        group_by_length: bool = True,
        suffix: str = "",
    ) -> dict[str, Any]:
        from softprompt import RunConfig, train

        t = TASKS[key]
        tr, ev = self.files(key)
        cfg = RunConfig()
        cfg.model.model = model
        cfg.data.train, cfg.data.eval, cfg.data.template, cfg.data.labels = tr, ev, t.template, t.labels
        cfg.data.head = head
        cfg.prompt.num_tokens, cfg.prompt.init, cfg.prompt.method = num_tokens, init, method
        cfg.train.optimizer, cfg.train.lr, cfg.train.seed, cfg.train.head_lr = optimizer, lr, seed, head_lr
        cfg.train.max_steps = steps or self.budget.steps
        cfg.train.batch_size = self.budget.batch
        cfg.train.group_by_length = group_by_length
        cfg.train.eval_every = max(1, cfg.train.max_steps // evals)
        cfg.train.eval_max = eval_max
        cfg.train.progress = False
        name = f"{key}-{model}-{head}-{method}-p{num_tokens}-{init}-{optimizer}-lr{lr}-s{seed}".replace("/", "_")
        name += ("" if group_by_length else "-uniform") + (f"-headlr{head_lr}" if head_lr else "")
        name += suffix  # suffix: runs that differ only in steps
        cfg.train.out = str(self.dir / "prompts" / f"{name}.safetensors")
        res = train(cfg, backbone=self.backbone(model), log=lambda s: None)
        best = max((h for h in res.history if "eval_accuracy" in h), key=lambda h: h["eval_accuracy"])
        from softprompt.checkpoint import load_prompt

        bb = self.backbone(model)
        ck = load_prompt(cfg.train.out)  # every trained tensor is in the file: prompt or per-layer K/V, and a head
        trainable = ck.prompt.numel() + sum(v.numel() for v in ck.extra.values())
        n_model = sum(p.numel() for p in bb.model.parameters())
        return {
            "accuracy": best["eval_accuracy"],
            "macro_f1": best["eval_macro_f1"],
            "best_step": best["step"],
            "trainable": trainable,
            "share": trainable / n_model,
            "steps": cfg.train.max_steps,
            "bytes": Path(cfg.train.out).stat().st_size,
            "curve": [(h["step"], h["eval_accuracy"]) for h in res.history if "eval_accuracy" in h],
        }


def render(study: Study, notes: list[str]) -> Path:
    """Rewrite docs/results.md from the cached results (and plots under docs/img/). A --quick smoke run writes
    its page to runs/quality/quick/docs/ instead: it must not replace the measured page or the README's table."""
    from bench import quality_report

    docs = DOCS if study.mode == "full" else study.dir / "docs"
    docs.mkdir(parents=True, exist_ok=True)
    quality_report.render(study.results, study.mode, study.budget, notes, docs)
    return docs / "results.md"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    groups = "sst2, minilm, agnews, sst2-100, sst2-uniform, sst2-long, sst2-long-20, sst2-long-20-peft, agnews-long"
    groups += ", agnews-100, agnews-head, agnews-deep-head-9k, agnews-deep-9k, agnews-deep-head-9k-s1"
    groups += ", agnews-deep-head-9k-800, agnews-deep-head-9k-800-s1"
    groups += ", agnews-head-9k, agnews-head-100, agnews-head-lr, agnews-head-lr-1e-3, pairs, ablation, lr"
    ap.add_argument("--only", default="", help=f"comma list of: {groups}")
    args = ap.parse_args()
    if not SHARED.exists():
        print(f"skip: {SHARED} is absent (the shared benchmark data); nothing measured")
        return 0
    from bench import quality_experiments

    budget = QUICK if args.quick else FULL
    study = Study("quick" if args.quick else "full", budget)
    only = set(filter(None, args.only.split(",")))
    notes = quality_experiments.run_all(study, only, render)
    print(f"wrote {render(study, notes)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
