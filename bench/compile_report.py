"""bench/results/compile.jsonl (python -m bench.compile) -> docs/results-compile.md, the results page's section
"Prompts, ICL, prompt tuning, LoRA" (bench.quality_report appends it to docs/results.md).

    python -m bench.compile_report [--results bench/results/compile.jsonl] [--out docs/results-compile.md]

One table per task with every method's accuracy, trainable parameters, checkpoint bytes, training time per step,
peak memory, per-example latency (and its ratio to the zero-shot model timed alongside it in the same run) and
per-task key/value bytes; then each of the issue's targets, met or missed, from these numbers only. A method that
was not run is listed as such; a run that trained fewer steps than the others (full fine-tuning on a CPU budget)
reports its timing and memory, not an accuracy.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
TITLE = "# Prompts, ICL, prompt tuning, LoRA"
TASK_NAMES = {"sst2": "SST-2", "agnews": "AG News", "rte": "RTE"}
ROWS = [  # (method key, label)
    ("zero", "zero-shot (template only)"),
    ("instr", "hand-written instructions (k = 0)"),
    ("icl4", "ICL, k = 4 (cached K/V)"),
    ("icl8", "ICL, k = 8 (cached K/V)"),
    ("icl16", "ICL, k = 16 (cached K/V)"),
    ("icl16-uncached", "ICL, k = 16, no context cache"),
    ("icl16-long", "ICL, k = 16 long demonstrations (cached K/V)"),
    ("icl16-long-uncached", "ICL, k = 16 long demonstrations, no context cache"),
    ("pt", "prompt tuning"),
    ("pt-long", "prompt tuning, more rows and steps"),
    ("pt-deep", "deep prompt tuning (per-layer K/V from the instructions, labels)"),
    ("pt-deep-long", "deep prompt tuning, more rows and steps"),
    ("distill", "prompt distilled from the 16-shot context"),
    ("distill-sharp", "the same, teacher sharpened (--teacher-temperature)"),
    ("distill-deep", "a deep prompt (per-layer K/V) distilled, sharpened teacher"),
    ("distill-deep-long", "the same deep student, more inputs and steps"),
    ("distill-deep-longer", "the same deep student, twice those inputs and steps"),
    ("distill-deep-hard", "the same deep student, more inputs and steps, teacher near its argmax"),
    (
        "distill-deep-boundary",
        "the same deep student, more inputs and steps, half near the teacher's boundary",
    ),
    ("distill-deep-sent", "the same deep student, more inputs and steps, whole-sentence inputs"),
    ("distill-deep-soft", "the same deep student, more inputs and steps, teacher at T = 1"),
    ("distill-deep-fast", "the same deep student, more inputs and steps, 3× the peak lr"),
    ("distill-deep-self", "the same deep student, more inputs and steps, inputs the model wrote (self-study)"),
    ("distill-deep-vocab", "the same deep student, more inputs and steps, + the whole-vocabulary KL (--vocab-kl)"),
    ("distill-deep-input", "the same deep student, more inputs and steps, + that KL at every input position"),
    ("distill-deep-anchors", "the same deep student, more inputs and steps, started from the teacher's label-word K/V"),
    ("distill-deep-pos", "the same deep student, more inputs and steps, the input at its teacher's positions"),
    ("distill-deep-pos-anchors", "the same, the input at its teacher's positions, started from its label-word K/V"),
    ("distill-deep-epochs", "the same deep student, more inputs, 4 epochs over them (4× the steps)"),
    ("distill-deep-batch", "the same deep student, more inputs and steps, 4× the batch (4 epochs)"),
    ("distill-deep-data", "the same deep student, 4× the inputs, seen once in batches 4× as large"),
    ("distill-deep-batch-more", "the same deep student, 2× the inputs, 4 epochs in batches 4× as large"),
    ("distill-deep-data-twice", "the same deep student, 4× the inputs, 2 epochs in batches 4× as large"),
    ("distill-deep-reparam", "the same deep student, more inputs and steps, trained through an MLP (--deep-reparam)"),
    ("distill-deep-alpha", "the same deep student, more inputs and steps, + the labelled loss (--alpha)"),
    ("distill-deep-best", "the same deep student distilled from the best ICL context"),
    ("lora", "LoRA, rank 8, q/k/v/o (PEFT)"),
    ("lora-long", "LoRA, more rows and steps"),
    ("ft", "full fine-tuning (AdamW, all weights)"),
    ("ft-long", "full fine-tuning, more rows and steps"),
    ("minilm-pt", "minilm-l6 (encoder): prompt tuning, linear head"),
    ("minilm-ft", "minilm-l6: full fine-tuning + linear head"),
    ("minilm-lora", "minilm-l6: LoRA, rank 8, attention projections (PEFT) + linear head"),
    ("minilm-pt-long", "minilm-l6: prompt tuning, linear head, more rows and steps"),
    ("minilm-ft-long", "minilm-l6: full fine-tuning + linear head, more rows and steps"),
    ("minilm-lora-long", "minilm-l6: LoRA + linear head, more rows and steps"),
]
DISTILLED = ("distill", "distill-sharp", "distill-deep", "distill-deep-long", "distill-deep-longer",
             "distill-deep-sent", "distill-deep-hard", "distill-deep-boundary", "distill-deep-soft",
             "distill-deep-vocab", "distill-deep-self", "distill-deep-fast",
             "distill-deep-input", "distill-deep-anchors", "distill-deep-pos",
             "distill-deep-pos-anchors", "distill-deep-epochs", "distill-deep-batch",
             "distill-deep-reparam", "distill-deep-data", "distill-deep-batch-more",
             "distill-deep-data-twice", "distill-deep-alpha")  # fmt: skip
HEADER = ["method", "accuracy %", "trainable params", "checkpoint bytes", "train s/step", "peak RSS MiB",
          "latency ms/example", "× zero-shot", "per-task K/V bytes"]  # fmt: skip


def load(path: Path) -> dict[str, dict[str, Any]]:
    """The last record of each run name (a rerun of a run replaces it)."""
    out: dict[str, dict[str, Any]] = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.strip():
            r = json.loads(line)
            out[r["name"]] = r
    return out


def seeds(res: dict[str, dict[str, Any]], name: str) -> list[dict[str, Any]]:
    """The run `name` (seed 0) and its repeats with other seeds (NAME@sS, bench.compile --seed S), seed order."""
    runs = [r for k, r in res.items() if k == name or k.startswith(name + "@s")]
    return sorted(runs, key=lambda r: int(r.get("seed", 0)))


def widths(res: dict[str, dict[str, Any]], name: str) -> list[str]:
    """The run `name` repeated with other prompt sizes (bench.compile --tokens N: NAME@tN, seed 0), by size."""
    found = [k for k in res if k.startswith(name + "@t") and "@s" not in k]
    return sorted(found, key=lambda k: int(k.split("@t")[1]))


def mean(runs: list[dict[str, Any]], key: str) -> float:
    return sum(r[key] for r in runs) / len(runs)


def spread(runs: list[dict[str, Any]], key: str) -> str:
    """ "; seeds 0, 1, 2: 87.5 / 86.0 / 88.0, mean 87.2" for more than one seed, else "" """
    if len(runs) < 2:
        return ""
    ids = ", ".join(str(r.get("seed", 0)) for r in runs)
    return f"; seeds {ids}: {' / '.join(f'{r[key]:.1f}' for r in runs)}, mean {mean(runs, key):.1f}"


def over_seeds(runs: list[dict[str, Any]]) -> str:
    """ " (the mean over seeds 0, 1, 2)" where a figure is a mean over repeats, else "" """
    return f" (the mean over seeds {', '.join(str(r.get('seed', 0)) for r in runs)})" if len(runs) > 1 else ""


def _n(x: Any, fmt: str = ",") -> str:
    return "—" if x is None else format(x, fmt)


def _row(
    label: str, r: dict[str, Any] | None, full_steps: int | None, reps: list[dict[str, Any]] | None = None
) -> list[str]:
    """One table row; `reps`: the run and its repeats with other seeds (each seed's figure and their mean)."""
    if r is None:
        return [label, "not run"] + [""] * (len(HEADER) - 2)
    partial = full_steps is not None and r.get("steps") is not None and r["steps"] < full_steps
    acc = f"not trained to its steps ({r['steps']} of {full_steps})" if partial else _n(r.get("accuracy"), ".1f")
    reps = reps or []
    acc += spread(reps, "accuracy")
    if "agreement" in r:
        k = r.get("teacher_k", 16)
        who = "16 long demonstrations" if k == "16long" else f"k = {k}"
        fit = ""  # the agreement on its own training inputs, where every seed measured it
        if "train_agreement" in r and all("train_agreement" in x for x in reps):
            fit = f"; on its own training inputs {r['train_agreement']:.1f}%{spread(reps, 'train_agreement')}"
        acc += (f" (agrees with its teacher, {who}, on {r['agreement']:.1f}%{spread(reps, 'agreement')}{fit}; "
                f"teacher {r['teacher_accuracy']:.1f})")  # fmt: skip
    if r.get("demo_min_words"):
        label = label.replace("long demonstrations", f"demonstrations of ≥ {r['demo_min_words']} words")
    if r.get("train_rows") and (r.get("student") == "deep" or r.get("method", "").endswith(("-long", "-longer"))):
        label += f", {r['train_rows']} inputs, {r['steps']} steps"
    if "context_tokens" in r:
        label += f", {r['context_tokens']} context tokens"
    if "num_tokens" in r:
        label += f", {r['num_tokens']} soft tokens"
    return [
        label,
        acc,
        _n(r.get("trainable")),
        _n(r.get("checkpoint_bytes")),
        _n(r.get("train_s_per_step"), ".2f"),
        _n(r.get("peak_rss_mib")),
        _n(r.get("latency_ms"), ".1f"),
        _n(r.get("latency_ratio"), ".2f"),
        _n(r.get("kv_bytes")),
    ]


def majority_rates(res: dict[str, dict[str, Any]]) -> dict[str, float]:
    """The majority-class rate of each task's evaluation sample (the same fixed-seed sample bench.compile drew;
    no model needed), where the data is present."""
    import collections
    import tempfile

    from bench.compile_tasks import TASKS, sample

    out: dict[str, float] = {}
    for key in TASKS:
        r = next((r for k, r in res.items() if k.startswith(f"{key}:") and "train_n" in r), None)
        if r is None:
            continue
        with tempfile.TemporaryDirectory() as tmp:
            files = sample(TASKS[key], r["train_n"], r["eval_n"], Path(tmp))
            if isinstance(files, str):
                continue
            labels = [json.loads(line)["label"] for line in Path(files[1]).read_text().splitlines()]
        out[key] = 100 * max(collections.Counter(labels).values()) / len(labels)
    return out


def task_table(key: str, res: dict[str, dict[str, Any]], majority: float | None = None) -> list[str]:
    runs = {m: res.get(f"{key}:{m}") for m, _ in ROWS}
    for m in ("icl16", "icl16-long"):
        icl16 = runs.get(m)
        if icl16 and "uncached" in icl16:
            runs[f"{m}-uncached"] = {**icl16["uncached"], "context_tokens": icl16["context_tokens"],
                                     "accuracy": icl16["accuracy"], "trainable": 0,
                                     "demo_min_words": icl16.get("demo_min_words")}  # fmt: skip
    steps = next((r["steps"] for m in ("pt", "lora", "distill") if (r := runs.get(m)) and "steps" in r), None)
    lines = [f"## {TASK_NAMES.get(key, key)}, smollm2-135m", "", "| " + " | ".join(HEADER) + " |",
             "|" + "|".join("---" if i == 0 else "---:" for i in range(len(HEADER))) + "|"]  # fmt: skip
    if majority is not None:
        lines.append(f"| majority class of the evaluation sample | {majority:.1f} |" + " |" * (len(HEADER) - 2))
    for m, label in ROWS:
        if m.startswith("icl16") and m != "icl16" and runs.get(m) is None:
            continue
        optional = m.endswith(("-long", "-longer")) or m.startswith("distill-deep-")  # shown where run
        if (optional or m.startswith("minilm")) and runs.get(m) is None:
            continue
        row = _row(label, runs.get(m), steps if m == "ft" else None, seeds(res, f"{key}:{m}"))
        lines.append("| " + " | ".join(row) + " |")
        for name in widths(res, f"{key}:{m}"):  # the same row with another prompt size (--tokens N: NAME@tN)
            lines.append("| " + " | ".join(_row(label, res[name], None, seeds(res, name))) + " |")
    commands = sorted({r["command"] for k, r in res.items() if k.startswith(f"{key}:") and "command" in r})
    any_run = next((r for r in runs.values() if r and "train_n" in r), None)
    if any_run:
        lrs = ", ".join(f"{m} {r['lr']:g}" for m in ("pt", "distill", "lora", "ft") if (r := runs.get(m)) and "lr" in r)
        lines += ["", f"Sample: {any_run['train_n']} training rows, {any_run['eval_n']} evaluation rows"
                  + (f"; {steps} steps of batch {any_run.get('batch_size', 8)} for every trained method (peak lr: "
                     f"{lrs}; linear schedule, 10% warm-up)" if steps else "") + "."]  # fmt: skip
        lines += [f"Command: `{c}` (finished runs are skipped)" for c in commands]
    return lines


def noise_line(r: dict[str, Any]) -> str:
    """bench.compile's teacher-noise row in words: the teacher's agreement with itself reordered and redrawn."""

    def runs(kind: str) -> str:
        xs = r[kind]
        agree, acc = (" / ".join(f"{x[k]:.1f}" for x in xs) for k in ("agreement", "accuracy"))
        return f"{agree}% (mean {mean(xs, 'agreement'):.1f}%; accuracy {acc})"

    return (f"the teacher agrees with itself with its 16 demonstrations in {len(r['reordered'])} other orders on "
            f"{runs('reordered')}, and with teachers of {len(r['redrawn'])} other balanced draws of 16 from the same "
            f"pool on {runs('redrawn')}")  # fmt: skip


def vs_best(res: dict[str, dict[str, Any]], name: str, best: dict[str, Any]) -> str:
    """Run `name` judged by its mean accuracy over its seeds against `best`: "acc% (over seeds) vs best% — verdict"."""
    reps = seeds(res, name)
    acc = mean(reps, "accuracy")
    return f"{acc:.1f}%{over_seeds(reps)} vs {best['accuracy']:.1f}% — {'met' if acc > best['accuracy'] else 'MISSED'}."


def targets(res: dict[str, dict[str, Any]]) -> list[str]:
    out = ["## Targets", ""]
    for key, name in TASK_NAMES.items():
        tried = [r for m in DISTILLED if (r := res.get(f"{key}:{m}"))]
        if not tried or not res.get(f"{key}:icl16"):
            continue

        def agreement(r: dict[str, Any]) -> float:  # over its seeds where it was repeated
            return mean(seeds(res, r["name"]), "agreement")

        d = max(tried, key=agreement)  # the best-agreeing distilled prompt, named below
        t = res[f"{key}:icl16-long" if d.get("teacher_k") == "16long" else f"{key}:icl16"]  # its teacher
        if len(tried) > 1:
            pcts = ", ".join(f"{r['method']} {agreement(r):.1f}%" + ("*" if len(seeds(res, r["name"])) > 1 else "")
                             for r in tried)  # fmt: skip
            out.append(f"- {name}: of the distilled prompts, {d['method']} agrees best with its teacher ({pcts}; "
                       "*: the mean over its seeds); the lines below are its.")  # fmt: skip
        ok_len = t["context_tokens"] >= 400 and d["num_tokens"] <= 20
        of_long = " of long demonstrations" if t["method"] != "icl16" else ""
        out.append(f"- {name}: its teacher, the 16-shot context{of_long}, is {t['context_tokens']} tokens (≥ 400: "
                   f"{'yes' if t['context_tokens'] >= 400 else 'NO'}), the student {d['num_tokens']} soft tokens "
                   f"(≤ 20: {'yes' if d['num_tokens'] <= 20 else 'NO'}).")  # fmt: skip

        def verdict(ok: bool, ok_len: bool = ok_len) -> str:
            return ("met" if ok_len else "met, but not in the target's setting (see above)") if ok else "MISSED"

        reps = seeds(res, d["name"])  # judged on the mean over its seeds where it was repeated
        agree, acc = mean(reps, "agreement"), mean(reps, "accuracy")
        over = over_seeds(reps)
        out.append(f"  - agreement with the teacher ≥ 95% of the held-out inputs: {agree:.1f}%{over} — "
                   f"{verdict(agree >= 95)}.")  # fmt: skip
        if (noise := res.get(f"{key}:teacher-noise")) and noise.get("teacher_k") == d.get("teacher_k", 16):
            out.append(f"  - for scale, {noise_line(noise)}.")
        gap = abs(acc - d["teacher_accuracy"])
        out.append(f"  - within 1 point of the teacher's accuracy: {acc:.1f}% vs {d['teacher_accuracy']:.1f}%"
                   f" (gap {gap:.1f}){over} — {verdict(gap <= 1)}.")  # fmt: skip
        if "uncached" in t:  # both ratios are to the zero-shot model timed alongside: their quotient is load-free
            speed = t["uncached"]["latency_ratio"] / d["latency_ratio"]
            cached = t["latency_ratio"] / d["latency_ratio"]
            out.append(f"  - ≥ 5× lower per-example latency than the teacher without a context cache: {speed:.1f}× "
                       f"({t['uncached']['latency_ms']:.0f} vs {d['latency_ms']:.0f} ms) — "
                       f"{verdict(speed >= 5)}. With its K/V cached the teacher costs {cached:.2f}× the "
                       "student per example.")  # fmt: skip
        wide = [res[w] for w in widths(res, d["name"])]
        if wide:
            sizes = "; ".join(
                f"{r['num_tokens']} slots {r['agreement']:.1f}% ({r['accuracy']:.1f}% accurate)" for r in wide
            )
            out.append(f"  - the same student with more slots (outside the target's ≤ 20): {sizes}.")
        mem = t["kv_bytes"] / max(1, d["kv_bytes"])
        out.append(f"  - ≥ 20× less per-task prompt memory (K/V bytes) than the cached teacher: {mem:.1f}× "
                   f"({t['kv_bytes']:,} vs {d['kv_bytes']:,} bytes) — {verdict(mem >= 20)}.")  # fmt: skip
    for key in ("sst2", "agnews"):
        pt = res.get(f"{key}:pt")
        icl = [r for m in ("icl4", "icl8", "icl16", "icl16-long") if (r := res.get(f"{key}:{m}"))]
        if not pt or not icl:
            out.append(f"- {TASK_NAMES[key]}: prompt tuning vs the best ICL setting — not measured.")
            continue
        best = max(icl, key=lambda r: r["accuracy"])
        out.append(f"- {TASK_NAMES[key]}: prompt tuning beats the best in-context setting ({best['method']}): "
                   + vs_best(res, f"{key}:pt", best))  # fmt: skip
        if res.get(f"{key}:pt-deep"):  # softprompt's other prompt method, at the same rows and steps
            out.append("  - deep prompt tuning (`--method deep`, the same rows and steps): "
                       + vs_best(res, f"{key}:pt-deep", best))  # fmt: skip
        if long := res.get(f"{key}:pt-long"):
            out.append(f"  - with more rows and steps ({long.get('train_rows')} rows, {long['steps']} steps): "
                       + vs_best(res, f"{key}:pt-long", best))  # fmt: skip
        out += on_dev(res, key, [r["method"] for r in icl])
    return out


def on_dev(res: dict[str, dict[str, Any]], key: str, icl: list[str]) -> list[str]:
    """The prompt-tuning-vs-ICL line again on the whole evaluation split (`--methods accuracy-dev`), for the rows
    of prompt tuning whose every recorded seed it measured; [] without that record."""
    dev = res.get(f"{key}:accuracy-dev")
    measured = [m for m in icl if f"{key}:{m}" in (dev or {}).get("accuracy", {})]
    if not dev or not measured:
        return []
    acc = dev["accuracy"]
    best = max(measured, key=lambda m: acc[f"{key}:{m}"])
    parts = []
    for m, label in (("pt", "prompt tuning"), ("pt-deep", "deep prompt tuning"), ("pt-long", "with more rows, steps")):
        reps = seeds(res, f"{key}:{m}")
        if reps and all(r["name"] in acc for r in reps):
            a = sum(acc[r["name"]] for r in reps) / len(reps)
            parts.append(f"{label} {a:.1f}%{over_seeds(reps)} — {'met' if a > acc[f'{key}:{best}'] else 'MISSED'}")
    if not parts:
        return []
    return [f"  - on all {dev['eval_rows']} rows of the evaluation split (`--methods accuracy-dev`; the best "
            f"in-context setting there: {best} {acc[f'{key}:{best}']:.1f}%): " + "; ".join(parts) + "."]  # fmt: skip


def render(
    res: dict[str, dict[str, Any]], majority: dict[str, float] | None = None, notes: list[str] | None = None
) -> str:
    dates = sorted({r["date"] for r in res.values() if "date" in r})
    partial = any(r["steps"] < (res.get(f"{r['task']}:pt") or r)["steps"] for k, r in res.items() if k.endswith(":ft"))
    lines = [
        TITLE,
        "",
        "Hand-written prompts, in-context learning, prompt tuning, a distilled prompt, LoRA and full fine-tuning side "
        "by side on one fixed-seed sample per task (the same rows, batches, steps and seed), measured by "
        "`python -m bench.compile` and written by `python -m bench.compile_report`"
        + (f" (runs of {', '.join(dates)})" if dates else "") + ". What to pick, from these numbers: "
        "[choosing.md](choosing.md).",
        "",
        "Latency is per example at batch 1 (one request at a time) on the same evaluation rows; the × column is its "
        "ratio to the zero-shot model timed interleaved with it in the same run, the number that survives a shared, "
        "loaded CPU (absolute milliseconds do not; the zero-shot row's own ratio, zero-shot against itself, shows "
        "the timing noise). Per-task K/V bytes: the keys/values a server keeps per task "
        "(the context's for ICL, the prompt's for a soft prompt); checkpoint bytes of ICL: the context as text. "
        "Peak RSS: the process's peak during the run, reset at its start (the model included; memory that earlier "
        "runs of the same process freed but the allocator kept counts too, so compare runs of one task with care). "
        "One thread (`OMP_NUM_THREADS=1`) on a "
        "2-core machine shared with other jobs.",
        "",
        "A distilled prompt's teacher is a 16-shot context, as the targets name it (each row names its teacher; the "
        "deep students' is the task's 16-shot context of long demonstrations where there is one), except the row "
        "distilled from the best ICL context. Its inputs were the training rows without their labels (`--alpha 0`; "
        "distill-deep-alpha also learned from their labels). "
        "The demonstrations are balanced per class and drawn with seed 0 from the training sample (the long ones "
        "from its rows of at least that many words). Every context starts with the task's hand-written "
        "instructions, the `k = 0` row. The deep students (`--method deep`) start from the keys/values of those "
        "instructions' first 20 tokens, as Cartridges initialise theirs; their per-task K/V is the same 20 slots per "
        "layer as a 20-token prompt's. Rows marked with more inputs and steps used a larger sample of the same "
        "training rows (the first rows are the table's) and their own step count; every other trained row used the "
        "sample and steps below." + (" Full fine-tuning ran only a few steps on this CPU budget, for its "
        "time per step and memory." if partial else ""),
        "",
    ]  # fmt: skip
    for key in TASK_NAMES:
        if any(k.startswith(f"{key}:") for k in res):
            lines += task_table(key, res, (majority or {}).get(key)) + [""]
    lines += targets(res)
    if notes:  # checks made by hand on the study's files, each saying how
        lines += ["", "## Notes", ""] + [f"- {n}" for n in notes]
    return "\n".join(lines).rstrip() + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--results", default=str(ROOT / "bench" / "results" / "compile.jsonl"))
    p.add_argument("--out", default=str(ROOT / "docs" / "results-compile.md"))
    p.add_argument("--note", action="append", default=[], help="a line for the Notes section (repeatable)")
    a = p.parse_args(argv)
    src = Path(a.results)
    if not src.is_file():
        print(f"bench.compile_report: {src} not found (run python -m bench.compile first)", file=sys.stderr)
        return 2
    out = Path(a.out)
    tmp = out.with_name("." + out.name + ".tmp")
    res = load(src)
    tmp.write_text(render(res, majority_rates(res), a.note), encoding="utf-8")
    tmp.replace(out)  # atomic: the page is never half-written
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
