"""Quantized frozen backbone vs float32: memory and SST-2 accuracy with smollm2-135m.

    python -m bench.quant_sst2                         # none, int8, int4 (+ bnb8, bnb4 on CUDA); full recipe
    python -m bench.quant_sst2 --schemes none,int8 --train-size 1000 --steps 100
    python -m bench.quant_sst2 --smoke                 # minutes: 64 train rows, 5 steps, 32 dev rows

Each scheme runs in its own process (clean memory readings): load the backbone with `--quantize SCHEME`
(weights quantized while loading), train a prompt with the SST-2 recipe of bench/quality_sst2.py (fixed-seed
sample of ../shared/data/sst2/train.tsv, 20 tokens, vocab init, the CLI defaults otherwise), evaluate on dev
(872 rows), and also evaluate the float32-trained prompt on the quantized backbone (the fingerprint is the same,
so prompts move between the two). Reported per scheme: weight bytes (quantized / float), peak process RSS
(load + training; glibc's MALLOC_MMAP_THRESHOLD_ is fixed so that RSS follows live memory) and peak CUDA memory
on GPUs, load and training wall time, dev accuracy of its own prompt and of the float32 prompt. Prints a Markdown
table for docs/results.md and one JSON line per scheme. Skips (exit 0) when the shared data is absent.
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.quality_sst2 import sample_tsv

ROOT = Path(__file__).resolve().parents[1]
SST2 = Path(os.environ.get("SOFTPROMPT_BENCH_SST2_DIR", ROOT.parent / "shared" / "data" / "sst2"))
TEMPLATE = "Review: {sentence}\nSentiment:"
LABELS = "0=negative,1=positive"


def _status_mb(field: str) -> float:
    """VmRSS (current) or VmHWM (peak) of this process, in MiB (Linux)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return float("nan")


def _trim() -> None:
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)  # give freed heap back, so VmRSS shows what is still held
    except OSError:
        pass


def worker(args: argparse.Namespace) -> dict:
    """One scheme, in this process."""
    import torch

    from softprompt import Predictor, RunConfig, load_backbone, train
    from softprompt.quant import quantized_modules, weight_bytes

    cuda = torch.cuda.is_available() and args.scheme.startswith("bnb") or args.device == "cuda"
    cfg = RunConfig()
    cfg.model.model, cfg.model.quantize = args.model, args.scheme
    cfg.model.device = "cuda" if cuda else args.device
    cfg.data.train, cfg.data.eval = args.train_file, args.dev_file
    cfg.data.template, cfg.data.labels = TEMPLATE, LABELS
    cfg.prompt.num_tokens, cfg.prompt.init = args.num_tokens, "vocab"
    cfg.train.out, cfg.train.seed, cfg.train.progress = str(Path(args.out_dir) / f"{args.scheme}.safetensors"), 0, False
    if args.steps:
        cfg.train.max_steps = args.steps
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    t0 = time.time()
    bb = load_backbone(cfg.model, progress=False)
    load_s = time.time() - t0
    _trim()
    res: dict = {
        "scheme": args.scheme,
        "device": str(bb.device),
        "load_s": round(load_s, 1),
        "weights": weight_bytes(bb.model),
        "quantized_modules": quantized_modules(bb.model),
        "rss_after_load_mb": round(_status_mb("VmRSS")),
        "fingerprint": bb.fingerprint,
    }
    if cuda:
        res["cuda_after_load_mb"] = round(torch.cuda.memory_allocated() / 2**20)
    tr = train(cfg, backbone=bb, log=lambda s: print(s, file=sys.stderr))
    res["train_s"], res["steps"] = round(tr.wall_s, 1), tr.steps
    res["peak_rss_mb"] = round(_status_mb("VmHWM"))
    if cuda:
        res["cuda_peak_mb"] = round(torch.cuda.max_memory_allocated() / 2**20)
    # train() evaluated the final prompt on the dev file once (eval_every 0 = at the end only): no second pass
    acc = tr.metrics.get("accuracy")
    if acc is None:
        acc = Predictor.load(tr.out, backbone=bb).evaluate(cfg.data.eval)["accuracy"]
    res["accuracy"] = acc
    if args.fp32_prompt and args.scheme != "none" and Path(args.fp32_prompt).exists():
        res["fp32_prompt_accuracy"] = Predictor.load(args.fp32_prompt, backbone=bb).evaluate(cfg.data.eval)["accuracy"]
    return res


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--schemes", default="", help="comma-separated (default: none,int8,int4 and bnb8,bnb4 on CUDA)")
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--train-size", type=int, default=4000)
    ap.add_argument("--dev-size", type=int, default=0, help="0: the whole dev set")
    ap.add_argument("--steps", type=int, default=0, help="0: the CLI default")
    ap.add_argument("--num-tokens", type=int, default=20)
    ap.add_argument("--device", default="cpu", help="cpu or cuda (bnb schemes always use cuda)")
    ap.add_argument("--out-dir", default="runs/quant")
    ap.add_argument("--smoke", action="store_true", help="64 train rows, 5 steps, 32 dev rows")
    ap.add_argument("--scheme", help=argparse.SUPPRESS)  # worker mode
    ap.add_argument("--train-file", help=argparse.SUPPRESS)
    ap.add_argument("--dev-file", help=argparse.SUPPRESS)
    ap.add_argument("--fp32-prompt", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.scheme:
        print(json.dumps(worker(args)), flush=True)
        return 0
    if not (SST2 / "train.tsv").exists():
        print(f"skip: {SST2} is absent (the shared SST-2 data); nothing measured")
        return 0
    import torch

    if args.smoke:
        args.train_size, args.steps, args.dev_size = 64, 5, 32
    schemes = args.schemes.split(",") if args.schemes else ["none", "int8", "int4"]
    if not args.schemes and torch.cuda.is_available():
        schemes += ["bnb8", "bnb4"]
    if "none" in schemes:  # first: its prompt is evaluated on every quantized backbone
        schemes = ["none"] + [s for s in schemes if s != "none"]
    Path(args.out_dir).mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix="quant-sst2-"))
    sample_tsv(SST2 / "train.tsv", args.train_size, 0, tmp / "train.tsv")
    sample_tsv(SST2 / "dev.tsv", args.dev_size, 0, tmp / "dev.tsv")
    fp32_prompt = str(Path(args.out_dir) / "none.safetensors")
    rows = []
    for s in schemes:
        cmd = [
            sys.executable,
            "-m",
            "bench.quant_sst2",  # this module, in a fresh process (run from the checkout, as its parent)
            "--scheme",
            s,
            "--model",
            args.model,
            "--train-file",
            str(tmp / "train.tsv"),
            "--dev-file",
            str(tmp / "dev.tsv"),
            "--steps",
            str(args.steps),
            "--num-tokens",
            str(args.num_tokens),
            "--device",
            args.device,
            "--out-dir",
            args.out_dir,
            "--fp32-prompt",
            fp32_prompt,
        ]
        print(f"== {s}", file=sys.stderr, flush=True)
        # A fixed mmap threshold makes glibc return freed big blocks at once: RSS then tracks live memory rather
        # than the allocator's high-water mark (the same setting for every scheme).
        env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": os.environ.get("MALLOC_MMAP_THRESHOLD_", "131072")}
        proc = subprocess.run(cmd, stdout=subprocess.PIPE, text=True, env=env)
        line = [x for x in proc.stdout.splitlines() if x.startswith("{")]
        if proc.returncode or not line:
            rows.append({"scheme": s, "error": f"exit {proc.returncode}"})
            continue
        rows.append(json.loads(line[-1]))
        print(line[-1], flush=True)
    base = next((r for r in rows if r.get("scheme") == "none" and "error" not in r), None)
    print("\n| scheme | weights MiB (quantized + float) | peak RSS MiB | train s | dev acc | fp32 prompt on it |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        if "error" in r:
            print(f"| {r['scheme']} | {r['error']} | | | | |")
            continue
        w = r["weights"]
        mem = f"{w['total'] / 2**20:.0f} ({w['quantized'] / 2**20:.0f} + {w['float'] / 2**20:.0f})"
        acc = f"{r['accuracy']:.1%}" + (f" ({r['accuracy'] - base['accuracy']:+.1%})" if base and r is not base else "")
        fp = f"{r['fp32_prompt_accuracy']:.1%}" if "fp32_prompt_accuracy" in r else "-"
        peak = f"{r['peak_rss_mb']}" + (f" / CUDA {r['cuda_peak_mb']}" if "cuda_peak_mb" in r else "")
        print(f"| {r['scheme']} | {mem} | {peak} | {r['train_s']} | {acc} | {fp} |")
    cfg = (
        f"train {args.train_size or 'all'} rows, steps {args.steps or 'CLI default'}, dev {args.dev_size or 'all'} rows"
    )
    print(f"\n{args.model}, {cfg}, {args.num_tokens} prompt tokens, vocab init, seed 0")
    return 0


if __name__ == "__main__":
    sys.exit(main())
