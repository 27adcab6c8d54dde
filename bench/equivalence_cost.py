"""What the load-time equivalence guard costs, side by side with what it guards (softprompt.arch).

    python -m bench.equivalence_cost [--model smollm2-135m] [--rounds 5] [--threads 2]

Per dtype / quantization of the backbone: the backbone's load time, the guard's time (median of `rounds` fresh
runs; the first run of a process is reported apart: it includes one-time kernel warm-up), the time of one plain
forward of the probe's longest row for scale, the guard / load ratio, the cached second call, and the measured
relative difference against its tolerance. Ends with one JSON line.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--variants", default="float32/none,bfloat16/none,float32/int8")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    from softprompt.arch import PROBE_TEXTS, tolerance
    from softprompt.config import ModelConfig
    from softprompt.models import load_backbone
    from softprompt.prompted import PromptedModel

    results = []
    for variant in args.variants.split(","):
        dtype, quant = variant.split("/")
        cfg = ModelConfig(model=args.model, device="cpu", dtype=dtype, quantize=quant, skip_equivalence_check=True)
        t0 = time.perf_counter()
        bb = load_backbone(cfg, progress=False)
        load_s = time.perf_counter() - t0
        bb.skip_equivalence_check = False
        times = []
        for _ in range(args.rounds + 1):
            bb.verified.clear()
            t0 = time.perf_counter()
            PromptedModel(bb)
            times.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        PromptedModel(bb)  # cached: the guard does not run again for this backbone
        cached_s = time.perf_counter() - t0
        ids = torch.tensor([bb.tokenizer(PROBE_TEXTS[0])["input_ids"]])
        with torch.no_grad():
            fwd = []
            for _ in range(3):
                t0 = time.perf_counter()
                bb.model(input_ids=ids)
                fwd.append(time.perf_counter() - t0)
        guard_s = statistics.median(times[1:])
        row = {
            "variant": variant,
            "load_s": round(load_s, 3),
            "guard_first_s": round(times[0], 3),
            "guard_s": round(guard_s, 3),
            "forward_s": round(min(fwd), 4),
            "guard_over_load": round(guard_s / load_s, 3),
            "cached_ms": round(cached_s * 1000, 2),
            "difference": float(f"{next(iter(bb.verified.values())):.3g}"),
            "tolerance": tolerance(bb.model),
        }
        results.append(row)
        print(
            f"{variant:16} load {load_s:6.2f} s  guard {guard_s * 1000:6.0f} ms (first {times[0] * 1000:.0f} ms)"
            f"  one forward {min(fwd) * 1000:5.0f} ms  guard/load {guard_s / load_s:.2f}"
            f"  cached {cached_s * 1000:.1f} ms"
            f"  difference {row['difference']:.2e} (tolerance {row['tolerance']:g})",
            flush=True,
        )
    print(json.dumps({"model": args.model, "threads": args.threads, "results": results}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
