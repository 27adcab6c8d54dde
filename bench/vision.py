"""Visual prompt tuning at small scale: VPT-shallow, VPT-deep, linear probe and full fine-tuning side by side.

    python -m bench.vision                 # runs what bench/results/vision.jsonl does not hold yet, then the table
    python -m bench.vision --sweep         # and the frozen-backbone methods again at a higher learning rate
    python -m bench.vision --report        # the table (markdown) from the cached results only

No pretrained image model or image data set installs from the package registry with its weights/images inside
(docs/results-vision.md says what was searched), so this shows the mechanism honestly at small scale instead:

1. pretrain: a small ViT (4 layers, d=64, 4 heads, 8x8 images, patch 2: 16 patches + [CLS]) learns digits 0-4
   of scikit-learn's bundled `load_digits` (1,797 8x8 greyscale digits, offline) from scratch, all weights;
2. the held-out task: digits 5-9, with the backbone frozen for linear probe / VPT-shallow / VPT-deep (the
   backbone's own weights unchanged), and a copy fully fine-tuned, at two training-set sizes (10 and 50 images per
   class), 3 seeds each, evaluated on all the other 5-9 images;
3. the VPT-deep shared key/value saving: the token path against the K/V path (softprompt.vision.encoder), same
   prompt and images, outputs checked equal, on a ViT-S/16-shaped random model (12 layers, d=384, 197 tokens).

Every run trains through softprompt.trainer.fit (the one loop) with softprompt.vision.objective.ImageObjective;
pixels bypass an image processor (the digits are scaled to [-1, 1] and repeated over 3 channels).
Every finished run is appended to bench/results/vision.jsonl (--results; committed, so a new machine resumes the
study) and skipped on a rerun; the pretrained backbone stays in runs/vision/backbone.
Needs scikit-learn (`pip install softprompt[bench]`); without it the bench says so and exits 0.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from softprompt.config import RunConfig
from softprompt.runfiles import RunFiles
from softprompt.trainer import fit
from softprompt.vision.encoder import VisionModel, VisualPrompt
from softprompt.vision.images import ImageSet
from softprompt.vision.objective import ImageHead, ImageObjective, vision_meta
from softprompt.vision.vpt import DEEP, SHALLOW, init_tokens

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results" / "vision.jsonl"  # one JSON object per finished run (the study's record)
RUNS = Path("runs/vision")
BACKBONE = RUNS / "backbone"
METHODS = ("linear-probe", "vpt", "vpt-deep", "full-finetune")
SIZES = (10, 50)
SEEDS = (0, 1, 2)
P = 8  # prompt tokens


def digits() -> tuple[torch.Tensor, torch.Tensor] | None:
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        return None
    d = load_digits()
    x = torch.tensor(d.images, dtype=torch.float32) / 16.0 * 2 - 1  # (1797, 8, 8) in [-1, 1]
    return x[:, None].expand(-1, 3, -1, -1).contiguous(), torch.tensor(d.target)  # (1797, 3, 8, 8)


def small_vit():
    from transformers import ViTConfig, ViTModel

    torch.manual_seed(0)
    cfg = ViTConfig(hidden_size=64, num_hidden_layers=4, num_attention_heads=4, intermediate_size=128, image_size=8,
                    patch_size=2, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)  # fmt: skip
    return ViTModel(cfg, add_pooling_layer=False)


def run_config(steps: int, lr: float, batch: int, seed: int, out: Path) -> RunConfig:
    cfg = RunConfig()
    t = cfg.train
    t.max_steps, t.lr, t.batch_size, t.seed, t.warmup_steps, t.progress = steps, lr, batch, seed, 10, False
    t.save_every, t.out, t.schedule = 10**9, str(out), "cosine"
    cfg.data.task = "image-classify"
    return cfg


def files(tmp: Path) -> RunFiles:
    return RunFiles(where=str(tmp), prompts=[], log=tmp / "log.jsonl", state=tmp / "state", resume=False)


LR = {"linear-probe": 0.01, "vpt": 0.01, "vpt-deep": 0.01, "full-finetune": 1e-3}  # the main table's rates
SWEEP_LR = 0.05  # --sweep: the frozen-backbone methods again at this rate (50 images / class)


def train_one(method: str, vm: VisionModel, tr: ImageSet, ev: ImageSet, seed: int, steps: int,
              lr: float | None = None) -> dict[str, Any]:  # fmt: skip
    """One run through trainer.fit; accuracy on `ev`, trainable parameters, seconds per step."""
    lr = LR[method] if lr is None else lr
    with tempfile.TemporaryDirectory() as d:
        cfg = run_config(steps, lr, 32, seed, Path(d) / "p.safetensors")
        torch.manual_seed(seed)
        prompt: Any = None
        params: list[torch.nn.Parameter] = []
        if method in ("vpt", "vpt-deep"):
            m = SHALLOW if method == "vpt" else DEEP
            prompt = m.create(vm, init_tokens("vpt", vm, P, deep=m.deep, seed=seed), cfg.prompt)
            params = prompt.trainable()
        if method == "full-finetune":
            vm.model.requires_grad_(True)
            params = [p for p in vm.model.parameters()]
        head = ImageHead(vm.hidden, len(tr.classes), seed=seed)
        obj = ImageObjective(cfg, vm, prompt, head, tr, ev, vision_meta(vm, tr.classes), params=params,
                             head_params=list(head.parameters()))  # fmt: skip
        t0 = time.perf_counter()
        res = fit(obj, cfg, files(Path(d)), log=lambda s: None)
        wall = time.perf_counter() - t0
        vm.model.requires_grad_(False)
    n_params = sum(p.numel() for p in params) + sum(p.numel() for p in head.parameters())
    assert res.last is not None
    return {"accuracy": res.last.metrics["accuracy"], "trainable_params": n_params, "s_per_step": wall / steps}


def subset(x: torch.Tensor, y: torch.Tensor, classes: list[int], per_class: int | None, seed: int,
           exclude: set[int] | None = None) -> tuple[ImageSet, set[int]]:  # fmt: skip
    g = torch.Generator().manual_seed(seed)
    idx: list[int] = []
    for c in classes:
        rows = [int(i) for i in (y == c).nonzero().flatten() if exclude is None or int(i) not in exclude]
        rows = [rows[i] for i in torch.randperm(len(rows), generator=g).tolist()]
        idx += rows[:per_class] if per_class else rows
    labels = [classes.index(int(y[i])) for i in idx]
    return ImageSet(x[idx], labels, [str(c) for c in classes], [f"digit{i}" for i in idx]), set(idx)


def pretrain(x: torch.Tensor, y: torch.Tensor, log, results: Path) -> VisionModel:
    if (BACKBONE / "config.json").exists():
        from transformers import ViTModel

        return VisionModel(ViTModel.from_pretrained(str(BACKBONE), add_pooling_layer=False), "bench-vit")
    vm = VisionModel(small_vit(), "bench-vit")
    tr, used = subset(x, y, [0, 1, 2, 3, 4], None, 0)
    keep = sorted(used)[: int(len(used) * 0.85)]
    ev_idx = sorted(used)[int(len(used) * 0.85) :]
    tr = ImageSet(x[keep], [int(y[i]) for i in keep], tr.classes, [])
    ev = ImageSet(x[ev_idx], [int(y[i]) for i in ev_idx], tr.classes, [])
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as d:
        cfg = run_config(1500, 2e-3, 64, 0, Path(d) / "p.safetensors")
        vm.model.requires_grad_(True)
        head = ImageHead(vm.hidden, 5, seed=0)
        obj = ImageObjective(cfg, vm, None, head, tr, ev, {}, params=list(vm.model.parameters()),
                             head_params=list(head.parameters()))  # fmt: skip
        res = fit(obj, cfg, files(Path(d)), log=lambda s: None)
        vm.model.requires_grad_(False)
    assert res.last is not None
    acc = res.last.metrics["accuracy"]
    log(f"pretrained on digits 0-4: held-out accuracy {acc:.3f} in {time.perf_counter() - t0:.0f} s")
    vm.model.save_pretrained(str(BACKBONE))
    record(results, {"kind": "pretrain", "accuracy": acc, "wall_s": round(time.perf_counter() - t0, 1)})
    return vm


def cached(results: Path) -> list[dict[str, Any]]:
    """The study's record: every run appended to `results` so far."""
    if not results.exists():
        return []
    return [json.loads(line) for line in results.read_text().splitlines() if line.strip()]


def record(results: Path, rec: dict[str, Any]) -> None:
    results.parent.mkdir(parents=True, exist_ok=True)
    with open(results, "a") as f:
        f.write(json.dumps(rec) + "\n")


def kv_saving(log, batch: int = 8, reps: int = 4) -> dict[str, Any]:
    """Token path vs shared K/V path of VPT-deep on a ViT-S/16-shaped random model: inference and training step."""
    from transformers import ViTConfig, ViTModel

    torch.manual_seed(0)
    cfg = ViTConfig(hidden_size=384, num_hidden_layers=12, num_attention_heads=6, intermediate_size=1536,
                    image_size=224, patch_size=16)  # fmt: skip
    vm = VisionModel(ViTModel(cfg, add_pooling_layer=False).eval(), "vit-s16-random")
    px = torch.randn(batch, 3, 224, 224)
    tokens = torch.nn.Parameter(init_tokens("vpt", vm, 50, deep=True, seed=0)[None])  # (1, 12, 50, 384)
    out: dict[str, Any] = {"kind": "kv", "model": "ViT-S/16 shape, random", "batch": batch, "prompt_tokens": 50,
                           "reps": reps}  # fmt: skip
    with torch.no_grad():
        a = vm.features(px, VisualPrompt(tokens, deep=True, kv=False))
        b = vm.features(px, VisualPrompt(tokens, deep=True, kv=True))
    out["max_abs_diff"] = float((a - b).abs().max())
    for phase in ("inference", "train_step"):
        times: dict[bool, list[float]] = {False: [], True: []}
        for _ in range(reps):
            for kv in (False, True):  # interleaved, so drift hits both alike
                t0 = time.perf_counter()
                if phase == "inference":
                    with torch.no_grad():
                        vm.features(px, VisualPrompt(tokens, deep=True, kv=kv))
                else:
                    vm.features(px, VisualPrompt(tokens, deep=True, kv=kv)).sum().backward()
                times[kv].append(time.perf_counter() - t0)
        tok, kvs = statistics.median(times[False][1:]), statistics.median(times[True][1:])
        out[phase] = {"token_s": round(tok, 4), "kv_s": round(kvs, 4), "speedup": round(tok / kvs, 3)}
        log(f"VPT-deep {phase}: token path {tok:.3f} s, K/V path {kvs:.3f} s, x{tok / kvs:.2f}")
    return out


def report(rows: list[dict[str, Any]]) -> str:
    lines = []
    pre = [r for r in rows if r.get("kind") == "pretrain"]
    if pre:
        lines.append(f"Backbone pretrained on digits 0-4: held-out accuracy {pre[-1]['accuracy']:.3f}.\n")
    lines += ["| images / class | method | accuracy (mean ± sd, 3 seeds) | trainable params | ms / step |",
              "|---|---|---|---|---|"]  # fmt: skip
    for size in SIZES:
        for m in METHODS:
            rs = [r for r in rows if r.get("kind") == "run" and r["size"] == size and r["method"] == m]
            if not rs:
                continue
            accs = [r["accuracy"] for r in rs]
            sd = statistics.stdev(accs) if len(accs) > 1 else 0.0
            ms = statistics.median(r["s_per_step"] for r in rs) * 1000
            lines.append(f"| {size} | {m} | {statistics.mean(accs):.3f} ± {sd:.3f} (n={len(rs)}) | "
                         f"{rs[0]['trainable_params']:,} | {ms:.1f} |")  # fmt: skip
    sw = [r for r in rows if r.get("kind") == "sweep"]
    if sw:
        lines += [f"\nThe frozen-backbone methods at lr {SWEEP_LR} instead of {LR['vpt']} (50 images / class):\n",
                  "| method | accuracy (mean ± sd) |", "|---|---|"]  # fmt: skip
        for m in ("linear-probe", "vpt", "vpt-deep"):
            accs = [r["accuracy"] for r in sw if r["method"] == m]
            if accs:
                sd = statistics.stdev(accs) if len(accs) > 1 else 0.0
                lines.append(f"| {m} | {statistics.mean(accs):.3f} ± {sd:.3f} (n={len(accs)}) |")
    kv = [r for r in rows if r.get("kind") == "kv"]
    if kv:
        lines.append(f"\nVPT-deep shared K/V path vs token path ({kv[-1]['model']}, 197 image tokens, "
                     f"{kv[-1]['prompt_tokens']} prompt tokens at each of 12 layers; median of the interleaved "
                     "repetitions after the first; every measurement made):\n")  # fmt: skip
        lines += ["| batch | repetitions | phase | token path s | K/V path s | speed-up | max abs diff |",
                  "|---|---|---|---|---|---|---|"]  # fmt: skip
        for k in kv:
            for ph in ("inference", "train_step"):
                lines.append(f"| {k['batch']} | {k.get('reps', 4)} | {ph} | {k[ph]['token_s']} | {k[ph]['kv_s']} | "
                             f"x{k[ph]['speedup']} | {k['max_abs_diff']:.1e} |")  # fmt: skip
    return "\n".join(lines)


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--report", action="store_true", help="print the table from the cached results only")
    ap.add_argument("--steps", type=int, default=300, help="optimiser steps per downstream run")
    ap.add_argument("--sweep", action="store_true", help=f"also the frozen-backbone methods at lr {SWEEP_LR}")
    ap.add_argument("--kv", action="store_true", help="measure the K/V saving again (appends a record)")
    ap.add_argument("--kv-batch", type=int, default=8, help="images per timed forward (K/V saving)")
    ap.add_argument("--kv-reps", type=int, default=4, help="interleaved repetitions per path (the first dropped)")
    ap.add_argument("--results", default=str(RESULTS), help="the study's record (committed: a new machine resumes it)")
    return ap


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    results = Path(args.results)
    log = lambda s: print(s, file=sys.stderr, flush=True)  # noqa: E731
    if not args.report:
        data = digits()
        if data is None:
            print("bench.vision: skipped: scikit-learn is not installed (pip install softprompt[bench])")
            return 0
        torch.set_num_threads(1)
        x, y = data
        vm = pretrain(x, y, log, results)
        base = copy.deepcopy(vm.model.state_dict())
        done = {(r["size"], r["method"], r["seed"]) for r in cached(results) if r.get("kind") == "run"}
        for size in SIZES:
            for seed in SEEDS:
                tr, used = subset(x, y, [5, 6, 7, 8, 9], size, 100 + seed)
                ev, _ = subset(x, y, [5, 6, 7, 8, 9], None, 0, exclude=used)
                for m in METHODS:
                    if (size, m, seed) in done:
                        continue
                    vm.model.load_state_dict(base)  # every run starts from the pretrained backbone
                    r = train_one(m, vm, tr, ev, seed, args.steps)
                    log(f"{size}/class {m} seed {seed}: accuracy {r['accuracy']:.3f}")
                    record(results, {"kind": "run", "size": size, "method": m, "seed": seed, **r})
        if args.kv or not any(r.get("kind") == "kv" for r in cached(results)):
            record(results, kv_saving(log, batch=args.kv_batch, reps=args.kv_reps))  # the report shows the last
        if args.sweep:
            swept = {(r["method"], r["seed"]) for r in cached(results) if r.get("kind") == "sweep"}
            for seed in SEEDS:
                tr, used = subset(x, y, [5, 6, 7, 8, 9], 50, 100 + seed)
                ev, _ = subset(x, y, [5, 6, 7, 8, 9], None, 0, exclude=used)
                for m in ("linear-probe", "vpt", "vpt-deep"):
                    if (m, seed) in swept:
                        continue
                    vm.model.load_state_dict(base)
                    r = train_one(m, vm, tr, ev, seed, args.steps, SWEEP_LR)
                    log(f"sweep lr {SWEEP_LR} 50/class {m} seed {seed}: accuracy {r['accuracy']:.3f}")
                    record(results, {"kind": "sweep", "size": 50, "method": m, "seed": seed, "lr": SWEEP_LR, **r})
    print(report(cached(results)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
