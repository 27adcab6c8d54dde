"""Measurements behind docs/results-late.md: late prompts (`--method late --layer L`) against a plain prompt.

    OMP_NUM_THREADS=1 python -m bench.late [--exp sst2 sst2-epochs agnews interleaved inference] [--layer 15]
                                           [--out runs/late] [--results bench/results/late.jsonl]

smollm2-135m (30 layers), 10-token prompts, 60 steps x batch 8, AdamW lr 0.01, warm-up 5, seed 0: the settings of the
plain-prompt rows of docs/results-methods.md (bench/methods.py exp_deep_smollm). Each pair (plain, late) runs in one
process on one loaded backbone, one after the other, so the two step times are measured side by side:

  sst2         the 2,000-sentence SST-2 sample of bench/methods.py; 60 x 8 = 480 rows, all distinct (less than one
               epoch), so the cache of what enters layer L never hits: the speed-up is the backward pass stopping at L
  sst2-epochs  a 64-sentence sample of it, 60 steps = 7.5 epochs: every row after the first epoch comes from the cache,
               so a step runs layers >= L only (forward and backward)
  agnews       the 2,000 / 500 AG News split of bench/methods.py
  interleaved  10 training steps (forward + backward) of a plain and a late prompt alternated step by step, on SST-2
               and AG News first-epoch batches (no cache hit): the median step time of each, a busy machine slowing
               both alike; and on the 64-row sample with the late prompt's cache filled first (later epochs)
  inference    the SST-2 pair's two prompts evaluated alternately on 96 dev sentences, 3 rounds (median rows/s)

Per run: accuracy (on the first 200 SST-2 dev sentences, the plain rows' training-time evaluation, and on 100 of the
500 held-out AG News articles: fewer rows than docs/results-methods.md, for the one-core budget), trainable
parameters, training time per
step (the median over steps 2..60 of the trainer's own step clock; evaluation happens after step 60 only), and
inference throughput (rows/s of the evaluation, batch 32). Each finished run is appended to
bench/results/late.jsonl (--results; committed, so a new machine resumes the study) and skipped when the script runs
again; the prompts, data samples and other run files go to --out. Data: ../shared/data (never copied into the
repository); skipped with a reason when absent.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

from bench._common import ResultLog
from bench.methods import SHARED, data, read_tsv, write_tsv

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results" / "late.jsonl"  # one JSON object per finished run
MODEL = "smollm2-135m"
SETTINGS = {"num_tokens": 10, "max_steps": 60, "batch_size": 8, "warmup_steps": 5, "lr": 0.01, "seed": 0}
TEMPLATES = {"sst2": "Review: {sentence}\nSentiment:", "agnews": "Article: {text}\nTopic:"}


class Bench:
    def __init__(self, out: Path, results: Path) -> None:
        self.out = out
        out.mkdir(parents=True, exist_ok=True)
        self.log = ResultLog(results)
        self.done = self.log.done
        self._bb: Any = None

    def backbone(self) -> Any:
        from softprompt import load_backbone

        if self._bb is None:
            self._bb = load_backbone(MODEL, progress=False)
        return self._bb

    def run(self, name: str, task: dict[str, str], template: str, eval_rows: int, **opts: Any) -> dict[str, Any]:
        """Train one prompt (no evaluation while training), then evaluate it; record the figures."""
        if name in self.done:
            return self.done[name]
        from softprompt import Predictor, RunConfig, train
        from softprompt.checkpoint import load_prompt
        from softprompt.config import apply_options

        cfg = RunConfig()
        cfg.model.model = MODEL
        cfg.data.train, cfg.data.labels, cfg.data.template = task["train"], task["labels"], template
        cfg.train.out, cfg.train.progress = str(self.out / f"{name}.safetensors"), False
        apply_options(cfg, {**SETTINGS, **opts}, name)
        bb = self.backbone()
        res = train(cfg, backbone=bb, log=lambda s: print(s, file=sys.stderr))
        clock = [h["time_s"] for h in res.history]
        step_s = statistics.median(b - a for a, b in zip(clock, clock[1:]))
        ck = load_prompt(res.out)
        params = sum(t.numel() for t in [ck.prompt, *ck.extra.values()])
        pred = Predictor.load(res.out, backbone=bb, batch_size=32)
        examples, _, _ = pred.task.encode_file(task["eval"])
        examples = examples[:eval_rows]
        t0 = time.perf_counter()
        probs = pred.probs(examples)
        eval_s = time.perf_counter() - t0
        acc = sum(int(p.argmax()) == e.label for p, e in zip(probs, examples)) / len(examples)
        r = {"name": name, "method": cfg.prompt.method, "layer": cfg.prompt.layer, "opts": opts,
             "accuracy": round(acc, 4), "eval_rows": len(examples), "params": params, "step_s": round(step_s, 3),
             "train_s": round(res.wall_s, 1), "rows_per_s": round(len(examples) / eval_s, 1)}  # fmt: skip
        return self.log.record(r)


def small_sst2(tmp: Path, n: int) -> dict[str, str]:
    sst = read_tsv(SHARED / "sst2" / "train.tsv")[1:]
    random.Random(0).shuffle(sst)
    return {"train": write_tsv(sst[:n], ["sentence", "label"], tmp / f"sst2_train{n}.tsv"),
            "eval": str(SHARED / "sst2" / "dev.tsv"), "labels": "0=negative,1=positive"}  # fmt: skip


def pair(b: Bench, prefix: str, task: dict[str, str], template: str, eval_rows: int, layer: int) -> list[dict]:
    return [
        b.run(f"{prefix}-plain", task, template, eval_rows, method="prompt"),
        b.run(f"{prefix}-late{layer}", task, template, eval_rows, method="late", layer=layer),
    ]


def inference(b: Bench, task: dict[str, str], names: list[str], rows: int, rounds: int = 3) -> dict[str, Any]:
    """Inference throughput of trained prompts, interleaved (plain, late, plain, late, ...) on the same rows so that
    a busy machine slows both alike: the median rows/s of each over `rounds`."""
    name = "inference-" + "-".join(names)
    if name in b.done:
        return b.done[name]
    from softprompt import Predictor

    preds = {n: Predictor.load(str(b.out / f"{n}.safetensors"), backbone=b.backbone(), batch_size=32) for n in names}
    examples = preds[names[0]].task.encode_file(task["eval"])[0][:rows]
    times: dict[str, list[float]] = {n: [] for n in names}
    for _ in range(rounds):
        for n, pred in preds.items():
            t0 = time.perf_counter()
            pred.probs(examples)
            times[n].append(time.perf_counter() - t0)
    r = {"name": name, "method": "inference", "rows": len(examples), "rounds": rounds,
         "rows_per_s": {n: round(len(examples) / statistics.median(t), 1) for n, t in times.items()}}  # fmt: skip
    return b.log.record(r)


def interleaved(
    b: Bench, name: str, task: dict[str, str], template: str, layer: int, steps: int, warm: bool = False
) -> dict[str, Any]:
    """Training steps (forward + backward of the same micro-batch, steps 0..steps-1 of the seed-0 schedule) of a
    plain and a late prompt, alternated step by step in one process, so that a busy machine slows both alike: the
    median seconds per step of each. warm: the late prompt's cache first holds every training row (an epoch, not
    timed), so every timed step is what a step of the second and later epochs costs."""
    if name in b.done:
        return b.done[name]
    from softprompt import RunConfig
    from softprompt.config import apply_options
    from softprompt.train import build_objective

    objs = {}
    for method in ("prompt", "late"):
        cfg = RunConfig()
        cfg.model.model = MODEL
        cfg.data.train, cfg.data.labels, cfg.data.template = task["train"], task["labels"], template
        cfg.train.out, cfg.train.progress = str(b.out / f"{name}-{method}.safetensors"), False
        apply_options(cfg, {**SETTINGS, "method": method, "layer": layer if method == "late" else 0}, name)
        objs[method] = build_objective(cfg, b.backbone(), log=lambda s: None)
    if warm:
        obj = objs["late"]
        with torch.no_grad():
            for i in range(0, obj.n_train, 8):
                obj.loss(obj.train_set[i : i + 8])
    times: dict[str, list[float]] = {m: [] for m in objs}
    for step in range(steps):
        for m, obj in objs.items():
            t0 = time.perf_counter()
            for rows in obj.batches(step):
                obj.loss(rows).backward()
            times[m].append(time.perf_counter() - t0)
            for p in obj.params:
                p.grad = None
    med = {m: statistics.median(t) for m, t in times.items()}
    r = {"name": name, "method": "interleaved", "layer": layer, "steps": steps, "warm": warm, "step_s": {m: round(v, 3)
         for m, v in med.items()}, "speedup": round(med["prompt"] / med["late"], 2)}  # fmt: skip
    return b.log.record(r)


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--exp", nargs="*", default=["sst2", "sst2-epochs", "agnews", "interleaved", "inference"])
    ap.add_argument("--layer", type=int, default=15, help="the late prompt's entry layer (smollm2-135m has 30)")
    ap.add_argument("--out", default=str(ROOT / "runs" / "late"), help="prompts, data samples and run files")
    ap.add_argument("--results", default=str(RESULTS), help="the study's record (committed: a new machine resumes it)")
    return ap


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    if not (SHARED / "sst2" / "train.tsv").is_file() or not (SHARED / "agnews" / "train10k.tsv").is_file():
        print(f"skipped: the benchmark data is not at {SHARED}", file=sys.stderr)
        return 0
    b = Bench(Path(args.out), Path(args.results))
    tmp = b.out / "data"
    tmp.mkdir(exist_ok=True)
    d = data(tmp)
    L = args.layer
    for exp in args.exp:
        if exp == "sst2":
            pair(b, "sst2", d["sst2"], TEMPLATES["sst2"], 200, L)
        elif exp == "sst2-epochs":
            pair(b, "sst2-64rows", small_sst2(tmp, 64), TEMPLATES["sst2"], 200, L)
        elif exp == "agnews":
            pair(b, "agnews", d["agnews"], TEMPLATES["agnews"], 100, L)
        elif exp == "interleaved":  # training steps of the two methods alternated, first-epoch rows (no cache hit)
            interleaved(b, "interleaved-sst2", d["sst2"], TEMPLATES["sst2"], L, 10)
            interleaved(b, "interleaved-agnews", d["agnews"], TEMPLATES["agnews"], L, 10)
            interleaved(b, "interleaved-sst2-64rows-cached", small_sst2(tmp, 64), TEMPLATES["sst2"], L, 10, warm=True)
        elif exp == "inference":  # the SST-2 pair's prompts, interleaved
            inference(b, d["sst2"], ["sst2-plain", f"sst2-late{L}"], 96)
        else:
            raise SystemExit(f"--exp: unknown experiment {exp!r}")
    for r in b.done.values():
        if r["method"] in ("interleaved", "inference"):
            print(json.dumps(r))
        if r["method"] == "late":
            plain = b.done.get(r["name"].rsplit("-late", 1)[0] + "-plain")
            if plain:
                print(f"{r['name']}: step {plain['step_s']:.3f} s (plain) / {r['step_s']:.3f} s (late) ="
                      f" {plain['step_s'] / r['step_s']:.2f}x; accuracy {plain['accuracy']:.3f} / {r['accuracy']:.3f};"
                      f" {plain['rows_per_s']} / {r['rows_per_s']} rows/s")  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
