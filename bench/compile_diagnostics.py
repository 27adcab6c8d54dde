"""bench.compile's diagnostics of its distilled prompts: the scale for their agreement (the teacher against itself
with its demonstrations reordered or redrawn: --methods teacher-noise), where they disagree with their teachers (by
the teacher's margin, and on the inputs they were fitted to: --methods margins), and the boundary-heavy inputs of
distill-deep-boundary. `study` is bench.compile's Study (its arguments, samples, models and record)."""

from __future__ import annotations

import random
import re
from pathlib import Path
from typing import Any

import torch

# bench.compile.Study, which calls these (imported from it, this module does not import it back: no cycle)
Study = Any


@torch.no_grad()
def boundary_rows(study: Study, key: str) -> str:
    """--long-train-n unlabelled inputs, half of them the ones nearest the teacher's decision boundary: among
    2 x --long-train-n rows of the sample, the half of the output with the smallest teacher margins (top class
    minus second, T = 1), the other half drawn (seed 0) from the remaining rows."""
    from softprompt.evaluate import class_probs
    from softprompt.icl import context_prefix

    pool = study.long_rows(2)
    lines = Path(pool).read_text(encoding="utf-8").splitlines()
    enc, _, _ = study.probe.encode_file(pool)
    assert len(enc) == len(lines)
    prefix = context_prefix(study.pm0, study.contexts[study.teacher_key])
    top2 = class_probs(study.pm0, prefix, enc, study.label_ids).topk(2, dim=-1).values
    order = (top2[:, 0] - top2[:, 1]).argsort().tolist()  # nearest the boundary first
    half = study.a.long_train_n // 2
    rest = order[half:]
    random.Random(0).shuffle(rest)
    chosen = sorted(order[:half] + rest[: study.a.long_train_n - half])
    out = study.tmp / f"{key}-boundary.jsonl"
    out.write_text("".join(lines[i] + "\n" for i in chosen), encoding="utf-8")
    return str(out)


@torch.no_grad()
def teacher_noise(study: Study, key: str) -> dict[str, Any]:
    """The scale for a student's agreement: how often the deep students' teacher agrees with itself when its 16
    demonstrations come in another order (seeds 1-3: the same information), and with equally made teachers
    whose 16 demonstrations are another balanced draw from the same pool (seeds 1-2), on the evaluation rows."""
    from softprompt.evaluate import class_probs
    from softprompt.icl import build_context, choose_demos, context_prefix

    def probs(ctx) -> torch.Tensor:
        return class_probs(study.pm0, context_prefix(study.pm0, ctx), study.eval_set, study.label_ids)

    gold = torch.tensor([int(e.label or 0) for e in study.eval_set])
    demos = choose_demos(study.pool, 16, seed=0, balanced=True)
    assert build_context(study.probe, demos, study.instructions).text == study.contexts[study.teacher_key].text
    teacher = probs(study.contexts[study.teacher_key]).argmax(-1)
    out: dict[str, Any] = {"teacher_k": study.teacher_key, "teacher_accuracy":
                           round(100 * float((teacher == gold).float().mean()), 2)}  # fmt: skip
    for kind, seeds in (("reordered", (1, 2, 3)), ("redrawn", (1, 2))):
        runs = []
        for s in seeds:
            if kind == "reordered":
                order = demos[:]
                random.Random(s).shuffle(order)
            else:
                order = choose_demos(study.pool, 16, seed=s, balanced=True)
            ctx = build_context(study.probe, order, study.instructions)
            pred = probs(ctx).argmax(-1)
            runs.append({"seed": s, "context_tokens": len(ctx.token_ids),
                         "agreement": round(100 * float((pred == teacher).float().mean()), 2),
                         "accuracy": round(100 * float((pred == gold).float().mean()), 2)})  # fmt: skip
        out[kind] = runs
    return out


def comparable(previous: dict[str, Any] | None, **same: Any) -> dict[str, Any]:
    """A diagnostic row's earlier record (--redo) if it measured the same rows (`same`: its fields), else {}: what
    it measured of a student whose checkpoint is gone may then be carried into the new record."""
    return previous if previous and all(previous.get(k) == v for k, v in same.items()) else {}


@torch.no_grad()
def margins(
    study: Study, key: str, eval_rows: list[Any] | None = None, previous: dict[str, Any] | None = None
) -> dict[str, Any]:
    """Agreement of each saved distilled prompt of `key` (every seed) with its teacher, by the teacher's margin
    (its top class probability minus its second; the teacher's own distribution, T = 1) on the evaluation rows,
    and on the first --margin-train-n training inputs of the -long rows (what the student was fitted to: a
    student that agrees there no better than on held-out rows underfits, one that agrees far better overfits).
    `missing`: the recorded distilled prompts whose checkpoints are not on this machine (not measured).
    eval_rows: other held-out rows than the table's (margins-dev: the whole evaluation split, the table's first);
    `table_agreement` is then the agreement on its first rows, the table's (the recorded number: a check).
    previous: this row's earlier record (--redo); a student measured there on the same rows whose checkpoint is gone
    keeps that measurement, marked `carried` (its date), instead of being listed as missing. `seed_ensembles`: for
    each recipe with several seeds on hand, the agreement of their mean class probabilities (n x the slots, so no
    <= 20-token student: it says whether a recipe's disagreements are its seeds' variance or its common bias).
    log_prob_offset / _scatter / _corr: per class, the mean and spread over the held-out rows of the student's
    log-probability minus the teacher's (each centred over the classes in its row), and their correlation: an
    offset would be a constant bias a calibration fixes; scatter is not."""
    from softprompt.checkpoint import load_prompt
    from softprompt.evaluate import class_probs
    from softprompt.icl import context_prefix
    from softprompt.methods import checkpoint_prefix

    buckets = ((0.0, 0.1), (0.1, 0.3), (0.3, 1.01))
    held_out = study.eval_set if eval_rows is None else eval_rows
    fit_rows = study.probe.encode_file(study.long_rows())[0][: study.a.margin_train_n]
    gold, n_table = torch.tensor([r.label for r in held_out]), len(study.eval_set)
    teachers: dict[Any, tuple[torch.Tensor, torch.Tensor]] = {}
    out: dict[str, Any] = {"buckets": [list(b) for b in buckets], "train_rows": len(fit_rows), "prompts": {},
                           "missing": [], "eval_rows": len(held_out), "teacher_accuracy": {},
                           "seed_ensembles": {}}  # fmt: skip
    live: dict[tuple[str, Any], dict[str, torch.Tensor]] = {}  # (recipe, teacher) -> its seeds' held-out probs

    def versus(t: torch.Tensor, s: torch.Tensor) -> dict[str, Any]:  # a student's (B, C) probs against t's
        top2 = t.topk(2, dim=-1).values
        margin, same = top2[:, 0] - top2[:, 1], t.argmax(-1) == s.argmax(-1)
        by = [(margin >= lo) & (margin < hi) for lo, hi in buckets]
        lt, ls = (x.clamp_min(1e-12).log() for x in (t, s))
        lt, ls = lt - lt.mean(-1, keepdim=True), ls - ls.mean(-1, keepdim=True)  # (B, C): log-probs, centred per row
        corr = float(torch.corrcoef(torch.stack([lt.flatten(), ls.flatten()]))[0, 1])
        return {"agreement": round(100 * float(same.float().mean()), 2),
                "log_prob_offset": [round(float(v), 3) for v in (ls - lt).mean(0)],  # a class the student favours
                "log_prob_scatter": [round(float(v), 3) for v in (ls - lt).std(0)], "log_prob_corr": round(corr, 3),
                "by_margin": [{"rows": int(b.sum()), "agree": int((same & b).sum())} for b in by],
                "accuracy": round(100 * float((s.argmax(-1) == gold).float().mean()), 2),
                "table_agreement": round(100 * float(same[:n_table].float().mean()), 2)}  # fmt: skip

    prev = comparable(previous, eval_rows=len(held_out), train_rows=len(fit_rows))
    carried: dict[str, Any] = prev.get("prompts", {})
    for name, r in sorted(study.done.items()):
        path = study.checkpoint(name)
        if r.get("task") != key or "agreement" not in r:
            continue
        if not path.is_file():  # recorded, but its checkpoint (--out, not committed) is not on this machine
            if name in carried:
                out["prompts"][name] = {**carried[name], "carried": carried[name].get("carried", prev["date"])}
            else:
                out["missing"].append(name)
            continue
        k = r.get("teacher_k", 16)
        if k not in teachers:
            prefix = context_prefix(study.pm0, study.contexts[k])
            teachers[k] = tuple(class_probs(study.pm0, prefix, rows, study.label_ids)
                                for rows in (held_out, fit_rows))  # type: ignore[assignment]  # fmt: skip
            out["teacher_accuracy"][str(k)] = round(100 * float((teachers[k][0].argmax(-1) == gold).float().mean()), 2)
        t, t_fit = teachers[k]
        student = checkpoint_prefix(study.pm0, [load_prompt(path)])
        s, s_fit = (class_probs(study.pm0, student, rows, study.label_ids) for rows in (held_out, fit_rows))
        live.setdefault((re.sub(r"@s\d+$", "", name), k), {})[name] = s
        fit = float((t_fit.argmax(-1) == s_fit.argmax(-1)).float().mean())
        out["prompts"][name] = {"teacher_k": k, **versus(t, s), "train_agreement": round(100 * fit, 2)}
    for (recipe, k), seeds in live.items():  # the seeds' mean class probabilities: variance or bias?
        if len(seeds) > 1:
            mean = torch.stack(list(seeds.values())).mean(0)
            out["seed_ensembles"][recipe] = {"teacher_k": k, "seeds": sorted(seeds), **versus(teachers[k][0], mean)}
    if carried:  # the teachers of carried students only
        out["teacher_accuracy"] = {**prev["teacher_accuracy"], **out["teacher_accuracy"]}
    return out


@torch.no_grad()
def accuracy_dev(
    study: Study, key: str, rows: list[Any], contexts: dict[str, Any], previous: dict[str, Any] | None = None
) -> dict[str, Any]:
    """Accuracy on `rows` (the whole evaluation split, the table's rows first) of zero-shot, of each ICL context
    (`contexts`: row name -> context) and of each recorded prompt of `key` whose checkpoint is on hand (a prompt
    file: the rows with per-task K/V, not LoRA or full fine-tuning). `table_accuracy`, on the table's rows, must
    equal the record (a check: `differs_from_record` lists where it does not). Recorded prompts whose checkpoints
    are gone are `missing`, or carried from `previous` (this row's earlier record) when it measured the same rows."""
    from softprompt.checkpoint import load_prompt
    from softprompt.evaluate import class_probs
    from softprompt.icl import context_prefix
    from softprompt.methods import checkpoint_prefix

    gold, n_table = torch.tensor([r.label for r in rows]), len(study.eval_set)
    out: dict[str, Any] = {"eval_rows": len(rows), "accuracy": {}, "table_accuracy": {}, "missing": []}
    prev = comparable(previous, eval_rows=len(rows))

    def score(name: str, prefix: Any) -> None:
        right = class_probs(study.pm0, prefix, rows, study.label_ids).argmax(-1) == gold  # (N,)
        out["accuracy"][name] = round(100 * float(right.float().mean()), 2)
        out["table_accuracy"][name] = round(100 * float(right[:n_table].float().mean()), 2)

    score(f"{key}:zero", study.prefix0)
    for name, ctx in contexts.items():
        score(f"{key}:{name}", context_prefix(study.pm0, ctx))
    for name, r in sorted(study.done.items()):
        if r.get("task") != key or not r.get("kv_bytes") or r.get("method") in contexts or "checkpoint_bytes" not in r:
            continue
        if study.checkpoint(name).is_file():
            score(name, checkpoint_prefix(study.pm0, [load_prompt(study.checkpoint(name))]))
        elif name in prev.get("accuracy", {}):
            for field in ("accuracy", "table_accuracy"):
                out[field][name] = prev[field][name]
            out.setdefault("carried", {})[name] = prev.get("carried", {}).get(name, prev["date"])
        else:
            out["missing"].append(name)
    out["differs_from_record"] = {  # name -> [recorded, measured now] on the table's rows: should stay empty
        n: [study.done[n]["accuracy"], a] for n, a in out["table_accuracy"].items()
        if n in study.done and study.done[n].get("accuracy") is not None and abs(study.done[n]["accuracy"] - a) > 0.01
    }  # fmt: skip
    return out
