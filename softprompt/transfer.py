"""Prompt transfer: rank source prompts by their similarity to a target prompt (SPoT, Vu et al. 2022).

SPoT picks the source task whose prompt is most similar to a prompt trained briefly on the target task, then
initialises the target prompt from it (`--init file:SOURCE`). Two cosine similarities, both on the prompt's rows:

- mean:  cos(mean over tokens of A, mean over tokens of B). Defined for prompts of any lengths.
- flat:  cos(vec(A), vec(B)) of the flattened (tokens x dim) matrices: token order matters. Only defined when
         both prompts have the same number of tokens (None otherwise).

A deep prompt (per-layer keys/values, `method: deep`) is compared through its (tokens, layers*2*heads*head_dim)
matrix, so deep prompts compare with deep prompts of the same model; comparing a deep and a plain prompt is an error.

    softprompt similarity a.safetensors b.safetensors c.safetensors --to target.safetensors [--by mean|flat]
"""

from __future__ import annotations

import argparse
import math
import sys
from typing import Any

import torch

from softprompt.checkpoint import PromptCheckpoint, load_prompt
from softprompt.methods import of


def prompt_matrix(ck: PromptCheckpoint) -> torch.Tensor:
    """The (tokens, features) matrix that similarities are computed on, in float64."""
    return of(ck).vectors(ck)


def _cos(a: torch.Tensor, b: torch.Tensor) -> float:
    na, nb = float(a.norm()), float(b.norm())
    if na == 0.0 or nb == 0.0:
        return 0.0
    return float((a @ b) / (na * nb))


def mean_cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    """cos(mean_rows(a), mean_rows(b)) for (P_a, d) and (P_b, d)."""
    return _cos(a.mean(0), b.mean(0))


def flat_cosine(a: torch.Tensor, b: torch.Tensor) -> float | None:
    """cos(vec(a), vec(b)); None when the shapes differ."""
    if a.shape != b.shape:
        return None
    return _cos(a.reshape(-1), b.reshape(-1))


def similarity(sources: list[str], target: str, *, by: str = "mean") -> list[dict[str, Any]]:
    """Each source prompt's similarity to `target`, most similar first (ranked by `by`: mean or flat)."""
    if by not in ("mean", "flat"):
        raise ValueError(f"--by must be mean or flat, got {by!r}")
    if not sources:
        raise ValueError("similarity: at least one source prompt is required")
    tgt = load_prompt(target)
    t = prompt_matrix(tgt)
    rows: list[dict[str, Any]] = []
    for path in sources:
        ck = load_prompt(path)
        s = prompt_matrix(ck)
        m_s, m_t = of(ck).name, of(tgt).name
        if m_s != m_t:
            names = {"prompt": "plain"}
            raise ValueError(
                f"{path}: cannot compare a {names.get(m_s, m_s)} prompt with the {names.get(m_t, m_t)} prompt {target}"
            )
        if s.shape[1] != t.shape[1]:
            raise ValueError(f"{path}: prompt width {s.shape[1]} differs from {target}'s {t.shape[1]} (another model)")
        fp_s, fp_t = ck.meta.get("fingerprint"), tgt.meta.get("fingerprint")
        rows.append(
            {
                "source": path,
                "mean_cosine": mean_cosine(s, t),
                "flat_cosine": flat_cosine(s, t),
                "num_tokens": int(s.shape[0]),
                "same_model": fp_s is None or fp_t is None or fp_s == fp_t,
                "template": ck.meta.get("template"),
            }
        )
    key = "mean_cosine" if by == "mean" else "flat_cosine"
    rows.sort(key=lambda r: -math.inf if r[key] is None else float(r[key]), reverse=True)  # None (undefined) last
    for i, r in enumerate(rows, 1):
        r["rank"] = i
    return rows


# ---- CLI ----------------------------------------------------------------------------------------------
def run(args: argparse.Namespace) -> int | None:
    if args.cmd != "similarity":
        return None
    from softprompt.api import dumps

    rows = similarity(args.sources, args.to, by=args.by)
    if args.json:
        for r in rows:
            print(dumps(r))
        return 0

    def fmt(x: float | None) -> str:
        return "     -" if x is None else f"{x:+.4f}"

    print(f"target: {args.to}", file=sys.stderr)
    print(f"{'rank':>4}  {'mean_cos':>8}  {'flat_cos':>8}  source")
    for r in rows:
        note = "" if r["same_model"] else "  (another model)"
        print(f"{r['rank']:>4}  {fmt(r['mean_cosine']):>8}  {fmt(r['flat_cosine']):>8}  {r['source']}{note}")
    return 0
