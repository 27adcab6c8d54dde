"""softprompt.prompt: every --init rule produces the values its docstring documents; the plain prompt method, its
residual reparameterisation, and PEFT's sample-vocab init.

The embedding matrix is a seeded random (V, 16) tensor, so each prompt row can be traced back to the one vocabulary
row it was copied from. The tokenizer is the tiny models' (the MiniLM / bert-base-uncased WordPiece vocabulary).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from softprompt.checkpoint import save_prompt
from softprompt.methods import MethodError
from softprompt.models import Backbone
from softprompt.prompt import (
    VOCAB_TOP_K,
    InitError,
    InitSpec,
    PlainPrompt,
    SoftPrompt,
    init_prompt,
    tensor_digest,
    vocab_candidate_ids,
)
from softprompt.prompted import PromptedModel

D = 16


@pytest.fixture(scope="module")
def tok(tiny_backbone: Callable[[str], Backbone]):
    return tiny_backbone("bert").tokenizer


@pytest.fixture(scope="module")
def embed(tok) -> torch.Tensor:
    return torch.randn(len(tok), D, generator=torch.Generator().manual_seed(0))


def source_ids(out: torch.Tensor, embed: torch.Tensor) -> list[int]:
    """The vocabulary id each row of `out` is an exact copy of (exactly one per row)."""
    ids = []
    for row in out:
        hit = (embed == row).all(1).nonzero().flatten().tolist()
        assert len(hit) == 1, "row is not a copy of exactly one embedding row"
        ids.append(hit[0])
    return ids


def vocab_ids(tok, names: list[str]) -> list[int]:
    ids = tok.convert_tokens_to_ids(names)
    assert tok.unk_token_id not in ids
    return ids


# ----- the candidate ids -------------------------------------------------------------------------------------
def test_vocab_candidates_are_first_5000_real_tokens(tok) -> None:
    cand = vocab_candidate_ids(tok, len(tok))
    # bert-base-uncased: 0 [PAD], 1-99 and 104-998 [unusedN], 100-103 [UNK] [CLS] [SEP] [MASK]; 999 is "!"
    assert VOCAB_TOP_K == 5000
    assert cand == list(range(999, 999 + 5000))
    assert tok.convert_ids_to_tokens(999) == "!" and tok.convert_ids_to_tokens(998).startswith("[unused")
    names = tok.convert_ids_to_tokens(cand)
    assert not set(cand) & set(tok.all_special_ids) and not any(n.startswith("[unused") for n in names)


# ----- random ------------------------------------------------------------------------------------------------
def test_random_init(tok, embed: torch.Tensor) -> None:
    out = init_prompt("random", 64, embed, tok, seed=3, scale=0.25)
    assert out.shape == (64, D) and out.dtype == torch.float32
    assert float(out.abs().max()) <= 0.25
    assert float(out.abs().max()) > 0.24 and float(out.min()) < -0.24  # uniform over the whole range
    assert abs(float(out.mean())) < 0.02 and abs(float(out.std()) - 0.25 / 3**0.5) < 0.01  # U(-a, a): std a/sqrt(3)
    assert torch.equal(out, init_prompt("random", 64, embed, tok, seed=3, scale=0.25))
    assert not torch.equal(out, init_prompt("random", 64, embed, tok, seed=4, scale=0.25))
    default = init_prompt("random", 64, embed, tok, seed=3)  # scale 0.5 by default
    assert 0.49 < float(default.abs().max()) <= 0.5
    assert init_prompt("random", 4, embed.bfloat16(), tok).dtype == torch.float32


# ----- vocab -------------------------------------------------------------------------------------------------
def test_vocab_init(tok, embed: torch.Tensor) -> None:
    out = init_prompt("vocab", 40, embed, tok, seed=0)
    assert out.shape == (40, D) and out.dtype == torch.float32
    ids = source_ids(out, embed)
    assert len(set(ids)) == 40  # drawn without replacement
    assert all(999 <= i < 999 + 5000 for i in ids)
    assert ids != sorted(ids)  # a random draw, not the first 40
    assert source_ids(init_prompt("vocab", 40, embed, tok, seed=0), embed) == ids
    assert source_ids(init_prompt("vocab", 40, embed, tok, seed=1), embed) != ids
    before = embed.clone()
    out.add_(1)  # a copy, not a view of the embedding matrix
    assert torch.equal(embed, before)


def test_vocab_init_too_few_candidates(tok, embed: torch.Tensor) -> None:
    small = embed[:1005]  # ids 999..1004 are the only candidates
    assert len(source_ids(init_prompt("vocab", 6, small, tok), small)) == 6
    with pytest.raises(InitError, match="--init vocab"):
        init_prompt("vocab", 7, small, tok)


# ----- text --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "spec",
    [
        'text:"classify the sentiment"',
        "text:'classify the sentiment'",
        "text:classify the sentiment",
        ' text: "classify the sentiment" ',
    ],
)
def test_text_init(spec: str, tok, embed: torch.Tensor) -> None:
    ids = vocab_ids(tok, ["classify", "the", "sentiment"])
    out = init_prompt(spec, 7, embed, tok)
    assert torch.equal(out, embed[[ids[i % 3] for i in range(7)]])  # repeated cyclically
    assert torch.equal(init_prompt(spec, 2, embed, tok), embed[ids[:2]])  # cut


def test_text_init_multi_piece(tok, embed: torch.Tensor) -> None:
    ids = vocab_ids(tok, ["ke", "##rf", "##uf", "##fle"])
    out = init_prompt('text:"kerfuffle"', 6, embed, tok)
    assert source_ids(out, embed) == ids + ids[:2]
    with pytest.raises(InitError, match="--init text"):
        init_prompt('text:"   "', 3, embed, tok)  # tokenises to nothing


# ----- labels ------------------------------------------------------------------------------------------------
def test_labels_init(tok, embed: torch.Tensor) -> None:
    great, mediocre = vocab_ids(tok, ["great"]), vocab_ids(tok, ["med", "##io", "##cre"])
    out = init_prompt("labels", 6, embed, tok, seed=0, label_words=[" great", " mediocre"])
    assert out.shape == (6, D)
    torch.testing.assert_close(out[0], embed[great[0]], rtol=0, atol=0)
    torch.testing.assert_close(out[1], (embed[mediocre[0]] + embed[mediocre[1]] + embed[mediocre[2]]) / 3)
    rest = source_ids(out[2:], embed)  # the remaining rows follow the vocab rule
    assert len(set(rest)) == 4 and all(999 <= i < 5999 for i in rest)


def test_labels_init_more_labels_than_rows(tok, embed: torch.Tensor) -> None:
    words = ["great", "terrible", "okay"]
    out = init_prompt("labels", 2, embed, tok, label_words=words)
    assert torch.equal(out, embed[vocab_ids(tok, words[:2])])


def test_labels_init_needs_words(tok, embed: torch.Tensor) -> None:
    with pytest.raises(InitError, match="--init labels"):
        init_prompt("labels", 4, embed, tok)
    with pytest.raises(InitError, match="--init labels"):
        init_prompt("labels", 4, embed, tok, label_words=["good", "  "])


# ----- file --------------------------------------------------------------------------------------------------
def test_file_init(tmp_path: Path, tok, embed: torch.Tensor) -> None:
    src = torch.randn(5, D, generator=torch.Generator().manual_seed(9))
    path = tmp_path / "src.safetensors"
    save_prompt(path, src, {"base_model": "tiny"})
    assert torch.equal(init_prompt(f"file:{path}", 5, embed, tok), src)
    assert torch.equal(init_prompt(f'file:"{path}"', 3, embed, tok), src[:3])  # a longer source is cut
    longer = init_prompt(f"file:{path}", 9, embed, tok, seed=0)  # a shorter one is completed from the vocab
    assert torch.equal(longer[:5], src)
    rest = source_ids(longer[5:], embed)
    assert len(set(rest)) == 4 and all(999 <= i < 5999 for i in rest)


def test_file_init_dim_mismatch(tmp_path: Path, tok, embed: torch.Tensor) -> None:
    path = tmp_path / "other.safetensors"
    save_prompt(path, torch.zeros(5, D + 1), {})
    with pytest.raises(InitError, match="--init file:.*dim 17.*16"):
        init_prompt(f"file:{path}", 5, embed, tok)


# ----- parsing -----------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("spec", "kind", "arg"),
    [
        ("random", "random", ""),
        (" vocab ", "vocab", ""),
        ("labels", "labels", ""),
        ('text:"Classify: yes or no"', "text", "Classify: yes or no"),
        ("text:'it said \"hi\"'", "text", 'it said "hi"'),
        ("file:/tmp/a b.safetensors", "file", "/tmp/a b.safetensors"),
        ("file:C:/x.safetensors", "file", "C:/x.safetensors"),
    ],
)
def test_initspec_parse(spec: str, kind: str, arg: str) -> None:
    rule = InitSpec.parse(spec)
    assert (rule.kind, rule.arg) == (kind, arg)
    assert InitSpec.parse(str(rule)) == rule


@pytest.mark.parametrize(
    "spec", ["", "bogus", "Random", "vocab:3", "text:", 'text:""', "text: ", "file:", "file:''", "textual"]
)
def test_initspec_parse_errors_name_the_flag(spec: str, tok, embed: torch.Tensor) -> None:
    with pytest.raises(InitError, match="^--init"):
        InitSpec.parse(spec)
    with pytest.raises(InitError, match="^--init"):
        init_prompt(spec, 2, embed, tok)


def test_soft_prompt_module() -> None:
    sp = SoftPrompt(4, D)
    assert sp.num_tokens == 4 and sp().shape == (4, D) and sp().requires_grad
    assert [n for n, _ in sp.named_parameters()] == ["embedding"]
    with pytest.raises(InitError, match="--num-tokens"):
        SoftPrompt(0, D)


def test_tensor_digest() -> None:
    t = torch.arange(6, dtype=torch.float32).view(2, 3)
    assert tensor_digest(t) == tensor_digest(t.clone()) and len(tensor_digest(t)) == 16
    assert tensor_digest(t) != tensor_digest(t.view(3, 2))  # shape
    assert tensor_digest(t) != tensor_digest(t.double())  # dtype
    u = t.clone()
    u[1, 2] += 1e-6
    assert tensor_digest(t) != tensor_digest(u)  # values
    assert tensor_digest(t.T) == tensor_digest(t.T.contiguous())  # layout does not matter


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
