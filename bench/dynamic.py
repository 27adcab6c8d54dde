"""Measurements behind docs/results-dynamic.md: plain vs routed vs conditioned prompts on smollm2-135m.

    OMP_NUM_THREADS=1 python -m bench.dynamic [--out runs/dynamic] [--eval-rows 200] [--only sst2 agnews rte serve]
        [--methods plain residual] [--seeds 0 1 2] [--results bench/results/dynamic.jsonl]

Side by side in one run, per dataset (SST-2, AG News): the three methods trained with the settings of the plain
smollm2 row of docs/results-methods.md (60 steps x batch 8, --init labels, AdamW lr 0.01, 5 warm-up steps, seed 0,
same data and order), at about equal trainable parameters:
  plain        10 tokens                               10 x 576                      =  5,760
  routed       K = 2 routes x 5 tokens + router        2 x 5 x 576 + 2 x 576 + 2     =  6,914
  conditioned  5 tokens, rank 1                        5 x 576 + (5 + 1) x 576 + 5   =  6,341
Training runs without evaluation (so the time per step is the step's own); each prompt is then evaluated with
Predictor on the first --eval-rows rows of the evaluation set, timed (inference throughput: rows per second,
batch 32, the best of two interleaved rounds). `serve`: the server's forward path (pipeline.classify_rows on a
Registry, no HTTP) on 64 SST-2 rows of one task: the routed task against the single static prompt, and the
conditioned one, interleaved rounds. `steptime`: seconds per training step of the three methods on the same batches,
interleaved (the training runs' own wall times overlap other load on a shared machine). `serve-v2`, `steptime-v2`:
the same two measurements of GROUPS["-v2"] (plain, routed v2, conditioned, residual). `rte`: RTE (2,240 train
rows, the 277 validation rows) for the rows asked for with --methods and --seeds, e.g. plain vs residual over three
seeds; --seeds trains each method with each seed (seed 0 keeps the first study's run names).

Each finished run is appended to bench/results/dynamic.jsonl (--results; committed, so a new machine resumes the
study) and skipped when the script runs again; the prompts and other run files go to --out. Data: fixed-seed samples
of ../shared/data (bench.methods.data); skips with a reason when it is absent.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench._common import ResultLog
from bench.methods import ROOT, SHARED, data

RESULTS = ROOT / "bench" / "results" / "dynamic.jsonl"  # one JSON object per finished run
MODEL = "smollm2-135m"
COMMON = {"max_steps": 60, "batch_size": 8, "warmup_steps": 5, "lr": 0.01, "init": "labels", "seed": 0}
METHODS = {
    "plain": {"method": "prompt", "num_tokens": 10},
    # routed v1 (results cached from the first study): identical route inits, zero router, balance weight 0.01. The
    # zero router and the uncentred summary are gone from softprompt.routed, so a rerun of this row is not v1 exactly.
    "routed": {"method": "routed", "num_tokens": 5, "routes": 2, "balance_weight": 0.01, "route_noise": 0.0},
    # routed v2: the defaults after the route-collapse fix (route noise 0.1, small random router on the centred
    # summary, balance weight 0.1)
    "routed-v2": {"method": "routed", "num_tokens": 5, "routes": 2},
    # one extra setting: SMoP's K = 4 routes x 5 tokens (13,828 trainable parameters, 2.4x the plain prompt's)
    "routed-v2-k4": {"method": "routed", "num_tokens": 5, "routes": 4},
    "conditioned": {"method": "conditioned", "num_tokens": 5, "rank": 1},
    # Residual Prompt Tuning: the plain 10-token prompt trained through a residual MLP, folded away at save
    "residual": {"method": "prompt", "num_tokens": 10, "reparam": "residual"},
}
TEMPLATES = {
    "sst2": "Review: {sentence}\nSentiment:",
    "agnews": "Article: {text}\nTopic:",
    "rte": "{premise}\nQuestion: {hypothesis} True or false?\nAnswer:",  # docs/results.md's RTE row
}


GROUPS = {  # the serve / steptime measurements by name suffix: the methods each compares
    "": ("plain", "routed", "conditioned"),  # the first study's serve / steptime
    "-v2": ("plain", "routed-v2", "conditioned", "residual"),  # serve-v2 / steptime-v2: after the route-collapse fix
}


def run_name(ds: str, method: str, seed: int = 0) -> str:
    """A run's key in the study's record: seed 0 keeps the first study's names."""
    return f"{ds}-{method}" + (f"-s{seed}" if seed else "")


class Study:
    def __init__(self, out: Path, eval_rows: int, results: Path) -> None:
        self.out, self.eval_rows = out, eval_rows
        out.mkdir(parents=True, exist_ok=True)
        self.log = ResultLog(results)
        self.done = self.log.done
        self._bb: Any = None

    @property
    def bb(self) -> Any:
        if self._bb is None:
            from softprompt import load_backbone

            self._bb = load_backbone(MODEL, progress=False)
        return self._bb

    def record(self, r: dict[str, Any]) -> dict[str, Any]:
        return self.log.record(r)

    def train(self, ds: str, method: str, task: dict[str, str], seed: int = 0) -> dict[str, Any]:
        name = run_name(ds, method, seed)
        if name in self.done:
            return self.done[name]
        from softprompt import RunConfig, train
        from softprompt.config import apply_options

        cfg = RunConfig()
        cfg.model.model = MODEL
        cfg.data.train, cfg.data.labels, cfg.data.template = task["train"], task["labels"], TEMPLATES[ds]
        cfg.train.out, cfg.train.progress, cfg.train.overwrite = str(self.out / f"{name}.safetensors"), False, True
        apply_options(cfg, {**COMMON, **METHODS[method], "seed": seed}, name)
        t0 = time.perf_counter()
        res = train(cfg, backbone=self.bb, log=lambda s: print(s, file=sys.stderr))
        wall = time.perf_counter() - t0
        import torch

        from softprompt import methods
        from softprompt.prompted import PromptedModel

        state = methods.get(cfg.prompt.method).create(  # the trainable parameter count, from the method's own state
            PromptedModel(self.bb), torch.zeros(cfg.prompt.num_tokens, self.bb.embed_dim), cfg.prompt
        )
        n_params = sum(p.numel() for p in state.trainable() if p.requires_grad)
        return self.record({"name": name, "kind": "train", "dataset": ds, "method": method, "seed": seed,
                            "params": n_params,
                            "steps": res.steps, "train_s": round(wall, 1),
                            "s_per_step": round(wall / max(res.steps, 1), 3), "out": res.out})  # fmt: skip

    def evaluate(self, ds: str, task: dict[str, str], tmp: Path, runs: list[tuple[str, int]]) -> None:
        """Accuracy and throughput of the prompts `runs` ((method, seed) pairs) of `ds` on the same rows,
        interleaved."""
        todo = {run_name(ds, m, s): (m, s) for m, s in runs if f"{run_name(ds, m, s)}-eval" not in self.done}
        if not todo:
            return
        from softprompt import Predictor

        rows = Path(task["eval"]).read_text(encoding="utf-8").splitlines()
        head = 0 if task["eval"].endswith(".jsonl") else 1  # a TSV's header line
        src = tmp / f"{ds}-eval{self.eval_rows}{Path(task['eval']).suffix}"
        src.write_text("\n".join(rows[: self.eval_rows + head]) + "\n", encoding="utf-8")  # the first rows
        preds = {m: Predictor.load(str(self.out / f"{m}.safetensors"), backbone=self.bb) for m in todo}
        best: dict[str, float] = {}
        metrics: dict[str, dict[str, Any]] = {}
        for _ in range(2):  # interleaved rounds: load from other processes hits every method alike
            for m, pred in preds.items():
                t0 = time.perf_counter()
                metrics[m] = pred.evaluate(str(src))
                dt = time.perf_counter() - t0
                best[m] = min(best.get(m, dt), dt)
        for m in todo:
            pset = preds[m].prefix
            routes = getattr(pset, "routes", None)
            method, seed = todo[m]
            self.record({"name": f"{m}-eval", "kind": "eval", "dataset": ds, "method": method, "seed": seed,
                         "accuracy": metrics[m]["accuracy"], "macro_f1": metrics[m]["macro_f1"], "n": metrics[m]["n"],
                         "eval_s": round(best[m], 2), "rows_per_s": round(metrics[m]["n"] / best[m], 1),
                         "routes": None if not routes or routes[0] is None else routes[0].tolist()})  # fmt: skip

    def step_time(
        self, ds: str, task: dict[str, str], methods: tuple[str, ...], tag: str = "", steps: int = 6, rounds: int = 2
    ) -> None:
        """Seconds per training step (forward + backward of one batch of 8, no optimiser), the methods on the
        same batches, interleaved: the training runs above overlap other load on a shared machine."""
        name = f"{ds}-steptime{tag}"
        if name in self.done:
            return
        import torch

        from softprompt import RunConfig
        from softprompt.config import apply_options
        from softprompt.train import build_objective

        objs = {}
        for m in methods:
            cfg = RunConfig()
            cfg.model.model = MODEL
            cfg.data.train, cfg.data.labels, cfg.data.template = task["train"], task["labels"], TEMPLATES[ds]
            cfg.train.out = str(self.out / "unused.safetensors")
            apply_options(cfg, {**COMMON, **METHODS[m]}, m)
            objs[m] = build_objective(cfg, self.bb, log=lambda s: None)
        best: dict[str, float] = {}
        for _ in range(rounds):
            for m, obj in objs.items():
                torch.manual_seed(0)
                t0 = time.perf_counter()
                for step in range(steps):
                    for rows in obj.batches(step):
                        obj.loss(rows).backward()
                dt = (time.perf_counter() - t0) / steps
                best[m] = min(best.get(m, dt), dt)
        self.record({"name": name, "kind": "steptime", "dataset": ds, "steps": steps, "rounds": rounds,
                     "s_per_step": {m: round(v, 3) for m, v in best.items()},
                     "vs_plain": {m: round(v / best["plain"], 3) for m, v in best.items()}})  # fmt: skip

    def serve(self, task: dict[str, str], tmp: Path, methods: tuple[str, ...], tag: str = "") -> None:
        """The server's forward path: 64 rows of one task (SST-2 dev), each method's prompt against the plain one."""
        if f"serve{tag}" in self.done:
            return
        import shutil

        import torch

        from softprompt.serve import pipeline as pl
        from softprompt.serve.registry import Registry

        folder = tmp / "prompts"
        folder.mkdir()
        for m in methods:
            shutil.copy(self.out / f"sst2-{m}.safetensors", folder / f"{m}.safetensors")
        reg = Registry(self.bb, folder)
        texts = [line.rpartition("\t")[0] for line in Path(task["eval"]).read_text().splitlines()[1:65]]
        batches = {m: [(reg.get(m), reg.encode(reg.get(m), t, "input")) for t in texts] for m in methods}
        best: dict[str, float] = {}
        with torch.no_grad():
            for m in methods:  # warm: the prefixes cached, as a running server has them
                pl.classify_rows(reg, batches[m], max_batch_size=32)
            for _ in range(3):
                for m in methods:
                    t0 = time.perf_counter()
                    pl.classify_rows(reg, batches[m], max_batch_size=32)
                    dt = time.perf_counter() - t0
                    best[m] = min(best.get(m, dt), dt)
        rps = {m: round(len(texts) / best[m], 1) for m in methods}
        ratios = {f"{m}_vs_plain": round(rps[m] / rps["plain"], 3) for m in methods}
        self.record({"name": f"serve{tag}", "kind": "serve", "rows": len(texts), "max_batch_size": 32,
                     "rows_per_s": rps, **ratios})  # fmt: skip


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=str(ROOT / "runs" / "dynamic"), help="prompts and run files")
    ap.add_argument("--results", default=str(RESULTS), help="the study's record (committed: a new machine resumes it)")
    ap.add_argument("--eval-rows", type=int, default=200)
    ap.add_argument("--only", nargs="*", default=["sst2", "agnews", "serve", "steptime"],
                    help="datasets (sst2 agnews rte); measurements (serve steptime serve-v2 steptime-v2)")  # fmt: skip
    ap.add_argument("--methods", nargs="*", default=list(METHODS), choices=list(METHODS),
                    help="methods to train and evaluate on the --only datasets (serve, steptime: theirs)")  # fmt: skip
    ap.add_argument("--seeds", nargs="*", type=int, default=[0], help="training seeds (seed 0: the first study's)")
    return ap


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    if not SHARED.is_dir():
        print(f"skipped: the benchmark data folder {SHARED} is absent", file=sys.stderr)
        return 0
    import torch

    torch.set_num_threads(1)
    st = Study(Path(args.out), args.eval_rows, Path(args.results))
    with tempfile.TemporaryDirectory() as t:
        tmp = Path(t)
        d = data(tmp)
        for ds in ("sst2", "agnews", "rte"):
            runs = [(m, s) for s in args.seeds for m in args.methods] if ds in args.only else []
            for tag, group in GROUPS.items():
                if ds != "rte" and ((f"serve{tag}" in args.only and ds == "sst2") or f"steptime{tag}" in args.only):
                    runs += [(m, 0) for m in group if (m, 0) not in runs]
            for m, s in runs:
                st.train(ds, m, d[ds], seed=s)
            if ds in args.only:
                st.evaluate(ds, d[ds], tmp, [(m, s) for s in args.seeds for m in args.methods])
            for tag, group in GROUPS.items():
                if f"steptime{tag}" in args.only and ds != "rte":
                    st.step_time(ds, d[ds], group, tag)
        for tag, group in GROUPS.items():
            if f"serve{tag}" in args.only:
                st.serve(d["sst2"], tmp, group, tag)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
