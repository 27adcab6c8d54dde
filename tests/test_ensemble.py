"""Prompt ensembles (api.Predictor with several prompt files): checked against hand-combined single-prompt runs.

Reference: each prompt is loaded alone in its own Predictor (one prompt, no ensemble code involved); the ensemble's
mean must equal the arithmetic mean of those probabilities and its vote the hand-counted majority (ties broken by
the mean probability). The ensemble must also run every (input, prompt) pair in one batched forward pass.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from tiny import tiny_model_dir  # pytest puts tests/ on sys.path

from softprompt.api import Predictor
from softprompt.checkpoint import CheckpointError, save_prompt
from softprompt.cli import main
from softprompt.models import Backbone, load_backbone
from softprompt.task import TaskSpec

TEXTS = ["a great film", "dull and slow", "hello world this is long", "ok", "not bad at all, really"]


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("ens")


def backbone(kind: str, root: Path) -> Backbone:
    return load_backbone(str(tiny_model_dir(kind, root / "tiny")), progress=False)


def write_prompts(bb: Backbone, root: Path, lengths: list[int], labels: str, *, seed: int = 0) -> list[str]:
    """Random prompt files of the given lengths, with the metadata `train` would write."""
    from softprompt.config import DataConfig
    from softprompt.data import Verbalizer

    head = "similarity" if bb.family == "encoder" else "lm"  # an encoder's similarity head has no weights
    spec = TaskSpec.from_config(DataConfig(template="Review: {text} Sentiment:", labels=labels, head=head))
    spec.verbalizer = Verbalizer.parse(labels)
    meta = {
        "base_model": str(bb.model.name_or_path),
        "architecture": bb.architecture,
        "family": bb.family,
        "fingerprint": bb.fingerprint,
        **spec.to_meta(),
    }
    g = torch.Generator().manual_seed(seed)
    paths = []
    for i, n in enumerate(lengths):
        p = root / f"{bb.family}-{seed}-{i}.safetensors"
        save_prompt(p, torch.randn(n, bb.embed_dim, generator=g), meta)
        paths.append(str(p))
    return paths


def single_probs(bb: Backbone, paths: list[str]) -> torch.Tensor:
    """(K, N, L) probabilities of each prompt alone."""
    out = []
    for p in paths:
        pred = Predictor.load(p, backbone=bb)
        out.append(pred.probs(pred.task.encode_texts(TEXTS)[0]))
    return torch.stack(out)


def hand_vote(single: torch.Tensor) -> list[int]:
    """Majority of the K argmaxes per input; a tie goes to the tied label with the larger mean probability."""
    K, N, L = single.shape
    out = []
    for i in range(N):
        counts = [0] * L
        for k in range(K):
            counts[int(single[k, i].argmax())] += 1
        best = max(counts)
        tied = [c for c in range(L) if counts[c] == best]
        mean = single[:, i].mean(0)
        out.append(max(tied, key=lambda c: float(mean[c])))
    return out


# three labels, one multi-token verbalizer word: exercises the repeated-row scoring path and vote ties
LABELS3 = "0=bad,1=very good,2=fine"


@pytest.mark.parametrize("kind", ["llama", "gpt2", "t5", "bert"])
def test_mean_and_vote_match_hand_combination(kind: str, root: Path) -> None:
    bb = backbone(kind, root)
    paths = write_prompts(bb, root, [3, 5, 4], LABELS3)  # different lengths: left-padded prefixes
    single = single_probs(bb, paths)
    ens = Predictor.load(paths, backbone=bb, combine="mean")
    enc = ens.task.encode_texts(TEXTS)[0]
    torch.testing.assert_close(ens.probs(enc), single.mean(0), atol=1e-5, rtol=1e-5)
    rows = ens.predict(TEXTS)
    labels = ens.labels
    assert [r["label"] for r in rows] == [labels[int(i)] for i in single.mean(0).argmax(-1)]
    vote = Predictor.load(paths, backbone=bb, combine="vote")
    assert vote.probs(enc).argmax(-1).tolist() == hand_vote(single)
    assert len({tuple(a) for a in single.argmax(-1).tolist()}) > 1  # the members disagree somewhere


def test_encoder_members_keep_their_own_linear_heads(root: Path) -> None:
    """Encoder prompts trained with --head linear each carry a head: every member scores its rows with its own."""
    from softprompt.checkpoint import load_prompt

    bb = backbone("bert", root)
    (root / "lin").mkdir(exist_ok=True)
    paths = write_prompts(bb, root / "lin", [3, 4], LABELS3, seed=5)
    g = torch.Generator().manual_seed(11)
    for p in paths:  # give each member its own random linear head, as `train --head linear` writes it
        ck = load_prompt(p)
        meta = {**ck.meta, "head": "linear"}
        heads = {"head.linear.weight": torch.randn(3, bb.embed_dim, generator=g), "head.linear.bias": torch.randn(3)}
        save_prompt(p, ck.prompt, meta, heads)
    single = single_probs(bb, paths)
    assert not torch.allclose(single[0], single[1], atol=1e-2)  # the heads differ: so do the members
    ens = Predictor.load(paths, backbone=bb)
    torch.testing.assert_close(ens.probs(ens.task.encode_texts(TEXTS)[0]), single.mean(0), atol=1e-5, rtol=1e-5)


def with_linear_head(bb: Backbone, path: str, num_labels: int, seed: int) -> None:
    """Rewrite a prompt file as `train --head linear` writes it: head.linear.* tensors and head: linear."""
    from softprompt.checkpoint import load_prompt

    ck = load_prompt(path)
    g = torch.Generator().manual_seed(seed)
    heads = {
        "head.linear.weight": torch.randn(num_labels, bb.embed_dim, generator=g),
        "head.linear.bias": torch.randn(num_labels, generator=g),
    }
    save_prompt(path, ck.prompt, {**ck.meta, "head": "linear"}, heads)


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_decoder_ensemble_mixes_verbalizer_and_linear_head_members(kind: str, root: Path) -> None:
    """A verbalizer prompt and --head linear prompts of one task in one ensemble: each member scores as it does
    alone (the verbalizer one through the LM's logits of its label tokens, the others through their heads)."""
    bb = backbone(kind, root)
    (root / "mix").mkdir(exist_ok=True)
    labels = "0=bad,1=good,2=fine"  # one-token words
    paths = write_prompts(bb, root / "mix", [3, 4, 2], labels, seed=7)
    with_linear_head(bb, paths[1], 3, seed=1)
    with_linear_head(bb, paths[2], 3, seed=2)
    single = single_probs(bb, paths)  # member 0 alone: verbalizer scoring (label_scores' lm path)
    for order in (paths, paths[::-1]):  # the verbalizer member first or last
        ens = Predictor.load(order, backbone=bb)
        got = ens.probs(ens.task.encode_texts(TEXTS)[0])
        torch.testing.assert_close(got, single.mean(0), atol=1e-5, rtol=1e-5)
    # multi-token label words: a verbalizer member cannot be written as a head; one clear error naming the file
    multi = write_prompts(bb, root / "mix", [3, 4], LABELS3, seed=8)
    with_linear_head(bb, multi[1], 3, seed=3)
    with pytest.raises(
        CheckpointError, match=r"-8-0\.safetensors: a verbalizer prompt joins --head linear .* one-token"
    ):
        Predictor.load(multi, backbone=bb)


def test_vote_tie_break_by_mean_probability(root: Path) -> None:
    """Two prompts: every disagreement is a 1-1 tie, decided by the mean probability."""
    bb = backbone("llama", root)
    paths = write_prompts(bb, root, [2, 6], "0=bad,1=good", seed=5)
    single = single_probs(bb, paths)
    assert (single[0].argmax(-1) != single[1].argmax(-1)).sum() >= 2  # seed chosen so that there are ties
    vote = Predictor.load(paths, backbone=bb, combine="vote")
    enc = vote.task.encode_texts(TEXTS)[0]
    got = vote.probs(enc).argmax(-1)
    assert got.tolist() == hand_vote(single)
    # with K=2, a vote is unanimous or a tie, so it always equals the mean's argmax
    assert got.tolist() == single.mean(0).argmax(-1).tolist()


def test_one_batched_forward_for_all_prompts(root: Path) -> None:
    """K prompts x N inputs: one call of the decoder over N*K rows (the prefixes were computed once, at load)."""
    bb = backbone("llama", root)
    paths = write_prompts(bb, root, [3, 5, 4], "0=bad,1=good")
    ens = Predictor.load(paths, backbone=bb, batch_size=64)
    enc = ens.task.encode_texts(TEXTS)[0]
    calls: list[int] = []
    hook = bb.model.model.register_forward_hook(
        lambda m, a, kw, out: calls.append(kw["inputs_embeds"].shape[0]), with_kwargs=True
    )
    try:
        ens.probs(enc)
    finally:
        hook.remove()
    assert calls == [len(TEXTS) * len(paths)]


def test_ensemble_refuses_prompts_of_different_tasks(root: Path) -> None:
    bb = backbone("llama", root)
    a = write_prompts(bb, root, [3], "0=bad,1=good", seed=50)
    b = write_prompts(bb, root, [3], "0=bad,1=fine", seed=60)
    with pytest.raises(ValueError, match="one task"):
        Predictor.load(a + b, backbone=bb)
    with pytest.raises(ValueError, match="combine"):
        Predictor.load(a, backbone=bb, combine="median")


def test_cli_predict_ensemble_matches_api(root: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bb = backbone("llama", root)
    paths = write_prompts(bb, root, [3, 5, 4], "0=bad,1=good", seed=7)
    data = tmp_path / "in.jsonl"
    data.write_text("".join(json.dumps({"text": t}) + "\n" for t in TEXTS))
    for combine in ("mean", "vote"):
        argv = ["predict", "--data", str(data), "--combine", combine]
        for p in paths:
            argv += ["--prompt", p]
        assert main(argv) == 0
        rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
        ref = Predictor.load(paths, backbone=bb, combine=combine).predict(str(data))
        assert [r["label"] for r in rows] == [r["label"] for r in ref]
        for r, s in zip(rows, ref):
            assert r["probs"] == pytest.approx(s["probs"], abs=1e-6)
