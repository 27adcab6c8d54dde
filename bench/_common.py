"""Helpers shared by the benchmarks: fixed-length input rows, interleaved timing, memory readings, tables.

Nothing here knows about softprompt or PEFT; bench/speed.py puts the two systems side by side.
"""

from __future__ import annotations

import gc
import json
import os
import random
import resource
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

SST2_TRAIN = Path(os.environ.get("SOFTPROMPT_BENCH_SST2", "/work/shared/data/sst2/train.tsv"))


# ----- data -------------------------------------------------------------------------------------------
def sst2_sentences(path: Path = SST2_TRAIN) -> tuple[list[tuple[str, int]], str]:
    """(sentence, label) pairs of SST-2 train, in file order, and where they came from.

    When the file is absent, seeded synthetic sentences stand in (timings do not depend on the words) and the
    source says so."""
    if path.is_file():
        pairs = []
        for line in path.read_text(encoding="utf-8").splitlines()[1:]:
            text, _, label = line.rpartition("\t")
            if text.strip() and label.strip() in ("0", "1"):
                pairs.append((text.strip(), int(label)))
        if pairs:
            return pairs, f"SST-2 ({path})"
    rng = random.Random(0)
    words = (
        "the a film movie story plot actors acting director script scenes music ending characters is was "
        "not very quite rather too so and but with without good bad great dull funny boring moving clever "
        "charming tedious beautiful awkward sharp flat warm cold smart silly"
    ).split()
    pairs = [(" ".join(rng.choice(words) for _ in range(rng.randint(8, 30))), i % 2) for i in range(2000)]
    return pairs, f"synthetic text (SST-2 not found at {path}; set SOFTPROMPT_BENCH_SST2 to point at train.tsv)"


def fixed_length_rows(
    encode: Callable[[str], list[int]],
    sentences: list[tuple[str, int]],
    n: int,
    length: int,
) -> tuple[list[list[int]], list[int]]:
    """`n` rows of exactly `length` token ids, and their labels (the first sentence's).

    `encode(body)` returns the ids of the filled template. Consecutive sentences are joined into one body until
    the encoded template reaches `length` ids; the body is then cut in the middle so that the row keeps the
    template's head and its tail (the ids after the body, e.g. "\\nSentiment:" or "[SEP]") intact. All rows
    having one length, no row is padded: every system sees identical, unpadded inputs.
    """
    tail = _common_suffix(encode("alpha beta"), encode("gamma delta epsilon"))
    rows: list[list[int]] = []
    labels: list[int] = []
    i = 0
    while len(rows) < n:
        body, label = sentences[i % len(sentences)]
        i += 1
        ids = encode(body)
        while len(ids) < length:
            body += " " + sentences[i % len(sentences)][0]
            i += 1
            ids = encode(body)
        rows.append(ids[: length - tail] + ids[len(ids) - tail :])
        labels.append(label)
    return rows, labels


def _common_suffix(a: list[int], b: list[int]) -> int:
    k = 0
    while k < min(len(a), len(b)) and a[-1 - k] == b[-1 - k]:
        k += 1
    return k


# ----- timing -----------------------------------------------------------------------------------------
@dataclass
class Timings:
    """Wall-clock seconds per call of each system, measured in interleaved rounds (A B A B ...)."""

    times: dict[str, list[float]] = field(default_factory=dict)

    def median(self, name: str) -> float:
        return statistics.median(self.times[name])

    def ratio(self, num: str, den: str) -> float:
        """Ratio of medians: median(num) / median(den)."""
        return self.median(num) / self.median(den)

    def pair_ratios(self, num: str, den: str) -> list[float]:
        """num / den within each round: how stable the ratio is while the machine's load changes."""
        return [a / b for a, b in zip(self.times[num], self.times[den])]


def interleaved(systems: dict[str, Callable[[], object]], rounds: int, warmup: int) -> Timings:
    """Run every system once per round, in turn, `warmup` untimed rounds then `rounds` timed ones.

    Interleaving spreads any drift in machine load (other processes, CPU frequency) evenly over the systems,
    which a block of A runs followed by a block of B runs would not. gc runs before each timed call, outside it.
    """
    out = Timings({name: [] for name in systems})
    for r in range(warmup + rounds):
        for name, fn in systems.items():
            gc.collect()
            t0 = time.perf_counter()
            fn()
            dt = time.perf_counter() - t0
            if r >= warmup:
                out.times[name].append(dt)
    return out


# ----- memory -----------------------------------------------------------------------------------------
def peak_rss_bytes() -> int:
    """Peak resident set size of this process so far.

    Linux: VmHWM from /proc/self/status. Not getrusage's ru_maxrss: Linux carries ru_maxrss over fork and exec,
    so a subprocess started by a large parent reports at least the parent's size. Elsewhere: ru_maxrss (KiB on
    Linux, bytes on macOS)."""
    hwm = _proc_status("VmHWM:")
    if hwm is not None:
        return hwm
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak) if sys.platform == "darwin" else int(peak) * 1024


def rss_bytes() -> int:
    """Current resident set size (Linux /proc; elsewhere the peak, the best available)."""
    rss = _proc_status("VmRSS:")
    return rss if rss is not None else peak_rss_bytes()


def _proc_status(field: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def mib(n: float) -> str:
    return f"{n / 2**20:,.0f} MiB"


# ----- output -----------------------------------------------------------------------------------------
def print_table(title: str, header: list[str], rows: list[list[str]] | None = None) -> None:
    """A markdown table header (and any rows); more rows follow with `print_row` as results come."""
    print(f"\n### {title}\n", flush=True)
    print("| " + " | ".join(header) + " |")
    print("|" + "|".join("---" if i == 0 else "---:" for i in range(len(header))) + "|", flush=True)
    for r in rows or []:
        print_row(r)


def print_row(cells: list[str]) -> None:
    print("| " + " | ".join(cells) + " |", flush=True)


def spread(ratios: list[float]) -> str:
    """Median and range of per-round ratios, e.g. '2.81 (2.70-2.95)'."""
    if not ratios:
        return "-"
    return f"{statistics.median(ratios):.2f} ({min(ratios):.2f}-{max(ratios):.2f})"


def note(msg: str) -> None:
    """Progress and check lines: to stderr, so stdout stays the table and the final JSON line."""
    print(msg, file=sys.stderr, flush=True)


class ResultLog:
    """A study's finished runs: its record (bench/results/<study>.jsonl, committed), one JSON object per run keyed by
    its "name", so a rerun skips what is done and an interrupted study, or one on a new machine, resumes. `record`
    appends (and prints) a run as soon as it finishes."""

    def __init__(self, path: Path) -> None:
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        self.done: dict[str, dict[str, Any]] = {}
        if path.exists():
            for line in path.read_text().splitlines():
                r = json.loads(line)
                self.done[r["name"]] = r

    def record(self, r: dict[str, Any], *, hide: tuple[str, ...] = ()) -> dict[str, Any]:
        self.done[r["name"]] = r
        with open(self.path, "a") as f:
            f.write(json.dumps(r) + "\n")
        print(json.dumps({k: v for k, v in r.items() if k not in hide}), flush=True)
        return r
