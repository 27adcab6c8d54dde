"""Load benchmark of `softprompt serve`: C concurrent loopback clients over T tasks, three scheduler settings.

    python -m bench.serve_load --quick      # ~3-4 min on 2 CPU cores: T in {1, 8}, 2 interleaved rounds of 8 s
    python -m bench.serve_load              # full: T in {1, 8, 64}, 3 rounds of 20 s, plus a 60 s soak at C=64

Settings of the same server (same model, same prompts, same max batch size and wait):
  (a) mixed      mixed-task batches, per-task prompt K/V cached (the default server)
  (b) per-task   one task per batch
  (c) no-cache   mixed batches, no prompt K/V cache: the prompt runs through the model with every request
                 (what PEFT prompt tuning does)
Workloads: classification (SST-2 sentences, template "Review: {text}\\nSentiment:", verbalizer positive/negative)
and short greedy generation (--new-tokens). Prompts: --prompt-tokens rows drawn from the vocabulary embeddings,
saved with full metadata, one file per task. The server runs in-process under uvicorn on a free 127.0.0.1 port;
the clients (httpx) are bounded in count (--max-requests) and time (--window). The settings are measured in
interleaved windows (a b c a b c ...) on one server, its scheduler switched between windows, so that load from
other processes on a shared machine does not favour one setting; each window includes the drain of the requests
still in flight when it ends.

    python -m bench.serve_load --quick --routes 4   # only: a routed task (4 routes) vs one static prompt, T=1

--routes K: a routed task (softprompt.routed: K routes of --prompt-tokens tokens, a random router, so requests
take every route) against a single static prompt of --prompt-tokens tokens, both setting (a), interleaved; the
final line's routed_vs_static_throughput is their ratio (target >= 0.9).

stdout: one JSON line per scenario, then a final JSON line with mixed_vs_single_task_throughput (T=8 / T=1, (a)),
mixed_vs_per_task_batches ((a) / (b) at T=8), cache_speedup ((a) / (c) at T=8), errors and p99_ms, for
classification (top level) and generation ("generate"). stderr: progress.
torch runs on --threads threads (default 1: on a shared 2-core machine two OpenMP threads wait on each other and
small matmuls get ~10x slower).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import platform
import socket
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import torch

from bench._common import sst2_sentences
from softprompt.checkpoint import save_prompt
from softprompt.config import ModelConfig
from softprompt.models import Backbone, load_backbone
from softprompt.prompt import init_prompt
from softprompt.serve import Registry, Scheduler, create_app
from softprompt.serve.server import ServeConfig, uvicorn_config

SETTINGS = {"a": ("mixed", True), "b": ("per-task", True), "c": ("mixed", False)}
NAMES = {"a": "mixed", "b": "per-task", "c": "no-kv-cache"}


def log(msg: str) -> None:
    print(f"[serve_load {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# ---- prompts -------------------------------------------------------------------------------------------
def write_prompts(bb: Backbone, out: Path, n: int, tokens: int) -> None:
    """n classification and n generation prompt files (cls-XX, gen-XX), vocab-initialised, with full metadata."""
    base = {"base_model": bb.model_id, "architecture": bb.architecture, "family": bb.family,
            "fingerprint": bb.fingerprint, "position": "auto", "head": "lm", "init": "vocab"}  # fmt: skip
    embed = bb.model.get_input_embeddings().weight
    for i in range(n):
        p = init_prompt("vocab", tokens, embed, bb.tokenizer, seed=i)
        save_prompt(out / f"cls-{i:02d}.safetensors", p, {**base, "task": "classify",
                    "template": "Review: {text}\nSentiment:",
                    "labels": {"labels": ["negative", "positive"], "words": ["negative", "positive"]}})  # fmt: skip
        save_prompt(out / f"gen-{i:02d}.safetensors", p, {**base, "task": "generate",
                    "template": "Question: {text}\nAnswer:"})  # fmt: skip


def write_routed(bb: Backbone, out: Path, k: int, tokens: int) -> None:
    """A routed classification task rtd-00: K vocab-initialised routes and a random router (routes all taken)."""
    embed = bb.model.get_input_embeddings().weight
    routes = torch.cat([init_prompt("vocab", tokens, embed, bb.tokenizer, seed=100 + j) for j in range(k)])
    g = torch.Generator().manual_seed(0)
    router = {"routed.router.weight": torch.randn(k, bb.embed_dim, generator=g), "routed.router.bias": torch.zeros(k)}
    meta = {"base_model": bb.model_id, "architecture": bb.architecture, "family": bb.family, "fingerprint":
            bb.fingerprint, "position": "auto", "head": "lm", "init": "vocab", "task": "classify",
            "template": "Review: {text}\nSentiment:", "method": "routed", "routed": {"routes": k, "tokens": tokens},
            "labels": {"labels": ["negative", "positive"], "words": ["negative", "positive"]}}  # fmt: skip
    save_prompt(out / "rtd-00.safetensors", routes, meta, router)


# ---- server --------------------------------------------------------------------------------------------
class ServerThread:
    """uvicorn serving `app` on 127.0.0.1:<free port> in a background thread."""

    def __init__(self, app: Any) -> None:
        import uvicorn

        self.port = free_port()
        # the settings `softprompt serve` runs with: its h11 protocol (header/body timeouts, connection cap)
        config = uvicorn_config(app, ServeConfig(port=self.port, timeout_s=25), log_level="warning", access_log=False)
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> str:
        self.thread.start()
        deadline = time.monotonic() + 60
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("the server did not start")
            time.sleep(0.05)
        return f"http://127.0.0.1:{self.port}"

    def __exit__(self, *exc: Any) -> None:
        self.server.should_exit = True
        self.thread.join(60)


# ---- load ----------------------------------------------------------------------------------------------
def percentile(xs: list[float], q: float) -> float:
    if not xs:
        return float("nan")
    s = sorted(xs)
    k = max(0, min(len(s) - 1, int(round(q / 100 * len(s) + 0.5)) - 1))  # nearest rank
    return s[k]


async def run_load(base: str, kind: str, tasks: list[str], texts: list[str], clients: int, duration: float,
                   max_requests: int, new_tokens: int) -> dict[str, Any]:  # fmt: skip
    """C clients, each sending one request at a time (task and text rotating) until `duration` or `max_requests`."""
    latencies: list[float] = []
    errors: dict[str, int] = {}
    issued = 0
    stop_at = time.monotonic() + duration
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)

    async def client(cid: int, c: httpx.AsyncClient) -> None:
        nonlocal issued
        i = 0
        while time.monotonic() < stop_at and issued < max_requests:
            issued += 1
            task = tasks[(cid + i * clients) % len(tasks)]
            text = texts[(cid * 7919 + i) % len(texts)]
            i += 1
            if kind in ("classify", "routed"):
                url, body = "/v1/classify", {"task": task, "inputs": [text]}
            else:
                url, body = "/v1/generate", {"task": task, "input": text, "max_new_tokens": new_tokens}
            t0 = time.perf_counter()
            try:
                r = await c.post(url, json=body)
                code = str(r.status_code)
            except httpx.HTTPError as e:
                code = type(e).__name__
            if code == "200":
                latencies.append(time.perf_counter() - t0)
            else:
                errors[code] = errors.get(code, 0) + 1

    t_start = time.monotonic()
    async with httpx.AsyncClient(base_url=base, timeout=600, limits=limits) as c:
        await asyncio.gather(*(client(i, c) for i in range(clients)))
    elapsed = time.monotonic() - t_start
    return {
        "requests": len(latencies),
        "errors": sum(errors.values()),
        "error_codes": errors,
        "seconds": round(elapsed, 2),
        "throughput_rps": round(len(latencies) / elapsed, 3) if elapsed > 0 else 0.0,
        "p50_ms": round(percentile(latencies, 50) * 1000, 1),
        "p99_ms": round(percentile(latencies, 99) * 1000, 1),
        "latencies": latencies,
    }


async def warm(base: str, kind: str, tasks: list[str], new_tokens: int) -> None:
    """One request per task (computes and caches each task's prompt K/V before timing starts)."""
    async with httpx.AsyncClient(base_url=base, timeout=600) as c:
        for t in tasks:
            if kind in ("classify", "routed"):
                r = await c.post("/v1/classify", json={"task": t, "inputs": ["warm up"]})
            else:
                r = await c.post("/v1/generate", json={"task": t, "input": "warm up", "max_new_tokens": new_tokens})
            r.raise_for_status()


Config = tuple[str, str, int, int]  # (setting, kind, T, C)


def label(cfg: Config) -> str:
    setting, kind, T, C = cfg
    return f"{kind} ({setting}) {NAMES[setting]} T={T} C={C}"


def measure(registry: Registry, plan: list[Config], rounds: int, window: float, args: argparse.Namespace,
            texts: list[str]) -> list[dict[str, Any]]:  # fmt: skip
    """Run every configuration of `plan` for `window` seconds, `rounds` times, interleaved (a1 a8 b8 c8 a1 a8 ...),
    against one server whose scheduler settings are switched between windows (nothing in flight then). Machine
    load that drifts during the run (the CPU is shared) then affects all settings alike."""
    sched = Scheduler(registry, max_batch_size=args.max_batch_size, max_wait_ms=args.max_wait_ms,
                      max_queue=4096, timeout_s=args.timeout_s)  # fmt: skip
    app = create_app(registry, sched)
    acc: dict[Config, dict[str, Any]] = {c: {"ok": 0, "errors": {}, "seconds": 0.0, "lat": [], "rows": [],
                                             "tasks": []} for c in plan}  # fmt: skip
    with ServerThread(app) as base:
        for cfg in plan:  # warm-up: each task's prompt K/V computed and cached once, outside the timing
            setting, kind, T, _ = cfg
            sched.mode, sched.kv_cache = SETTINGS[setting]
            if sched.kv_cache:
                t0 = time.monotonic()
                asyncio.run(warm(base, kind, task_names(kind, T), args.new_tokens))
                log(f"warm-up {label(cfg)}: {time.monotonic() - t0:.0f} s")
        for r in range(rounds):
            for cfg in plan:
                setting, kind, T, C = cfg
                sched.mode, sched.kv_cache = SETTINGS[setting]
                n0 = len(sched.history)
                res = asyncio.run(run_load(base, kind, task_names(kind, T), texts, C, window, args.max_requests,
                                           args.new_tokens))  # fmt: skip
                a = acc[cfg]
                a["ok"] += res["requests"]
                a["seconds"] += res["seconds"]
                a["lat"] += res["latencies"]
                for code, n in res["error_codes"].items():
                    a["errors"][code] = a["errors"].get(code, 0) + n
                for b in list(sched.history)[n0:]:
                    if b.kind != "prefill":
                        a["rows"].append(b.rows)
                    a["tasks"].append(b.tasks)
                log(f"round {r + 1}/{rounds} {label(cfg)}: {res['requests']} ok in {res['seconds']:.1f} s, "
                    f"{sum(res['error_codes'].values())} errors")  # fmt: skip
    out = []
    for cfg in plan:
        setting, kind, T, C = cfg
        a = acc[cfg]
        res = {"setting": setting, "name": NAMES[setting], "kind": kind, "T": T, "C": C, "requests": a["ok"],
               "errors": sum(a["errors"].values()), "error_codes": a["errors"], "seconds": round(a["seconds"], 1),
               "throughput_rps": round(a["ok"] / a["seconds"], 3) if a["seconds"] else 0.0,
               "p50_ms": round(percentile(a["lat"], 50) * 1000, 1), "p99_ms": round(percentile(a["lat"], 99) * 1000, 1),
               "mean_batch_rows": round(sum(a["rows"]) / len(a["rows"]), 2) if a["rows"] else 0.0,
               "mean_batch_tasks": round(sum(a["tasks"]) / len(a["tasks"]), 2) if a["tasks"] else 0.0}  # fmt: skip
        if kind == "generate":
            res["tokens_per_s_max"] = round(res["throughput_rps"] * args.new_tokens, 2)  # if all ran to max_new_tokens
        log(f"{label(cfg)}: {res['requests']} ok, {res['errors']} errors, {res['throughput_rps']} req/s, "
            f"p50 {res['p50_ms']} ms, p99 {res['p99_ms']} ms, {res['mean_batch_rows']} rows/batch")  # fmt: skip
        print(json.dumps({"scenario": label(cfg), **res}), flush=True)
        out.append(res)
    return out


def task_names(kind: str, T: int) -> list[str]:
    prefix = {"classify": "cls", "routed": "rtd"}.get(kind, "gen")
    return [f"{prefix}-{i:02d}" for i in range(T)]


def ratio(a: float, b: float) -> float | None:
    return round(a / b, 3) if b else None


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="T in {1, 8}, 2 short rounds, no soak (~3-4 min)")
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--tasks", help="comma-separated T values (default: 1,8 quick; 1,8,64 full)")
    ap.add_argument("--clients", type=int, default=16, help="concurrent clients C")
    ap.add_argument("--window", type=float, help="seconds per measurement window (default: 8 quick, 20 full)")
    ap.add_argument("--rounds", type=int, help="interleaved rounds (default: 2 quick, 3 full)")
    ap.add_argument("--max-requests", type=int, default=100_000, help="requests per window at most")
    ap.add_argument("--prompt-tokens", type=int, default=100)
    ap.add_argument("--new-tokens", type=int, default=8, help="max_new_tokens of the generation requests")
    ap.add_argument("--max-batch-size", type=int, default=32)
    ap.add_argument("--max-wait-ms", type=float, default=10.0)
    ap.add_argument("--timeout-s", type=float, default=300.0)
    ap.add_argument("--kv-cache-mb", type=float, default=1024.0)
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    ap.add_argument("--device", default="auto", help="auto (CUDA when present), cpu, cuda, cuda:N")
    ap.add_argument("--soak-clients", type=int, default=64, help="clients of the full run's 60 s soak")
    ap.add_argument("--soak-s", type=float, default=60.0)
    ap.add_argument("--json-out", help="also write the final JSON object here")
    ap.add_argument("--routes", type=int, default=0, help="only: a routed task of K routes vs one static prompt")
    args = ap.parse_args(argv)
    Ts = [int(t) for t in (args.tasks or ("1,8" if args.quick else "1,8,64")).split(",")]
    window = args.window or (8.0 if args.quick else 20.0)
    rounds = args.rounds or (2 if args.quick else 3)
    torch.set_num_threads(args.threads)
    torch.set_grad_enabled(False)
    t_all = time.monotonic()

    bb = load_backbone(ModelConfig(model=args.model, device=args.device), progress=False)
    texts = [s for s, _ in sst2_sentences()[0] if 3 <= len(s.split()) <= 12][:2000]
    C = args.clients
    results: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="serve-load-") as tmp:
        write_prompts(bb, Path(tmp), 1 if args.routes else max(*Ts, 8), args.prompt_tokens)
        if args.routes:
            write_routed(bb, Path(tmp), args.routes, args.prompt_tokens)
        registry = Registry(bb, tmp, kv_cache_mb=args.kv_cache_mb)
        log(f"{args.model}: {len(registry)} tasks of {args.prompt_tokens} prompt tokens, torch threads {args.threads}")
        if args.routes:  # the routed task against the single static prompt, interleaved, and nothing else
            results = measure(registry, [("a", "classify", 1, C), ("a", "routed", 1, C)], rounds, window, args, texts)
            fin = {"routed_vs_static_throughput": ratio(results[1]["throughput_rps"], results[0]["throughput_rps"]),
                   "errors": sum(r["errors"] for r in results), "target": ">= 0.9",
                   "config": {"model": args.model, "routes": args.routes, "prompt_tokens": args.prompt_tokens,
                              "clients": C, "window_s": window, "rounds": rounds, "threads": args.threads,
                              "wall_s": round(time.monotonic() - t_all, 1)}, "scenarios": results}  # fmt: skip
            if args.json_out:
                Path(args.json_out).write_text(json.dumps(fin) + "\n")
            print(json.dumps(fin), flush=True)
            return 0
        cls: list[Config] = [("a", "classify", T, C) for T in Ts] + [("b", "classify", 8, C), ("c", "classify", 8, C)]
        gen: list[Config] = [("a", "generate", 8, C), ("c", "generate", 8, C)]
        if not args.quick:
            gen.insert(1, ("b", "generate", 8, C))
        results += measure(registry, cls, rounds, window, args, texts)
        results += measure(registry, gen, max(1, rounds - 1) if args.quick else rounds, window, args, texts)
        if not args.quick:  # many clients over many tasks for a minute: no errors allowed
            soak: list[Config] = [("a", "classify", max(Ts), args.soak_clients)]
            results += measure(registry, soak, 1, args.soak_s, args, texts)

    def get(setting: str, kind: str, T: int) -> float:
        for r in results:
            if (r["setting"], r["kind"], r["T"], r["C"]) == (setting, kind, T, C):
                return float(r["throughput_rps"])
        return 0.0

    def summary(kind: str) -> dict[str, Any]:
        rs = [r for r in results if r["kind"] == kind]
        out = {
            "mixed_vs_single_task_throughput": ratio(get("a", kind, 8), get("a", kind, 1)),
            "mixed_vs_per_task_batches": ratio(get("a", kind, 8), get("b", kind, 8)),
            "cache_speedup": ratio(get("a", kind, 8), get("c", kind, 8)),
            "errors": sum(r["errors"] for r in rs),
            "p99_ms": max((r["p99_ms"] for r in rs if r["setting"] == "a"), default=None),
        }
        return {k: v for k, v in out.items() if v is not None}

    final: dict[str, Any] = summary("classify")
    final["generate"] = summary("generate")
    final["errors"] = sum(r["errors"] for r in results)
    final["targets"] = {"mixed_vs_single_task_throughput": ">= 0.9", "mixed_vs_per_task_batches": ">= 3",
                        "cache_speedup": ">= 2", "errors": "0"}  # fmt: skip
    final["config"] = {"model": args.model, "quick": args.quick, "clients": C, "tasks": Ts, "window_s": window,
                       "rounds": rounds, "prompt_tokens": args.prompt_tokens, "new_tokens": args.new_tokens,
                       "max_batch_size": args.max_batch_size, "max_wait_ms": args.max_wait_ms,
                       "threads": args.threads, "cpu": platform.processor() or platform.machine(),
                       "device": str(bb.device), "wall_s": round(time.monotonic() - t_all, 1)}  # fmt: skip
    final["scenarios"] = results
    line = json.dumps(final)
    if args.json_out:
        Path(args.json_out).write_text(line + "\n")
    print(line, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
