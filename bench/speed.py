"""Speed benchmark: softprompt vs PEFT prompt tuning, side by side in one process.

    python -m bench.speed --quick            # ~5 min on 2 quiet cores: fewer rounds, fewer steps
    python -m bench.speed                    # the full run (~15 min on 2 quiet cores)
    python -m bench.speed --only train,gen   # some parts: train infer gen mem encoder (and profile, not in a run)
    python -m bench.speed --json-out r.json  # also write the final JSON object to a file

Both systems get the same frozen weights (PEFT on its own copy), the same input ids, batch, prompt values and
number of steps; their losses/scores are checked equal before anything is timed. Timed calls alternate
(A B A B ...), and each comparison reports both medians, the ratio of medians and the spread of the
per-round ratios. stdout: markdown tables as results come, then one JSON line. stderr: progress.
docs/performance.md explains the method and how to read the output.
"""

# The two systems, their shared set-up and the equality checks are in bench/speed_systems.py; this file holds
# the measurements (one function per item), the targets and the CLI that runs them and prints the report.

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
import warnings
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import torch

from bench._common import (
    interleaved,
    mib,
    note,
    peak_rss_bytes,
    print_row,
    print_table,
    rss_bytes,
    spread,
)
from bench.speed_systems import (
    CAUSAL_MODEL,
    ENCODER_MODEL,
    INPUT_LEN,
    TOL,
    Checks,
    Peft,
    Setup,
    Softprompt,
    loss_check,
)

TRAIN_CONFIGS = [(20, 8), (100, 8), (100, 32)]  # (prompt tokens, batch)
FWD_CONFIG = (100, 8)  # training step / forward, item 2
INFER_CONFIG = (100, 32)  # classification latency, item 3
GEN_PROMPT, GEN_NEW = 100, 32  # generation, item 4
MEM_CONFIG = (100, 32)  # peak memory, item 5
PARTS = ("train", "infer", "gen", "mem", "encoder")


@dataclass(frozen=True)
class Mode:
    warmup: int  # untimed rounds
    rounds: int  # timed rounds (each runs every system once)
    mem_steps: int  # training steps in each memory subprocess
    gen_batches: tuple[int, ...]


MODES = {
    # quick: a check that everything runs and agrees, with rough ratios; the peak RSS is reached in the first step
    "quick": Mode(warmup=1, rounds=2, mem_steps=1, gen_batches=(8,)),
    "full": Mode(warmup=1, rounds=7, mem_steps=3, gen_batches=(1, 8)),
}


# ----- measurements ----------------------------------------------------------------------------------------
def run_train(setup: Setup, mode: Mode, res: dict[str, Any], checks: Checks, configs: list[tuple[int, int]]) -> None:
    """Items 1 and 2: training step time vs PEFT, and softprompt's training step / forward."""
    print_table(
        f"Training step, {CAUSAL_MODEL}, inputs {INPUT_LEN} tokens (seconds per step, median)",
        ["prompt x batch", "softprompt", "PEFT", "speedup", "per-round", "loss sp / PEFT", "diff"],
    )
    for P, B in configs:
        note(f"train P={P} B={B}")
        sp, pf, r = setup.causal_pair(P, B)
        assert pf is not None
        a, b = loss_check(sp, pf, r)
        diff = checks.record(f"train_loss_p{P}_b{B}", abs(a - b))
        t = interleaved({"sp": partial(sp.train_step, r), "peft": partial(pf.train_step, r)}, mode.rounds, mode.warmup)
        key = f"p{P}_b{B}"
        res[f"train_speedup_{key}"] = t.ratio("peft", "sp")
        res["medians_s"][f"train_{key}_softprompt"] = t.median("sp")
        res["medians_s"][f"train_{key}_peft"] = t.median("peft")
        print_row(
            [
                f"{P} x {B}",
                f"{t.median('sp'):.3f}",
                f"{t.median('peft'):.3f}",
                f"**{t.ratio('peft', 'sp'):.2f}x**",
                spread(t.pair_ratios("peft", "sp")),
                f"{a:.5f} / {b:.5f}",
                diff,
            ]
        )
        del sp, pf, r

    P, B = FWD_CONFIG
    note(f"train / forward P={P} B={B}")
    sp, _, r = setup.causal_pair(P, B, peft=False)
    t = interleaved({"train": partial(sp.train_step, r), "fwd": partial(sp.forward, r)}, mode.rounds, mode.warmup)
    res["train_over_forward"] = t.ratio("train", "fwd")
    res["medians_s"][f"train_p{P}_b{B}_softprompt_step"] = t.median("train")
    res["medians_s"][f"forward_p{P}_b{B}_softprompt"] = t.median("fwd")
    print_table(
        f"softprompt training step / forward (no_grad), prompt {P}, batch {B} (seconds, median)",
        ["prompt x batch", "train step", "forward", "train / forward", "per-round"],
    )
    print_row(
        [
            f"{P} x {B}",
            f"{t.median('train'):.3f}",
            f"{t.median('fwd'):.3f}",
            f"**{t.ratio('train', 'fwd'):.2f}**",
            spread(t.pair_ratios("train", "fwd")),
        ]
    )


def run_infer(setup: Setup, mode: Mode, res: dict[str, Any], checks: Checks) -> None:
    """Item 3: classification latency per batch, 100-token prompt (K/V cached) vs no prompt vs PEFT."""
    P, B = INFER_CONFIG
    note(f"infer P={P} B={B}")
    sp, pf, r = setup.causal_pair(P, B)
    assert pf is not None
    with_prompt, no_prompt = sp.cached_prefix(True), sp.cached_prefix(False)  # outside the timed region
    diff = checks.record("infer_scores", float((sp.scores(r, with_prompt) - pf.scores(r)).abs().max()))
    t = interleaved(
        {
            "prompt": partial(sp.scores, r, with_prompt),
            "none": partial(sp.scores, r, no_prompt),
            "peft": partial(pf.scores, r),
        },
        mode.rounds,
        mode.warmup,
    )
    res["infer_prompt_overhead"] = t.ratio("prompt", "none")
    res["infer_speedup_vs_peft"] = t.ratio("peft", "prompt")
    for k, v in (("softprompt_prompt", "prompt"), ("softprompt_no_prompt", "none"), ("peft", "peft")):
        res["medians_s"][f"infer_p{P}_b{B}_{k}"] = t.median(v)
    print_table(
        f"Classification latency, {CAUSAL_MODEL}, batch {B} x {INPUT_LEN} tokens (seconds per batch, median)",
        [
            "system",
            "latency",
            "vs no prompt",
            "per-round",
            "PEFT speedup vs this",
            "per-round",
            "max score diff vs PEFT",
        ],
    )
    print_row(
        [
            f"softprompt, {P}-token prompt (K/V cached)",
            f"{t.median('prompt'):.3f}",
            f"**{t.ratio('prompt', 'none'):.3f}**",
            spread(t.pair_ratios("prompt", "none")),
            f"**{t.ratio('peft', 'prompt'):.2f}x**",
            spread(t.pair_ratios("peft", "prompt")),
            diff,
        ]
    )
    print_row(["softprompt, no prompt", f"{t.median('none'):.3f}", "1.000", "-", "-", "-", "-"])
    print_row(
        [
            f"PEFT, {P}-token prompt",
            f"{t.median('peft'):.3f}",
            f"{t.ratio('peft', 'none'):.3f}",
            spread(t.pair_ratios("peft", "none")),
            "1.00x",
            "-",
            "-",
        ]
    )


def run_gen(setup: Setup, mode: Mode, res: dict[str, Any], checks: Checks) -> None:
    """Item 4: greedy generation throughput, 100-token prompt (K/V cached), vs PEFT."""
    print_table(
        f"Greedy generation, {CAUSAL_MODEL}, {GEN_PROMPT}-token prompt, {INPUT_LEN}-token inputs, "
        f"{GEN_NEW} new tokens (new tokens / s, median)",
        ["batch", "softprompt", "PEFT", "speedup", "per-round", "same tokens", "PEFT path"],
    )
    for B in mode.gen_batches:
        note(f"generate P={GEN_PROMPT} B={B}")
        sp, pf, r = setup.causal_pair(GEN_PROMPT, B)
        assert pf is not None
        prefix = sp.cached_prefix(True)
        if not pf.check_native_generate(r):
            note("PEFT's own generate is wrong with this transformers version (it re-feeds the prompt at every step);")
            note("  timing PEFT's prompt + input embeddings through the base model's generate instead")
        res["gen_peft_native_generate"] = pf.native_generate
        same = float((sp.generate(r, prefix, GEN_NEW) == pf.generate(r, GEN_NEW)).float().mean())
        t = interleaved(
            {"sp": partial(sp.generate, r, prefix, GEN_NEW), "peft": partial(pf.generate, r, GEN_NEW)},
            mode.rounds,
            mode.warmup,
        )
        n = B * GEN_NEW
        res["medians_s"][f"gen_p{GEN_PROMPT}_b{B}_softprompt"] = t.median("sp")
        res["medians_s"][f"gen_p{GEN_PROMPT}_b{B}_peft"] = t.median("peft")
        res[f"gen_speedup_vs_peft_b{B}"] = t.ratio("peft", "sp")
        if B == max(mode.gen_batches):
            res["gen_speedup_vs_peft"] = t.ratio("peft", "sp")
            res["gen_same_tokens"] = same
        print_row(
            [
                str(B),
                f"{n / t.median('sp'):.1f}",
                f"{n / t.median('peft'):.1f}",
                f"**{t.ratio('peft', 'sp'):.2f}x**",
                spread(t.pair_ratios("peft", "sp")),
                f"{same:.1%}",
                "peft_model.generate" if pf.native_generate else "prompt embeds + base generate (see docs)",
            ]
        )
        del sp, pf, r


def run_mem(mode: Mode, res: dict[str, Any]) -> None:
    """Item 5: peak RSS of a training run, each system alone in a fresh subprocess."""
    P, B = MEM_CONFIG
    print_table(
        f"Peak resident memory, training {mode.mem_steps} steps, {CAUSAL_MODEL}, prompt {P}, batch {B}",
        ["system", "RSS after load", "peak RSS", "peak - after load (training working set)"],
    )
    got = {}
    for system in ("softprompt", "peft"):
        note(f"memory: {system} subprocess")
        cmd = [sys.executable, "-m", "bench.speed", "--_mem-worker", system, "--_steps", str(mode.mem_steps)]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            note(f"memory worker {system} failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
            print_row([system, "failed", "-", "-"])
            return
        got[system] = json.loads(proc.stdout.strip().splitlines()[-1])
        g = got[system]
        print_row([system, mib(g["rss_after_load"]), mib(g["peak"]), mib(g["peak"] - g["rss_after_load"])])
    sp, pf = got["softprompt"], got["peft"]
    res["peak_mem_ratio_vs_peft"] = sp["peak"] / pf["peak"]
    res["train_working_set_ratio_vs_peft"] = (sp["peak"] - sp["rss_after_load"]) / (pf["peak"] - pf["rss_after_load"])
    res["memory_bytes"] = got
    print_row(
        [
            "**softprompt / PEFT**",
            "",
            f"**{res['peak_mem_ratio_vs_peft']:.2f}**",
            f"{res['train_working_set_ratio_vs_peft']:.2f}",
        ]
    )


def mem_worker(system: str, steps: int) -> None:
    """Subprocess body of run_mem: load, measure RSS, train `steps` steps, print one JSON line."""
    setup = Setup()
    P, B = MEM_CONFIG
    sp, pf, r = setup.causal_pair(P, B, peft=False)
    runner: Softprompt | Peft = sp
    if system == "peft":  # PEFT wraps the loaded model itself: one copy of the weights in this process too
        runner = Peft(sp.pm.model, "CAUSAL_LM", sp.prompt.detach(), sp.label_ids, sp.pm.pad_id)
        del sp
    import gc

    gc.collect()
    after_load, peak_load = rss_bytes(), peak_rss_bytes()
    for _ in range(steps):
        runner.train_step(r)
    print(json.dumps({"rss_after_load": after_load, "peak_after_load": peak_load, "peak": peak_rss_bytes()}))


def run_encoder(setup: Setup, mode: Mode, res: dict[str, Any], checks: Checks, configs: list[tuple[int, int]]) -> None:
    """Item 6: the training comparison for an encoder (concatenation path, linear head on mean-pooled output)."""
    print_table(
        f"Training step, {ENCODER_MODEL} (encoder, concatenation path), inputs {INPUT_LEN} tokens "
        "(seconds per step, median)",
        ["prompt x batch", "softprompt", "PEFT", "speedup", "per-round", "loss sp / PEFT", "diff"],
    )
    for P, B in configs:
        note(f"encoder P={P} B={B}")
        sp, pf, r = setup.encoder_pair(P, B)
        assert pf is not None
        a, b = loss_check(sp, pf, r)
        diff = checks.record(f"encoder_loss_p{P}_b{B}", abs(a - b))
        t = interleaved({"sp": partial(sp.train_step, r), "peft": partial(pf.train_step, r)}, mode.rounds, mode.warmup)
        key = f"p{P}_b{B}"
        res[f"encoder_train_speedup_{key}"] = t.ratio("peft", "sp")
        res["medians_s"][f"encoder_train_{key}_softprompt"] = t.median("sp")
        res["medians_s"][f"encoder_train_{key}_peft"] = t.median("peft")
        print_row(
            [
                f"{P} x {B}",
                f"{t.median('sp'):.4f}",
                f"{t.median('peft'):.4f}",
                f"**{t.ratio('peft', 'sp'):.2f}x**",
                spread(t.pair_ratios("peft", "sp")),
                f"{a:.5f} / {b:.5f}",
                diff,
            ]
        )
        del sp, pf, r
    last = configs[-1]
    res["encoder_train_speedup"] = res[f"encoder_train_speedup_p{last[0]}_b{last[1]}"]


def run_profile(setup: Setup, P: int, B: int) -> None:
    """Where one softprompt training step spends its time (not part of a benchmark run)."""
    from torch.profiler import ProfilerActivity, profile, record_function

    sp, _, r = setup.causal_pair(P, B, peft=False)
    layers = sp.pm.model.model.layers
    spent = {"layers": 0.0}
    starts: dict[int, float] = {}
    for layer in layers:
        layer.register_forward_pre_hook(lambda m, a: starts.__setitem__(id(m), time.perf_counter()))
        layer.register_forward_hook(
            lambda m, a, o: spent.__setitem__("layers", spent["layers"] + time.perf_counter() - starts[id(m)])
        )
    sp.train_step(r)  # warm-up
    spent["layers"] = 0.0
    parts: dict[str, float] = {}
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        t0 = time.perf_counter()
        with record_function("build_prefix"):
            prefix = sp.pm.build_prefix([sp.prompt])
        t1 = time.perf_counter()
        parts["prefix forward: decoder layers"] = spent["layers"]
        spent["layers"] = 0.0
        with record_function("batch_forward"):
            loss = sp.pm.loss(prefix, r.sp, sp.label_ids)
        t2 = time.perf_counter()
        parts["batch forward: decoder layers"] = spent["layers"]
        with record_function("backward"):
            loss.backward()
        t3 = time.perf_counter()
        sp.opt.step()
        sp.opt.zero_grad(set_to_none=True)
        t4 = time.perf_counter()
    parts["prefix forward: outside layers"] = t1 - t0 - parts["prefix forward: decoder layers"]
    parts["batch forward: outside layers"] = t2 - t1 - parts["batch forward: decoder layers"]
    parts["backward (prefix and batch)"] = t3 - t2
    parts["optimizer step"] = t4 - t3
    print_table(f"Profile of one softprompt training step, prompt {P}, batch {B}", ["part", "seconds", "share"])
    for k, v in parts.items():
        print_row([k, f"{v:.3f}", f"{v / (t4 - t0):.1%}"])
    print_row(["total", f"{t4 - t0:.3f}", "100%"])
    print("\n```\n" + prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=20) + "\n```", flush=True)


# ----- main ------------------------------------------------------------------------------------------------
KEYS = [
    "train_speedup_p20_b8",
    "train_speedup_p100_b8",
    "train_speedup_p100_b32",
    "train_over_forward",
    "infer_prompt_overhead",
    "infer_speedup_vs_peft",
    "gen_speedup_vs_peft",
    "peak_mem_ratio_vs_peft",
    "encoder_train_speedup",
]
TARGETS = {  # key: (comparison, bound), from the issue
    "train_speedup_p100_b32": (">=", 4.0),
    "train_speedup_p100_b8": (">=", 2.5),
    "train_speedup_p20_b8": (">=", 1.3),
    "train_over_forward": ("<=", 2.3),
    "infer_prompt_overhead": ("<=", 1.10),
    "peak_mem_ratio_vs_peft": ("<=", 1.0),
    "encoder_train_speedup": (">=", 1.0),
}


def parse_configs(text: str) -> list[tuple[int, int]]:
    out = []
    for part in text.split(","):
        p, _, b = part.strip().partition("x")
        out.append((int(p), int(b)))
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="fewer rounds and steps (a check, not a measurement)")
    ap.add_argument("--only", action="append", default=[], help=f"comma-separated parts: {' '.join(PARTS)}, profile")
    ap.add_argument("--json-out", help="also write the final JSON object to this file")
    ap.add_argument("--rounds", type=int, help="timed rounds per comparison (overrides the mode)")
    ap.add_argument("--warmup", type=int, help="untimed rounds per comparison (overrides the mode)")
    ap.add_argument(
        "--train-configs",
        default=",".join(f"{p}x{b}" for p, b in TRAIN_CONFIGS),
        help="prompt tokens x batch for the training comparisons (default: %(default)s)",
    )
    ap.add_argument("--_mem-worker", dest="mem_worker", help=argparse.SUPPRESS)
    ap.add_argument("--_steps", dest="steps", type=int, default=2, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)

    warnings.filterwarnings("ignore")
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    if args.mem_worker:
        mem_worker(args.mem_worker, args.steps)
        return 0

    mode = MODES["quick" if args.quick else "full"]
    mode = Mode(
        args.warmup if args.warmup is not None else mode.warmup,
        args.rounds if args.rounds is not None else mode.rounds,
        mode.mem_steps,
        mode.gen_batches,
    )
    parts = [p.strip() for o in args.only for p in o.split(",") if p.strip()] or list(PARTS)
    unknown = set(parts) - set(PARTS) - {"profile"}
    if unknown:
        ap.error(f"--only: unknown part(s) {sorted(unknown)}; choose from {' '.join(PARTS)} profile")
    configs = parse_configs(args.train_configs)

    setup = Setup()
    t_start = time.perf_counter()
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0
    res: dict[str, Any] = {k: None for k in KEYS}
    res["medians_s"] = {}
    checks = Checks()
    print(f"# softprompt speed benchmark ({'quick' if args.quick else 'full'})\n")
    print(
        f"`{' '.join(['python', '-m', 'bench.speed', *sys.argv[1:]])}` - torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads, {os.cpu_count()} CPUs, {platform.processor() or platform.machine()}; "
        f"data: {setup.data_source}; {mode.warmup} warm-up + {mode.rounds} timed rounds, systems alternating; "
        f"load average {load:.1f} at start."
    )
    if load > 0.5 * (os.cpu_count() or 1):
        print(
            f"\n**Warning: the machine is busy (load {load:.1f} on {os.cpu_count()} CPUs).** Timings are not "
            "representative: torch's threads wait for each other at every op when the CPUs are shared."
        )
    if "mem" in parts:  # first: the subprocesses then start from a parent that holds no model yet
        run_mem(mode, res)
    if "train" in parts:
        run_train(setup, mode, res, checks, configs)
    if "infer" in parts:
        run_infer(setup, mode, res, checks)
    if "gen" in parts:
        run_gen(setup, mode, res, checks)
    if "encoder" in parts:
        run_encoder(setup, mode, res, checks, configs)
    if "profile" in parts:
        run_profile(setup, *configs[-1])  # the last training configuration: 100 x 32 by default

    print_table("Targets", ["key", "value", "target", "met"])
    for key in KEYS:
        v = res[key]
        op, bound = TARGETS.get(key, ("", None))
        met = "-" if v is None or bound is None else ("yes" if (v >= bound if op == ">=" else v <= bound) else "**no**")
        print_row([f"`{key}`", "-" if v is None else f"{v:.2f}", f"{op} {bound}" if bound is not None else "", met])
    res["checks"] = {"tolerance": TOL, "ok": checks.ok, "max_abs_diff": checks.results}
    res["meta"] = {
        "mode": "quick" if args.quick else "full",
        "warmup": mode.warmup,
        "rounds": mode.rounds,
        "parts": parts,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "cpus": os.cpu_count(),
        "input_len": INPUT_LEN,
        "data": setup.data_source,
        "load_avg_start": load,
        "load_avg_end": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
        "wall_s": round(time.perf_counter() - t_start, 1),
    }
    if not checks.ok:
        print("\n**equality check failed**: the two systems did not compute the same thing; see the diff columns.")
    line = json.dumps(res)
    print()
    print(line, flush=True)
    if args.json_out:
        Path(args.json_out).write_text(line + "\n")
    return 0 if checks.ok else 1


if __name__ == "__main__":
    sys.exit(main())
