"""softprompt.plain: the plain prompt method, its residual reparameterisation, and PEFT's sample-vocab init."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from softprompt.methods import MethodError
from softprompt.models import Backbone
from softprompt.plain import PlainPrompt
from softprompt.prompt import VOCAB_TOP_K, init_prompt
from softprompt.prompted import PromptedModel


def test_residual_reparam_starts_at_the_init_prompt_and_folds_into_a_plain_file() -> None:
    torch.manual_seed(0)
    init = torch.randn(4, 16)
    p = PlainPrompt(init, reparam="residual", hidden=8)
    torch.testing.assert_close(p(), init, rtol=0, atol=0)  # LayerNorm gain 0: step 0 is the --init prompt
    assert [t.shape for t in p.trainable()][0] == (4, 16) and len(p.trainable()) == 7  # P, down, up, norm
    loss = (p() ** 2).sum() + p().sum()
    loss.backward()
    assert p.reparam is not None and float(p.reparam.norm.weight.grad.abs().sum()) > 0  # the gain learns first
    with torch.no_grad():
        p.reparam.norm.weight.fill_(0.5)
    want = init + torch.nn.functional.layer_norm(
        p.reparam.up(torch.relu(p.reparam.down(init))), (16,), 0.5 * torch.ones(16), p.reparam.norm.bias
    )  # the paper's formula, by hand
    torch.testing.assert_close(p(), want)
    tensor, extra, meta = p.saved()
    torch.testing.assert_close(tensor, want.detach())
    assert extra == {} and meta == {"method": "prompt", "reparam": "residual"}  # an ordinary prompt file


def test_reparam_values_are_checked() -> None:
    with pytest.raises(MethodError, match="--reparam must be none or residual"):
        PlainPrompt(torch.zeros(2, 4), reparam="mlp")
    with pytest.raises(MethodError, match="--reparam-hidden >= 1"):
        PlainPrompt(torch.zeros(2, 4), reparam="residual", hidden=0)


def test_plain_prefix_is_build_prefix_of_the_reparameterised_prompt(tiny_backbone: Callable[[str], Backbone]) -> None:
    bb = tiny_backbone("llama")
    pm = PromptedModel(bb)
    p = PlainPrompt(torch.randn(3, bb.embed_dim) * 0.1, reparam="residual", hidden=8)
    with torch.no_grad():
        p.reparam.norm.weight.fill_(1.0)  # type: ignore[union-attr]
        want = pm.build_prefix([p()])
    got = p.eval_prefix(pm)
    assert got.kv is not None and want.kv is not None
    for (k1, v1), (k2, v2) in zip(got.kv, want.kv, strict=True):
        torch.testing.assert_close(k1, k2, rtol=0, atol=0)
        torch.testing.assert_close(v1, v2, rtol=0, atol=0)


def test_sample_vocab_init_draws_rows_from_the_whole_vocabulary(tiny_backbone: Callable[[str], Backbone]) -> None:
    """PEFT's SAMPLE_VOCAB: rows of uniformly drawn token ids over all V rows (not the 5,000 lowest, as `vocab`)."""
    bb = tiny_backbone("bert")
    emb = PromptedModel(bb).embedding_matrix().detach()
    V = emb.shape[0]
    rows = init_prompt("sample-vocab", 200, emb, bb.tokenizer, seed=3)
    ids = [int((emb - r).abs().sum(-1).argmin()) for r in rows]
    torch.testing.assert_close(rows, emb[ids], rtol=0, atol=0)  # every row is a token's embedding
    assert max(ids) > VOCAB_TOP_K and V > VOCAB_TOP_K  # drawn beyond the `vocab` rule's candidates
    torch.testing.assert_close(init_prompt("sample-vocab", 200, emb, bb.tokenizer, seed=3), rows)  # seeded
    assert not torch.equal(init_prompt("sample-vocab", 200, emb, bb.tokenizer, seed=4), rows)


def test_residual_training_saves_an_ordinary_prompt_and_resume_checks_the_reparam(
    tmp_path: Path, tiny_dir: Callable[[str], Path], capsys: pytest.CaptureFixture[str]
) -> None:
    from softprompt.checkpoint import load_prompt
    from softprompt.cli import main

    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps({"text": f"w{i}", "label": "ab"[i % 2]}) + "\n" for i in range(8)))
    out = tmp_path / "r.safetensors"
    argv = ["train", "--model", str(tiny_dir("llama")), "--train", str(data), "--eval", str(data), "--out", str(out)]
    argv += ["--labels", "a=yes,b=no", "--device", "cpu", "--no-progress", "--num-tokens", "3", "--batch-size", "4"]
    argv += ["--max-steps", "2", "--save-every", "1", "--reparam", "residual", "--reparam-hidden", "8"]
    assert main(argv) == 0, capsys.readouterr().err
    ck = load_prompt(out)
    assert ck.meta["method"] == "prompt" and ck.meta["reparam"] == "residual" and set(ck.extra) == set()
    assert main(["eval", "--prompt", str(out), "--data", str(data), "--device", "cpu"]) == 0  # served as any prompt
    capsys.readouterr()
    more = [a if a != "2" else "3" for a in argv]
    resume = [*more[: more.index("--reparam")], "--resume", str(out) + ".state"]  # same run, reparam dropped
    assert main(resume) == 2
    assert "--prompt.reparam was 'residual' in the interrupted run, now 'none'" in capsys.readouterr().err
