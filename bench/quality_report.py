"""Renders bench/quality.py's cached results as docs/results.md and PNG plots in docs/img/."""

from __future__ import annotations

import platform
import re
import statistics
import sys
import time
from pathlib import Path
from typing import Any


def sd(xs: list[float]) -> float:
    return statistics.stdev(xs) if len(xs) > 1 else 0.0


def _fmt(r: dict[str, Any] | None) -> tuple[str, str, str, str, str, str]:
    if r is None:
        return ("not run",) + ("",) * 5
    share = f" ({100 * r['share']:.3f}%)" if "share" in r else ""
    return (
        f"{100 * r['accuracy']:.1f}",
        f"{100 * r['macro_f1']:.1f}",
        f"{r.get('trainable', 0):,}{share}",
        f"{r.get('bytes', 0):,}",
        f"{r.get('steps', 0)}" + (f" (best {r['best_step']})" if "best_step" in r else ""),
        f"{r.get('wall_s', 0):.0f}",
    )


EXTRA_SECTIONS = (  # appended to docs/results.md in this order, where present
    "results-findings.md",
    "results-methods.md",
    "results-dynamic.md",
    "results-late.md",
    "results-vision.md",
    "results-compile.md",
)
_SEED = re.compile(r"-s(\d+)$")  # a run repeated with another seed: `<key>-s<seed>` (seed 0 has no suffix)


def _runs(results: dict[str, Any], key: str) -> list[dict[str, Any]]:
    if key.endswith("/*"):
        return [v for k, v in results.items() if k.startswith(key[:-1])]
    return [results[key]] if key in results else []


def _longer(results: dict[str, Any], prefix: str, label: str) -> list[tuple[str, str]]:
    """Rows for the runs of `--only sst2-long/agnews-long` and the like: keys `<prefix>-<steps>` (steps depend on the
    budget), and `<prefix>-<steps>-s<seed>` for the same run with another seed; by steps, then seed."""
    pat = re.compile(re.escape(prefix) + r"-(\d+)(?:-s(\d+))?$")
    found = sorted((int(m[1]), int(m[2] or 0), k) for k in results if (m := pat.match(k)))
    return [(f"{label}, {steps} steps" + (f", seed {seed}" if seed else ""), k) for steps, seed, k in found]


def _provenance(results: dict[str, Any], rows: list[tuple[str, str]], cmd: str) -> str:
    """The line under a table: the command that (re)produces it, the dates of its runs, their summed wall time."""
    runs = [r for _, key in rows for r in _runs(results, key)]
    dates = sorted({str(r.get("date", "?"))[:10] for r in runs})
    wall = sum(r.get("wall_s", 0) for r in runs)
    return f"Command: `{cmd}` (cached runs are skipped) · run on {', '.join(dates) or '-'} · wall {wall / 60:.0f} min"


def _table(results: dict[str, Any], rows: list[tuple[str, str]], cmd: str = "") -> list[str]:
    out = [
        "| method | accuracy % | macro-F1 % | trainable params (share) | checkpoint bytes | steps | wall s |",
        "|---|---|---|---|---|---|---|",
    ]
    for label, key in rows:
        if key.endswith("/*"):  # several seeds: mean ± std
            runs = _runs(results, key)
            if not runs:
                out.append(f"| {label} | not run | | | | | |")
                continue
            if len(runs) == 1:
                out.append(f"| {label} | " + " | ".join(_fmt(runs[0])) + " |")
                continue
            accs = [100 * r["accuracy"] for r in runs]
            f1s = [100 * r["macro_f1"] for r in runs]
            cells = _fmt(runs[0])
            out.append(
                f"| {label} (n={len(runs)} seeds) | {statistics.mean(accs):.1f} ± {sd(accs):.1f} | "
                f"{statistics.mean(f1s):.1f} ± {sd(f1s):.1f} | {cells[2]} | {cells[3]} | {cells[4]} | "
                f"{sum(r.get('wall_s', 0) for r in runs):.0f} |"
            )
            continue
        out.append(f"| {label} | " + " | ".join(_fmt(results.get(key))) + " |")
    return out + (["", _provenance(results, rows, cmd)] if cmd else [])


def _plots(results: dict[str, Any], img: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    img.mkdir(parents=True, exist_ok=True)
    made = []
    curves = {k: v["curve"] for k, v in results.items() if v.get("curve") and not k.startswith(("ablation", "lr/"))}
    if curves:
        # one panel per benchmark (a single panel of 25+ runs buries its curves under the legend)
        names = {"minilm": "SST-2, minilm-l6", "sst2": "SST-2, smollm2-135m", "agnews": "AG News, smollm2-135m"}
        names |= {"rte": "RTE / BoolQ, smollm2-135m", "boolq": "RTE / BoolQ, smollm2-135m"}
        panels: dict[str, list[str]] = {}
        for k in curves:
            panels.setdefault(names.get(k.split("/")[0], "other"), []).append(k)
        fig, axes = plt.subplots(len(panels), 1, figsize=(10, 3.2 * len(panels)), squeeze=False)
        for ax, (title, keys) in zip(axes[:, 0], sorted(panels.items())):
            ax.set_prop_cycle(color=[plt.get_cmap("tab20")(i % 20) for i in range(len(keys))])
            for k in keys:
                ax.plot([s for s, _ in curves[k]], [100 * a for _, a in curves[k]], "o-", label=k, ms=3)
            ax.set_title(title, fontsize=9)
            ax.set_xlabel("training step")
            ax.set_ylabel("held-out accuracy %")
            ax.legend(fontsize=6, loc="upper left", bbox_to_anchor=(1.01, 1.0))
        fig.tight_layout()
        fig.savefig(img / "curves.png", dpi=100)
        plt.close(fig)
        made.append("curves.png")
    bars = [(k, v["accuracy"]) for k, v in results.items() if k.startswith(("sst2/", "minilm/"))]
    if bars:
        fig, ax = plt.subplots(figsize=(7, 4))
        ax.barh([k for k, _ in bars], [100 * a for _, a in bars], color="tab:blue")
        ax.set_xlabel("SST-2 dev accuracy %")
        ax.set_xlim(40, 100)
        fig.tight_layout()
        fig.savefig(img / "methods.png", dpi=100)
        plt.close(fig)
        made.append("methods.png")
    abl = {k: v for k, v in results.items() if k.startswith("ablation/")}
    lrs = {k: v for k, v in results.items() if k.startswith("lr/")}
    if abl or lrs:
        fig, axes = plt.subplots(1, 2, figsize=(10, 4))
        for init in ("random", "vocab", "labels"):
            pts = sorted(
                (int(k.split("/p")[1].split("-")[0]), v["accuracy"]) for k, v in abl.items() if k.endswith("-" + init)
            )
            if pts:
                axes[0].plot([p for p, _ in pts], [100 * a for _, a in pts], "o-", label=init)
        axes[0].set_xscale("log")
        axes[0].set_xlabel("prompt length (tokens)")
        axes[0].set_ylabel("SST-2 dev accuracy %")
        if abl:
            axes[0].legend()
        for opt in ("adamw", "adafactor"):
            pts = sorted((float(k.split("-")[-1]), v["accuracy"]) for k, v in lrs.items() if k.startswith(f"lr/{opt}-"))
            if pts:
                axes[1].plot([p for p, _ in pts], [100 * a for _, a in pts], "o-", label=opt)
        axes[1].set_xscale("log")
        axes[1].set_xlabel("learning rate")
        if lrs:
            axes[1].legend()
        fig.tight_layout()
        fig.savefig(img / "ablations.png", dpi=100)
        plt.close(fig)
        made.append("ablations.png")
    return made


def _pct(results: dict[str, Any], key: str, digits: int = 1) -> str:
    return f"{100 * results[key]['accuracy']:.{digits}f}%"


def _target_lines(results: dict[str, Any], mode: str) -> list[str]:
    """The two accuracy targets, each with every run that bears on it and a verdict that says which budget counts."""
    out = []
    # softprompt runs of every budget, each against PEFT's run with the same tokens and steps (where there is one)
    ours = [
        (k, f"{n} tokens")
        for n in (20, 100)
        for k in [f"sst2/pt-{n}"] + [k for _, k in _longer(results, f"sst2/pt-{n}", "")]
    ]
    ours = [(k, lab) for k, lab in ours if k in results]
    if ours:
        parts, ok = [], False
        for k, lab in ours:
            steps = results[k]["steps"]
            twin = k.replace("/pt-", "/peft-")
            peft = results[twin] if twin in results and results[twin]["steps"] == steps else None
            vs = f" vs PEFT {_pct(results, twin, 2)}" if peft else " (no PEFT run at this budget)"
            parts.append(f"{lab}, {steps} steps: {_pct(results, k, 2)}{vs}")
            ok |= peft is not None and results[k]["accuracy"] >= max(0.89, peft["accuracy"])
        line = "- SST-2 prompt tuning ≥ 89% and ≥ PEFT with the same budget (tokens, steps): " + "; ".join(parts)
        out.append(f"{line} — {'met' if ok else 'MISSED'} ({mode} budget).")
    else:
        out.append("- SST-2 prompt tuning ≥ 89% and ≥ PEFT: not measured in this run.")
    keys = [k for k in ["agnews/pt-20", *(k for _, k in _longer(results, "agnews/pt-20", "")), "agnews/pt-100",
                        "agnews/pt-20-linear", "agnews/pt-100-linear", "agnews/pt-20-linear-hlr",
                        "agnews/pt-20-linear-hlr-1e-3",
                        *(k for _, k in _longer(results, "agnews/pt-20-linear-9k", "")),
                        *(k for _, k in _longer(results, "agnews/deep-20-9k", "")),
                        *(k for _, k in _longer(results, "agnews/deep-20-linear-9k", ""))]
            if k in results]  # fmt: skip
    if keys:
        got = "; ".join(
            f"{'deep prompt, ' if '/deep-' in k else ''}{k.split('-')[1]} tokens"
            f"{' + linear head' if '-linear' in k else ''}"
            f"{' (head lr 0.0001)' if k.endswith('-hlr') else ' (head lr 0.001)' if k.endswith('-1e-3') else ''}"
            f"{', 9,000 rows' if '-9k' in k else ''}, {results[k]['steps']} steps"
            f"{f', seed {m.group(1)}' if (m := _SEED.search(k)) else ''} {_pct(results, k)}"
            for k in keys
        )
        # a recipe run with several seeds counts by its mean over them
        runs: dict[str, list[float]] = {}
        for k in keys:
            runs.setdefault(_SEED.sub("", k), []).append(results[k]["accuracy"])
        means = {k: sum(v) / len(v) for k, v in runs.items()}
        for k, v in runs.items():
            if len(v) > 1:
                got += f"; mean of {k.split('/')[1]}'s {len(v)} seeds {100 * means[k]:.1f}%"
        plain = any(a >= 0.88 for k, a in means.items() if "/pt-" in k)
        deep = any(a >= 0.88 for k, a in means.items() if "/deep-" in k)
        verdict = "met" if plain else "met by a deep prompt; MISSED by input-layer prompts" if deep else "MISSED"
        out.append(f"- AG News prompt tuning ≥ 88%: {got} — {verdict} ({mode} budget).")
    else:
        out.append("- AG News prompt tuning ≥ 88%: not measured in this run.")
    return out


def render(results: dict[str, Any], mode: str, budget, notes: list[str], docs: Path) -> None:
    cmd = "python -m bench.quality" + (" --quick" if mode == "quick" else "")
    wall = sum(v.get("wall_s", 0) for v in results.values())
    lines = [
        "# Results: does it learn?",
        "",
        f"Produced by `{cmd}` on {time.strftime('%Y-%m-%d')}, machine: {platform.machine()}, "
        f"{platform.processor() or 'cpu'}, Python {sys.version.split()[0]}; total run time {wall / 60:.0f} min.",
        f"Budget ({mode}): {budget.train_n} training examples (fixed-seed sample), "
        f"{'all' if not budget.eval_n else budget.eval_n} evaluation examples (BoolQ: a fixed 200-row sample of "
        f"val), batch {budget.batch}; {budget.steps} steps for the main runs "
        f"(AG News {budget.agnews_steps or budget.steps}), {budget.pair_steps} per seed for RTE and "
        f"{budget.boolq_steps or budget.pair_steps} for BoolQ, {budget.ablation_steps} for each ablation run — each "
        "row says its steps. Accuracy is the best of the evaluations during training (4 per SST-2 run, 2 for AG "
        "News and 5 for its longer run, 2 per RTE run, 1 — the final prompt — per BoolQ and ablation run; "
        "ablation runs are scored on the "
        f"first {budget.ablation_eval_n or 'all'} dev rows). "
        "Defaults unless stated: 20 tokens, `labels` init, AdamW lr 0.01, linear schedule, 10 warm-up steps. "
        "Two-core CPU budgets: the ablation runs are short, so they show early learning, not converged accuracy. "
        "Runs went in two concurrent `--only` streams of one torch thread each, so wall times are single-thread "
        "times on a busy 2-core machine; a row marked `not run` did not fit the session's CPU time.",
        "",
        "## SST-2 (train sample → dev), smollm2-135m",
        *_table(
            results,
            [
                ("zero-shot (same template)", "sst2/zero-shot"),
                ("prompt tuning, 20 tokens", "sst2/pt-20"),
                ("prompt tuning, 100 tokens", "sst2/pt-100"),
                *_longer(results, "sst2/pt-20", "prompt tuning, 20 tokens"),
                *_longer(results, "sst2/pt-100", "prompt tuning, 100 tokens"),
                ("prompt tuning, 20 tokens, uniform batches (--no-group-by-length)", "sst2/pt-20-uniform"),
                ("PEFT prompt tuning, 20 tokens (uniform batches)", "sst2/peft-20"),
                *_longer(results, "sst2/peft-20", "PEFT prompt tuning, 20 tokens (softprompt's batches)"),
            ],
            f"{cmd} --only sst2,sst2-100,sst2-long,sst2-uniform,sst2-long-20,sst2-long-20-peft",
        ),
        "",
        "## SST-2, minilm-l6 (encoder): parameter-efficient vs full fine-tuning",
        *_table(
            results,
            [
                ("prompt tuning, --head similarity (prompt only)", "minilm/pt-similarity"),
                ("prompt tuning, --head linear", "minilm/pt-linear"),
                ("deep prompt (P-tuning v2), --head linear", "minilm/deep-linear"),
                ("linear probe (frozen, head only)", "minilm/linear-probe"),
                ("full fine-tuning (all weights + head)", "minilm/full-ft"),
            ],
            f"{cmd} --only minilm",
        ),
        "",
        "## AG News (4 classes; 1,000 held-out rows split off train10k with seed 0), smollm2-135m",
        *_table(
            results,
            [
                ("zero-shot", "agnews/zero-shot"),
                ("prompt tuning, 20 tokens", "agnews/pt-20"),
                *_longer(results, "agnews/pt-20", "prompt tuning, 20 tokens"),
                ("prompt tuning, 100 tokens", "agnews/pt-100"),
                ("prompt tuning + linear head (--head linear), 20 tokens", "agnews/pt-20-linear"),
                ("prompt tuning + linear head (--head linear), 100 tokens", "agnews/pt-100-linear"),
                ("prompt tuning + linear head, 20 tokens, --head-lr 0.0001", "agnews/pt-20-linear-hlr"),
                ("prompt tuning + linear head, 20 tokens, --head-lr 0.001", "agnews/pt-20-linear-hlr-1e-3"),
                *_longer(results, "agnews/pt-20-linear-9k", "prompt tuning + linear head, 20 tokens, all 9,000 rows"),
                *_longer(results, "agnews/deep-20-9k", "deep prompt (P-tuning v2), 20 tokens, all 9,000 rows"),
                *_longer(results, "agnews/deep-20-linear-9k", "deep prompt + linear head, 20 tokens, all 9,000 rows"),
            ],
            f"{cmd} --only agnews,agnews-long,agnews-100,agnews-head,agnews-head-100,agnews-head-lr,"
            "agnews-head-lr-1e-3,agnews-head-9k,agnews-deep-9k,agnews-deep-head-9k,agnews-deep-head-9k-s1,"
            "agnews-deep-head-9k-800,agnews-deep-head-9k-800-s1",
        ),
        "",
        "## RTE and BoolQ, smollm2-135m",
        *_table(
            results,
            [
                ("RTE majority class", "rte/majority"),
                ("RTE zero-shot", "rte/zero-shot"),
                ("RTE prompt tuning (2,240 examples, seed 0)", "rte/pt-20/*"),
                ("BoolQ majority class", "boolq/majority"),
                ("BoolQ zero-shot", "boolq/zero-shot"),
                ("BoolQ prompt tuning (32 examples)", "boolq/pt-20/*"),
            ],
            f"{cmd} --only pairs",
        ),
        "",
        "## Ablations (SST-2, smollm2-135m): prompt length × init, learning rate",
        *_table(
            results,
            [(k.split("/", 1)[1], k) for k in sorted(results) if k.startswith(("ablation/", "lr/"))],
            f"{cmd} --only ablation,lr",
        ),
        "",
    ]
    made = _plots(results, docs / "img")
    lines += [f"![{m}](img/{m})" for m in made] + [""]
    lines += ["## Targets", "", *_target_lines(results, mode)]
    ft, lin = results.get("minilm/full-ft"), results.get("minilm/pt-linear")
    if ft and lin:
        gap = 100 * (ft["accuracy"] - lin["accuracy"])
        share = 100 * lin.get("share", 0)
        ok = gap <= 4 and share < 1
        lines.append(
            f"- minilm-l6 prompt tuning with a linear head within 4 points of full fine-tuning with < 1% of the "
            f"parameters: {100 * lin['accuracy']:.1f}% vs {100 * ft['accuracy']:.1f}% (gap {gap:.1f} points, "
            f"{share:.2f}% of the parameters) — {'met' if ok else 'MISSED'} ({mode} budget)."
        )
    else:
        lines.append("- minilm-l6 linear-head prompt tuning within 4 points of full fine-tuning: not measured.")
    if notes:
        lines += ["", "## Notes", ""] + [f"- {n}" for n in notes]
    # hand-written reading of the numbers; the other studies' sections (bench.methods, bench.dynamic,
    # bench.late, bench.vision, bench.compile each write their own file)
    lines += section_lines(docs)
    tmp = docs / ".results.md.tmp"
    tmp.write_text("\n".join(lines) + "\n")
    tmp.replace(docs / "results.md")
    update_readme(results, mode, docs.parent / "README.md")


HEADLINE = [
    ("SST-2", "smollm2-135m zero-shot", "sst2/zero-shot"),
    ("SST-2", "smollm2-135m prompt tuning, 20 tokens", "sst2/pt-20"),
    ("SST-2", "smollm2-135m PEFT prompt tuning, 20 tokens", "sst2/peft-20"),
    ("SST-2", "smollm2-135m prompt tuning, 100 tokens", "sst2/pt-100"),
    ("SST-2", "smollm2-135m prompt tuning, 100 tokens, 600 steps", "sst2/pt-100-600"),  # --only sst2-long (full)
    ("SST-2", "smollm2-135m prompt tuning, 20 tokens, 600 steps", "sst2/pt-20-600"),  # --only sst2-long-20
    ("SST-2", "smollm2-135m PEFT prompt tuning, 20 tokens, 600 steps", "sst2/peft-20-600"),  # sst2-long-20-peft
    ("SST-2", "minilm-l6 prompt tuning, linear head", "minilm/pt-linear"),
    ("SST-2", "minilm-l6 full fine-tuning", "minilm/full-ft"),
    ("AG News", "smollm2-135m zero-shot", "agnews/zero-shot"),
    ("AG News", "smollm2-135m prompt tuning, 20 tokens", "agnews/pt-20"),
    ("AG News", "smollm2-135m prompt tuning, 20 tokens, 500 steps", "agnews/pt-20-500"),  # --only agnews-long
    ("AG News", "smollm2-135m prompt tuning, 100 tokens", "agnews/pt-100"),  # --only agnews-100
    ("AG News", "smollm2-135m prompt tuning + linear head, 20 tokens", "agnews/pt-20-linear"),  # --only agnews-head
    ("AG News", "smollm2-135m prompt tuning + linear head, 9,000 rows, 500 steps", "agnews/pt-20-linear-9k-500"),
    ("AG News", "smollm2-135m deep prompt, 9,000 rows, 400 steps", "agnews/deep-20-9k-400"),  # --only agnews-deep-9k
    ("AG News", "smollm2-135m deep prompt + linear head, 9,000 rows, 400 steps", "agnews/deep-20-linear-9k-400"),
    (
        "AG News",
        "smollm2-135m deep prompt + linear head, 9,000 rows, 400 steps, seed 1",
        "agnews/deep-20-linear-9k-400-s1",
    ),
    ("AG News", "smollm2-135m deep prompt + linear head, 9,000 rows, 800 steps", "agnews/deep-20-linear-9k-800"),
    (
        "AG News",
        "smollm2-135m deep prompt + linear head, 9,000 rows, 800 steps, seed 1",
        "agnews/deep-20-linear-9k-800-s1",
    ),
    ("RTE", "smollm2-135m zero-shot / prompt tuning", "rte/zero-shot|rte/pt-20/s0"),
    ("BoolQ (32 ex.)", "smollm2-135m zero-shot / prompt tuning", "boolq/zero-shot|boolq/pt-20/s0"),
]
START, END = "<!-- results:start -->", "<!-- results:end -->"


def update_readme(results: dict[str, Any], mode: str, readme: Path) -> None:
    """Rewrite the README's headline table (between its markers) from the measured runs; absent runs are omitted."""
    if not readme.exists() or START not in (text := readme.read_text()) or END not in text:
        return
    rows = ["| data | method | accuracy % | trainable params | steps |", "|---|---|---|---|---|"]
    for data, label, keys in HEADLINE:
        runs = [results.get(k) for k in keys.split("|")]
        if any(r is None for r in runs):
            continue
        acc = " / ".join(f"{100 * r['accuracy']:.1f}" for r in runs if r)
        last = runs[-1] or {}
        rows.append(f"| {data} | {label} | {acc} | {last.get('trainable', 0):,} | {last.get('steps', 0)} |")
    cmd = "python -m bench.quality" + (" --quick" if mode == "quick" else "")
    body = [START, f"Measured by `{cmd}` ({mode} budget; full tables, budgets and targets in docs/results.md):", ""]
    body += rows if len(rows) > 2 else ["(no run measured yet)"]
    new = text[: text.index(START)] + "\n".join(body + [END]) + text[text.index(END) + len(END) :]
    tmp = readme.with_suffix(".md.tmp")
    tmp.write_text(new)
    tmp.replace(readme)


def section_lines(docs: Path) -> list[str]:
    """The other studies' sections (EXTRA_SECTIONS present in `docs`), in order, as results.md appends them."""
    out: list[str] = []
    for extra in EXTRA_SECTIONS:
        if (docs / extra).exists():
            out += ["", (docs / extra).read_text()]
    return out


def refresh_sections(docs: Path) -> None:
    """Re-append the sections to docs/results.md without the quality runs (runs/ is not in the repository): the
    generated part is kept up to where the first section's file begins, and every section present now follows."""
    page = docs / "results.md"
    text = page.read_text()
    cut = len(text)
    for extra in EXTRA_SECTIONS:
        f = docs / extra
        head = f.read_text().split("\n", 1)[0] if f.exists() else ""
        if head and ("\n" + head + "\n") in text:
            cut = min(cut, text.index("\n" + head + "\n"))
    tmp = docs / ".results.md.tmp"
    tmp.write_text(text[:cut].rstrip("\n") + "\n" + "\n".join(section_lines(docs)) + "\n")
    tmp.replace(page)


if __name__ == "__main__":  # python -m bench.quality_report: refresh the appended sections of docs/results.md
    refresh_sections(Path(__file__).resolve().parents[1] / "docs")
