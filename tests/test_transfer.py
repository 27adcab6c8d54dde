"""softprompt.transfer (`softprompt similarity`): cosines checked against hand-computed values."""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import pytest
import torch

from softprompt.checkpoint import CheckpointError, load_prompt, save_prompt
from softprompt.parsers import add_similarity_parser
from softprompt.transfer import flat_cosine, mean_cosine, prompt_matrix, run, similarity


def write(tmp_path: Path, name: str, rows: list[list[float]], **meta) -> str:
    p = tmp_path / f"{name}.safetensors"
    save_prompt(p, torch.tensor(rows), {"fingerprint": "sha256:aaaa", "template": name, **meta})
    return str(p)


def parse(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser()
    sub = p.add_subparsers(dest="cmd", required=True)
    add_similarity_parser(sub)
    return p.parse_args(argv)


def test_cosines_by_hand() -> None:
    a = torch.tensor([[1.0, 0.0], [0.0, 1.0]])  # mean (0.5, 0.5)
    b = torch.tensor([[2.0, 0.0], [0.0, 0.0]])  # mean (1, 0)
    assert mean_cosine(a, b) == pytest.approx(1 / math.sqrt(2))  # cos 45 degrees
    # flat: a = (1,0,0,1), b = (2,0,0,0): 2 / (sqrt(2) * 2)
    assert flat_cosine(a, b) == pytest.approx(1 / math.sqrt(2))
    c = torch.tensor([[0.0, 1.0], [1.0, 0.0]])  # a with its rows swapped: same mean, orthogonal when flattened
    assert mean_cosine(a, c) == pytest.approx(1.0)
    assert flat_cosine(a, c) == pytest.approx(0.0)
    assert flat_cosine(a, torch.ones(3, 2)) is None  # different lengths: flat is undefined
    assert mean_cosine(a, torch.ones(3, 2)) == pytest.approx(1.0)
    assert mean_cosine(a, torch.zeros(2, 2)) == 0.0  # zero vector: 0, not NaN


def test_ranking_and_fields(tmp_path: Path) -> None:
    tgt = write(tmp_path, "tgt", [[1, 0, 0], [0, 1, 0]])  # mean (.5, .5, 0)
    near = write(tmp_path, "near", [[1, 1, 0], [0, 0, 0.1]])  # mean (.5, .5, .05)
    far = write(tmp_path, "far", [[0, 0, 1], [0, 0, 1]])  # mean (0, 0, 1): orthogonal
    opp = write(tmp_path, "opp", [[-1, 0, 0], [0, -1, 0], [0, 0, 0]])  # mean (-1/3, -1/3, 0): cos -1, 3 tokens
    other = write(tmp_path, "other", [[1, 0, 0], [0, 1, 0]], fingerprint="sha256:bbbb")
    rows = similarity([far, opp, near, other], tgt)
    assert [r["source"] for r in rows] == [other, near, far, opp]
    assert [r["rank"] for r in rows] == [1, 2, 3, 4]
    by = {r["source"]: r for r in rows}
    assert by[other]["mean_cosine"] == pytest.approx(1.0) and by[other]["same_model"] is False
    assert by[near]["mean_cosine"] == pytest.approx(0.5 / math.sqrt(0.5) / math.sqrt(0.5025))
    assert by[near]["flat_cosine"] == pytest.approx(1 / (math.sqrt(2) * math.sqrt(2.01)))  # dot: only (0,0)
    assert by[far]["mean_cosine"] == pytest.approx(0.0) and by[far]["flat_cosine"] == pytest.approx(0.0)
    assert by[opp]["mean_cosine"] == pytest.approx(-1.0) and by[opp]["flat_cosine"] is None
    assert by[near]["num_tokens"] == 2 and by[near]["template"] == "near" and by[near]["same_model"] is True
    flat = similarity([far, opp, near], tgt, by="flat")
    assert [r["source"] for r in flat] == [near, far, opp]  # undefined (None) ranks last


def test_against_independent_numpy(tmp_path: Path) -> None:
    import numpy as np

    g = torch.Generator().manual_seed(0)
    tgt = write(tmp_path, "t", torch.randn(5, 16, generator=g).tolist())
    srcs = [write(tmp_path, f"s{i}", torch.randn(5, 16, generator=g).tolist()) for i in range(4)]
    T = load_prompt(tgt).prompt.double().numpy()
    for r in similarity(srcs, tgt):
        S = load_prompt(r["source"]).prompt.double().numpy()
        m1, m2 = S.mean(0), T.mean(0)
        assert r["mean_cosine"] == pytest.approx(m1 @ m2 / np.linalg.norm(m1) / np.linalg.norm(m2), abs=1e-12)
        f1, f2 = S.ravel(), T.ravel()
        assert r["flat_cosine"] == pytest.approx(f1 @ f2 / np.linalg.norm(f1) / np.linalg.norm(f2), abs=1e-12)


def test_deep_prompt_matrix(tmp_path: Path) -> None:
    """A deep prompt compares through (tokens, layers*2*heads*head_dim): token p's row holds its K and V everywhere."""
    L, H, P, dh = 2, 3, 4, 5
    k, v = torch.randn(L, H, P, dh), torch.randn(L, H, P, dh)
    path = tmp_path / "deep.safetensors"
    save_prompt(path, torch.zeros(0, 8), {"method": "deep"}, {"deep.keys": k, "deep.values": v})
    m = prompt_matrix(load_prompt(path))
    assert m.shape == (P, L * 2 * H * dh)
    for p in range(P):
        want = torch.cat([torch.cat([k[layer, :, p].reshape(-1), v[layer, :, p].reshape(-1)]) for layer in range(L)])
        torch.testing.assert_close(m[p], want.double())
    plain = write(tmp_path, "plain", [[1.0] * 8])
    with pytest.raises(ValueError, match="deep"):
        similarity([plain], str(path))


def test_errors(tmp_path: Path) -> None:
    a = write(tmp_path, "a", [[1, 0]])
    b = write(tmp_path, "b", [[1, 0, 0]])
    with pytest.raises(ValueError, match="width"):
        similarity([b], a)
    with pytest.raises(ValueError, match="--by"):
        similarity([a], a, by="l2")
    with pytest.raises(CheckpointError, match="not found"):
        similarity([str(tmp_path / "missing.safetensors")], a)


def test_cli(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    tgt = write(tmp_path, "tgt", [[1, 0], [0, 1]])
    s1 = write(tmp_path, "s1", [[1, 1], [1, 1]])
    s2 = write(tmp_path, "s2", [[-1, 0], [0, 0]])
    assert run(parse(["similarity", s2, s1, "--to", tgt, "--json"])) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r["source"] for r in rows] == [s1, s2]
    assert rows[0]["mean_cosine"] == pytest.approx(1.0)
    assert run(parse(["similarity", s2, s1, "--to", tgt])) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].split() == ["rank", "mean_cos", "flat_cos", "source"]
    assert out[1].split()[-1] == s1 and out[2].split()[-1] == s2
    assert run(argparse.Namespace(cmd="train")) is None  # not this module's command
