"""softprompt.prompted: the one forward path, checked against independent references.

- PEFT's prompt tuning (`peft.get_peft_model` + `PromptTuningConfig`) with the same prompt values, for
  GPT-2, Llama (causal LM), T5 (seq2seq) and BERT (feature extraction).
- A hand-built reference: `model(inputs_embeds=cat(cls_emb, prompt, token_embeds))` on each example alone
  (default positions, no mask, no cache), log_softmax of the logits; greedy generation by an explicit argmax loop.
- Invariances serving relies on: padding, several prompts in one batch, lm head applied only where scored,
  gradients only on the prompt (and a trainable head).

Causal tests use the "sharp" tiny models (conftest.py): their generations vary with the prompt, so
token-identical generations mean something.
"""

from __future__ import annotations

import copy
from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F

from softprompt.models import Backbone
from softprompt.prompted import Batch, LinearHead, Prefix, PromptedModel

CAUSAL = ("llama", "gpt2", "qwen2")
PATHS = {"fast": False, "naive": True}  # name -> naive flag
TEXTS = [
    "the film was a delight from start to finish",
    "dull",
    "an honest, quiet and moving story",
    "not good at all",
]
SINGLE = ["great", "terrible"]  # verbalizers of one token each (vocabulary entries, see label_ids)
MULTI = ["great", "meh", "mediocre"]  # WordPiece: 1, 2 and 3 pieces ("me ##h", "med ##io ##cre")
NEW_TOKENS = 8
TOL = 1e-5

BackboneFn = Callable[[str], Backbone]


# ----- helpers (independent of softprompt) -------------------------------------------------------------------
def make_prompt(n: int, d: int, seed: int, scale: float = 0.3) -> torch.Tensor:
    return torch.randn(n, d, generator=torch.Generator().manual_seed(seed)) * scale


def plain_ids(bb: Backbone, text: str) -> list[int]:
    return list(bb.tokenizer(text, add_special_tokens=False)["input_ids"])


def word_ids(bb: Backbone, words: list[str]) -> list[list[int]]:
    return [plain_ids(bb, w) for w in words]


def label_ids(bb: Backbone, which: str) -> list[list[int]]:
    """Verbalizer token ids: "single" = one vocabulary token per class, "multi" = tokenised words of mixed lengths.

    (The tiny qwen2 loads the vocabulary into transformers' Qwen2Tokenizer, which splits words into characters,
    so single-token verbalizers are taken from the vocabulary, not by tokenising.)"""
    if which == "single":
        return [[bb.tokenizer.convert_tokens_to_ids(w)] for w in SINGLE]
    ids = word_ids(bb, MULTI)
    assert len({len(x) for x in ids}) == len(ids) and max(len(x) for x in ids) > 1
    return ids


def embeds(bb: Backbone, lead: list[int], prompt: torch.Tensor, ids: list[int]) -> torch.Tensor:
    """(1, S, d): embeddings of `lead` tokens, the prompt rows, then the input tokens."""
    emb = bb.model.get_input_embeddings()
    parts = [emb(torch.tensor(lead, dtype=torch.long)), prompt, emb(torch.tensor(ids, dtype=torch.long))]
    return torch.cat(parts)[None]


def ref_scores(bb: Backbone, x: torch.Tensor, labels: list[list[int]]) -> torch.Tensor:
    """(L,) mean log-prob of each label sequence following the single row of embeddings x (1, S, d)."""
    emb = bb.model.get_input_embeddings()
    S, out = x.shape[1], []
    for lab in labels:
        xx = torch.cat([x, emb(torch.tensor([lab[:-1]], dtype=torch.long))], 1)
        logp = bb.model(inputs_embeds=xx).logits[0].float().log_softmax(-1)
        out.append(torch.stack([logp[S - 1 + j, t] for j, t in enumerate(lab)]).mean())
    return torch.stack(out)


@torch.no_grad()
def ref_greedy(bb: Backbone, x: torch.Tensor, n: int) -> list[int]:
    """Greedy decoding by hand: argmax of the last logits, appended, up to n tokens or EOS."""
    emb, eos, out = bb.model.get_input_embeddings(), bb.model.generation_config.eos_token_id, []
    for _ in range(n):
        t = int(bb.model(inputs_embeds=x).logits[0, -1].argmax())
        out.append(t)
        if t == eos:
            break
        x = torch.cat([x, emb(torch.tensor([[t]]))], 1)
    return out


def trim(seq: list[int], eos: int, pad: int) -> list[int]:
    """Generated ids up to and including EOS; everything after EOS must be padding."""
    if eos in seq:
        i = seq.index(eos)
        assert all(t == pad for t in seq[i + 1 :]), seq
        return seq[: i + 1]
    return seq


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def batch_of(pm: PromptedModel, texts: list[str], labels: list[int] | None = None) -> Batch:
    return pm.collate([pm.encode_input(t) for t in texts], labels)


# ----- 1. PEFT equivalence -----------------------------------------------------------------------------------
def peft_model(bb: Backbone, task_type: str, prompt: torch.Tensor, **cfg):
    from peft import PromptTuningConfig, get_peft_model

    model = copy.deepcopy(bb.model)  # get_peft_model wraps (and may modify) the model it is given
    pmod = get_peft_model(model, PromptTuningConfig(task_type=task_type, num_virtual_tokens=prompt.shape[0], **cfg))
    weight = pmod.prompt_encoder["default"].embedding.weight
    assert weight.shape == prompt.shape
    with torch.no_grad():
        weight.copy_(prompt)
    return pmod.eval()


@pytest.mark.parametrize("path", list(PATHS))
@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_peft_equivalence_causal(kind: str, path: str, sharp_backbone: BackboneFn) -> None:
    bb = sharp_backbone(kind)
    prompt = make_prompt(6, bb.embed_dim, seed=1)
    pmod = peft_model(bb, "CAUSAL_LM", prompt)
    pm = PromptedModel(bb, position="start", naive=PATHS[path])
    assert pm.prefix_ids == []  # --position start: PEFT's layout, the prompt before everything
    prefix = pm.build_prefix([prompt])
    assert (prefix.kv is None) == PATHS[path]
    some = [[t] for t in range(1000, 30000, 997)]  # single-token "verbalizers" spread over the vocab

    equal = ["i loved it", "i hated it", "it was fine"]
    groups = [[t] for t in TEXTS] + [equal]  # unpadded single inputs, then an equal-length batch
    for texts in groups:
        inputs = [pm.encode_input(t) for t in texts]
        assert inputs == [[bb.tokenizer.cls_token_id] + plain_ids(bb, t) for t in texts]  # BOS after the prompt
        assert len({len(x) for x in inputs}) == 1
        ids = torch.tensor(inputs)
        with torch.no_grad():
            want = pmod(input_ids=ids, attention_mask=torch.ones_like(ids)).logits[:, -1].float().log_softmax(-1)
            batch = pm.collate(inputs)
            assert bool(batch.mask.all())
            T = ids.shape[1]
            pos = torch.full((len(texts), 1), T - 1)
            full = pm.lm_logits(pm.causal_hidden(prefix, None, batch.ids, batch.mask, pos))[:, 0].log_softmax(-1)
            scores = pm.label_scores(prefix, None, batch, some)
        torch.testing.assert_close(full, want, rtol=0, atol=TOL)
        torch.testing.assert_close(scores, want[:, [t[0] for t in some]], rtol=0, atol=TOL)


def test_peft_equivalence_t5(tiny_backbone: BackboneFn) -> None:
    bb = tiny_backbone("t5")
    prompt = make_prompt(5, bb.embed_dim, seed=2)
    # one transformer submodule: PEFT prompt tuning only ever prepends to the encoder input
    pmod = peft_model(bb, "SEQ_2_SEQ_LM", prompt, num_transformer_submodules=1)
    pm = PromptedModel(bb, position="start")
    labels = pm.verbalizer_ids(["great movie", "bad", "so so so"], "{text}")
    eos = bb.tokenizer.sep_token_id
    assert labels == [ids + [eos] for ids in word_ids(bb, ["great movie", "bad", "so so so"])]
    prefix = pm.build_prefix([prompt])
    equal = ["i loved it", "i hated it", "it was fine"]
    for texts in [[t] for t in TEXTS] + [equal]:
        inputs = [pm.encode_input(t) for t in texts]
        assert inputs == [list(bb.tokenizer(t)["input_ids"]) for t in texts]  # [CLS] ... [SEP] kept as is
        ids = torch.tensor(inputs)
        want = torch.zeros(len(texts), len(labels))
        with torch.no_grad():
            for j, lab in enumerate(labels):
                y = torch.tensor([lab] * len(texts))
                logp = pmod(input_ids=ids, attention_mask=torch.ones_like(ids), labels=y).logits.float().log_softmax(-1)
                want[:, j] = logp.gather(-1, y[..., None])[..., 0].mean(-1)
            got = pm.label_scores(prefix, None, pm.collate(inputs), labels)
        torch.testing.assert_close(got, want, rtol=0, atol=TOL)


def test_peft_equivalence_bert(tiny_backbone: BackboneFn) -> None:
    bb = tiny_backbone("bert")
    P = 5
    prompt = make_prompt(P, bb.embed_dim, seed=3)
    pmod = peft_model(bb, "FEATURE_EXTRACTION", prompt)
    pm = PromptedModel(bb, position="start")
    prefix = pm.build_prefix([prompt])
    equal = ["i loved it", "i hated it", "it was fine"]
    for texts in [[t] for t in TEXTS] + [equal]:
        inputs = [pm.encode_input(t) for t in texts]
        assert inputs == [list(bb.tokenizer(t)["input_ids"]) for t in texts]
        ids = torch.tensor(inputs)
        with torch.no_grad():
            want = pmod(input_ids=ids, attention_mask=torch.ones_like(ids)).last_hidden_state
            batch = pm.collate(inputs)
            h, attn, pool = pm.encoder_hidden(prefix, None, batch.ids, batch.mask)
        assert want.shape == h.shape == (len(texts), P + ids.shape[1], bb.embed_dim)
        torch.testing.assert_close(h[:, P:], want[:, P:], rtol=0, atol=TOL)  # the input token positions
        torch.testing.assert_close(h, want, rtol=0, atol=TOL)
        assert bool(attn.all()) and pool[:, :P].sum() == 0 and bool(pool[:, P:].all())


# ----- 2. fast path == naive path == hand-built reference ----------------------------------------------------
@pytest.mark.parametrize("which", ["single", "multi"])
@pytest.mark.parametrize("kind", CAUSAL)
def test_scores_match_reference(kind: str, which: str, sharp_backbone: BackboneFn) -> None:
    bb = sharp_backbone(kind)
    prompt = make_prompt(7, bb.embed_dim, seed=4)
    cls = [bb.tokenizer.cls_token_id]
    labels = label_ids(bb, which)
    with torch.no_grad():
        want = torch.stack([ref_scores(bb, embeds(bb, cls, prompt, plain_ids(bb, t)), labels) for t in TEXTS])
        for naive in (False, True):
            pm = PromptedModel(bb, naive=naive)
            assert pm.prefix_ids == cls  # --position auto: [CLS] stays first, the prompt follows it
            assert pm.verbalizer_ids(MULTI, "{text}") == word_ids(bb, MULTI)  # " great": the space is dropped
            batch = batch_of(pm, TEXTS)
            assert batch.mask[:, 0].tolist() == [1, 0, 0, 0] and bool(batch.mask[:, -1].all())  # left-padded
            got = pm.label_scores(pm.build_prefix([prompt]), None, batch, labels)
            torch.testing.assert_close(got, want, rtol=0, atol=TOL)
    assert float((want[:, 0] - want[:, 1]).abs().max()) > 100 * TOL  # the classes are told apart


@pytest.mark.parametrize("kind", CAUSAL)
def test_target_logp_matches_reference(kind: str, sharp_backbone: BackboneFn) -> None:
    bb = sharp_backbone(kind)
    prompt = make_prompt(4, bb.embed_dim, seed=5)
    cls, eos = [bb.tokenizer.cls_token_id], bb.tokenizer.sep_token_id
    targets = ["a happy ending", "no", "quite a long target answer"]
    texts = TEXTS[:3]
    with torch.no_grad():
        for naive in (False, True):
            pm = PromptedModel(bb, naive=naive)
            tgts = [pm.encode_target(" " + t) for t in targets]
            assert tgts == [plain_ids(bb, t) + [eos] for t in targets]
            batch = pm.collate([pm.encode_input(t) for t in texts], targets=tgts)
            tok, valid = pm.target_logp(pm.build_prefix([prompt]), None, batch)
            for i, (t, y) in enumerate(zip(texts, tgts)):
                x = embeds(bb, cls, prompt, plain_ids(bb, t) + y[:-1])
                logp = bb.model(inputs_embeds=x).logits[0].float().log_softmax(-1)
                S = x.shape[1] - len(y)
                want = torch.stack([logp[S + j, c] for j, c in enumerate(y)])
                assert valid[i].sum() == len(y) and not valid[i, len(y) :].any()
                torch.testing.assert_close(tok[i, : len(y)], want, rtol=0, atol=TOL)


@pytest.mark.parametrize("which", ["single", "multi"])
@pytest.mark.parametrize("kind", CAUSAL)
def test_prompt_grad_matches_reference(kind: str, which: str, sharp_backbone: BackboneFn) -> None:
    bb = sharp_backbone(kind)
    init = make_prompt(7, bb.embed_dim, seed=6)
    cls, labels = [bb.tokenizer.cls_token_id], label_ids(bb, which)
    gold = torch.tensor([0, 1, 1, 0])

    p = init.clone().requires_grad_(True)
    ref = torch.stack([ref_scores(bb, embeds(bb, cls, p, plain_ids(bb, t)), labels) for t in TEXTS])
    F.cross_entropy(ref, gold).backward()
    assert p.grad is not None
    want = p.grad.clone()
    assert float(want.abs().max()) > 0

    for naive in (False, True):
        pm = PromptedModel(bb, naive=naive)
        q = init.clone().requires_grad_(True)
        loss = pm.loss(pm.build_prefix([q]), batch_of(pm, TEXTS, gold.tolist()), labels)
        loss.backward()
        assert q.grad is not None
        assert rel(q.grad, want) <= 1e-4, (naive, rel(q.grad, want))


@pytest.mark.parametrize("kind", CAUSAL)
def test_generate_matches_reference(kind: str, sharp_backbone: BackboneFn) -> None:
    bb = sharp_backbone(kind)
    prompt = make_prompt(7, bb.embed_dim, seed=7)
    cls = [bb.tokenizer.cls_token_id]
    eos = bb.model.generation_config.eos_token_id
    want = [ref_greedy(bb, embeds(bb, cls, prompt, plain_ids(bb, t)), NEW_TOKENS) for t in TEXTS]
    for naive in (False, True):
        pm = PromptedModel(bb, naive=naive)
        out = pm.generate(
            pm.build_prefix([prompt]), None, batch_of(pm, TEXTS), max_new_tokens=NEW_TOKENS, do_sample=False
        )
        assert out.shape[0] == len(TEXTS) and out.shape[1] <= NEW_TOKENS
        assert [trim(s, eos, pm.pad_id) for s in out.tolist()] == want, naive
    # the reference is not degenerate: another prompt changes what is generated
    other = [
        ref_greedy(bb, embeds(bb, cls, make_prompt(7, bb.embed_dim, seed=70), plain_ids(bb, t)), NEW_TOKENS)
        for t in TEXTS
    ]
    assert other != want


# ----- 3. padding and several prompts in one batch ------------------------------------------------------------
@pytest.mark.parametrize("path", list(PATHS))
@pytest.mark.parametrize("kind", CAUSAL)
def test_left_padding_invariance(kind: str, path: str, sharp_backbone: BackboneFn) -> None:
    # --position auto is covered against the per-example reference above; here --position start, where the
    # BOS token is the first input token of each (left-padded) row
    bb = sharp_backbone(kind)
    pm = PromptedModel(bb, position="start", naive=PATHS[path])
    prefix = pm.build_prefix([make_prompt(5, bb.embed_dim, seed=8)])
    for which in ("single", "multi"):
        labels = label_ids(bb, which)
        with torch.no_grad():
            together = pm.label_scores(prefix, None, batch_of(pm, TEXTS), labels)
            alone = torch.cat([pm.label_scores(prefix, None, batch_of(pm, [t]), labels) for t in TEXTS])
        torch.testing.assert_close(together, alone, rtol=0, atol=TOL)


def test_right_padding_invariance_t5(tiny_backbone: BackboneFn) -> None:
    bb = tiny_backbone("t5")
    pm = PromptedModel(bb)
    prefix = pm.build_prefix([make_prompt(5, bb.embed_dim, seed=9)])
    labels = pm.verbalizer_ids(MULTI, "{text}")
    batch = batch_of(pm, TEXTS)
    assert batch.mask[:, 0].all() and batch.mask[:, -1].tolist() == [1, 0, 0, 0]  # right-padded
    with torch.no_grad():
        together = pm.label_scores(prefix, None, batch, labels)
        alone = torch.cat([pm.label_scores(prefix, None, batch_of(pm, [t]), labels) for t in TEXTS])
        gen = pm.generate(prefix, None, batch, max_new_tokens=NEW_TOKENS, do_sample=False)
        gen_alone = [
            pm.generate(prefix, None, batch_of(pm, [t]), max_new_tokens=NEW_TOKENS, do_sample=False)[0] for t in TEXTS
        ]
    torch.testing.assert_close(together, alone, rtol=0, atol=TOL)
    eos = bb.model.generation_config.eos_token_id
    assert [trim(s, eos, pm.pad_id) for s in gen.tolist()] == [trim(s.tolist(), eos, pm.pad_id) for s in gen_alone]


def test_right_padding_invariance_bert(tiny_backbone: BackboneFn) -> None:
    bb = tiny_backbone("bert")
    pm = PromptedModel(bb)
    torch.manual_seed(0)
    pm.head = LinearHead(bb.embed_dim, 3)
    P = 5
    prefix = pm.build_prefix([make_prompt(P, bb.embed_dim, seed=10)])
    batch = batch_of(pm, TEXTS)
    with torch.no_grad():
        together = pm.label_scores(prefix, None, batch, [])
        alone = torch.cat([pm.label_scores(prefix, None, batch_of(pm, [t]), []) for t in TEXTS])
        h, attn, pool = pm.encoder_hidden(prefix, None, batch.ids, batch.mask)
        # reference: BertModel on [CLS] prompt tokens... [SEP] alone, pooled over the real tokens (not the prompt)
        for i, t in enumerate(TEXTS):
            ids = list(bb.tokenizer(t)["input_ids"])
            x = embeds(bb, ids[:1], prefix.embeds[0, 1:], ids[1:])
            want = bb.model(inputs_embeds=x).last_hidden_state[0]
            n = x.shape[1]
            torch.testing.assert_close(h[i, :n], want, rtol=0, atol=TOL)
            assert attn[i].sum() == n and pool[i].sum() == len(ids)
            keep = torch.tensor([1] + [0] * P + [1] * (len(ids) - 1), dtype=torch.bool)
            torch.testing.assert_close(pm.head(want[keep].mean(0)), together[i], rtol=0, atol=TOL)
    torch.testing.assert_close(together, alone, rtol=0, atol=TOL)


def multi_prefix(pm: PromptedModel, prompts: list[torch.Tensor]) -> Prefix:
    prefix = pm.build_prefix(prompts)
    lead = len(pm.prefix_ids)
    assert prefix.lengths.tolist() == [lead + p.shape[0] for p in prompts]
    assert prefix.mask.sum(1).tolist() == prefix.lengths.tolist() and prefix.width == max(prefix.lengths.tolist())
    return prefix


ROWS = [1, 0, 1, 1]  # row i of TEXTS uses prompt ROWS[i] (not a palindrome: a flipped row order shows)


@pytest.mark.parametrize("path", list(PATHS))
@pytest.mark.parametrize("kind", CAUSAL)
def test_multi_prompt_rows_causal(kind: str, path: str, sharp_backbone: BackboneFn) -> None:
    bb = sharp_backbone(kind)
    pm = PromptedModel(bb, naive=PATHS[path])
    prompts = [make_prompt(3, bb.embed_dim, seed=11), make_prompt(7, bb.embed_dim, seed=12)]
    prefix = multi_prefix(pm, prompts)
    rows = torch.tensor(ROWS)
    batch = batch_of(pm, TEXTS)
    eos = bb.model.generation_config.eos_token_id
    with torch.no_grad():
        for which in ("single", "multi"):
            labels = label_ids(bb, which)
            mixed = pm.label_scores(prefix, rows, batch, labels)
            alone = torch.cat(
                [
                    pm.label_scores(pm.build_prefix([prompts[g]]), None, batch_of(pm, [t]), labels)
                    for t, g in zip(TEXTS, ROWS)
                ]
            )
            torch.testing.assert_close(mixed, alone, rtol=0, atol=TOL)
        gen = pm.generate(prefix, rows, batch, max_new_tokens=NEW_TOKENS, do_sample=False).tolist()
    want = [
        ref_greedy(bb, embeds(bb, pm.prefix_ids, prompts[g], plain_ids(bb, t)), NEW_TOKENS) for t, g in zip(TEXTS, ROWS)
    ]
    assert [trim(s, eos, pm.pad_id) for s in gen] == want
    with pytest.raises(ValueError, match="rows"):
        pm.label_scores(prefix, None, batch, label_ids(bb, "single"))


@pytest.mark.parametrize("kind", ["t5", "bert"])
def test_multi_prompt_rows_encoders(kind: str, tiny_backbone: BackboneFn) -> None:
    bb = tiny_backbone(kind)
    pm = PromptedModel(bb)
    if kind == "bert":
        torch.manual_seed(0)
        pm.head = LinearHead(bb.embed_dim, 2)
    labels = pm.verbalizer_ids(MULTI, "{text}") if kind == "t5" else []
    prompts = [make_prompt(3, bb.embed_dim, seed=13), make_prompt(7, bb.embed_dim, seed=14)]
    prefix = multi_prefix(pm, prompts)
    with torch.no_grad():
        mixed = pm.label_scores(prefix, torch.tensor(ROWS), batch_of(pm, TEXTS), labels)
        alone = torch.cat(
            [
                pm.label_scores(pm.build_prefix([prompts[g]]), None, batch_of(pm, [t]), labels)
                for t, g in zip(TEXTS, ROWS)
            ]
        )
    torch.testing.assert_close(mixed, alone, rtol=0, atol=TOL)
    assert float((mixed[0] - mixed[1]).abs().max()) > 100 * TOL


# ----- 4. the lm head sees only the scored positions ---------------------------------------------------------
@pytest.mark.parametrize("path", list(PATHS))
@pytest.mark.parametrize("kind", CAUSAL)
def test_lm_head_only_where_scored(kind: str, path: str, sharp_backbone: BackboneFn) -> None:
    bb = sharp_backbone(kind)
    pm = PromptedModel(bb, naive=PATHS[path])
    seen: list[tuple[int, ...]] = []
    head = bb.model.get_output_embeddings()
    handle = head.register_forward_hook(lambda mod, args, out: seen.append(tuple(args[0].shape)))
    try:
        prefix = pm.build_prefix([make_prompt(5, bb.embed_dim, seed=15)])
        batch = batch_of(pm, TEXTS)
        B, d = len(TEXTS), bb.embed_dim
        with torch.no_grad():
            pm.label_scores(prefix, None, batch, label_ids(bb, "single"))
            assert seen == [(B, 1, d)]
            seen.clear()
            multi = label_ids(bb, "multi")
            pm.label_scores(prefix, None, batch, multi)
            m = max(len(v) for v in multi)
            assert seen == [(B * len(multi), m, d)]
    finally:
        handle.remove()


# ----- 5. gradients reach only the prompt (and a trainable head) ---------------------------------------------
@pytest.mark.parametrize("path", list(PATHS))
def test_grads_only_on_prompt(path: str, tiny_backbone: BackboneFn) -> None:
    bb = tiny_backbone("llama")
    pm = PromptedModel(bb, naive=PATHS[path])
    prompt = make_prompt(5, bb.embed_dim, seed=16).requires_grad_(True)
    loss = pm.loss(pm.build_prefix([prompt]), batch_of(pm, TEXTS, [0, 1, 1, 0]), label_ids(bb, "multi"))
    loss.backward()
    assert all(p.grad is None for p in bb.model.parameters())
    assert all(not p.requires_grad for p in bb.model.parameters())
    assert prompt.grad is not None and float(prompt.grad.abs().min()) > 0  # every prompt value matters


def test_grads_bert_linear_head(tiny_backbone: BackboneFn) -> None:
    bb = tiny_backbone("bert")
    pm = PromptedModel(bb)
    torch.manual_seed(0)
    pm.head = LinearHead(bb.embed_dim, 2)
    prompt = make_prompt(5, bb.embed_dim, seed=17).requires_grad_(True)
    pm.loss(pm.build_prefix([prompt]), batch_of(pm, TEXTS, [0, 1, 1, 0]), None).backward()
    assert all(p.grad is None for p in bb.model.parameters())
    assert prompt.grad is not None and float(prompt.grad.abs().max()) > 0
    assert all(p.grad is not None and float(p.grad.abs().max()) > 0 for p in pm.head.parameters())


# ----- 8. the real model ---------------------------------------------------------------------------------------
SST2 = [
    "a gorgeous, witty, seductive movie.",
    "the plot is nothing but boilerplate clichés from start to finish, and the script assumes that not only "
    "would subtlety be lost on the target audience, but that it's also too stupid to realize that they've "
    "already seen this exact same movie a hundred times",
    "it's a charming and often affecting journey.",
    "unflinchingly bleak and desperate",
]


@pytest.mark.slow
def test_smollm2_fast_equals_naive() -> None:
    from softprompt.models import ModelLoadError, load_backbone
    from softprompt.prompt import init_prompt

    try:
        bb = load_backbone("smollm2-135m", progress=False)
    except ModelLoadError as e:
        pytest.skip(str(e))
    template = "Review: {text}\nSentiment:"
    texts = [template.format(text=s) for s in SST2]
    init = init_prompt("vocab", 20, bb.model.get_input_embeddings().weight, bb.tokenizer, seed=0)
    gold = [1, 0, 1, 0]
    scores, grads, gens = {}, {}, {}
    for name, naive in PATHS.items():
        pm = PromptedModel(bb, naive=naive)
        labels = pm.verbalizer_ids(["negative", "positive"], template)
        batch = batch_of(pm, texts, gold)
        assert len(set(batch.mask.sum(1).tolist())) == len(texts)  # mixed lengths: every row padded differently
        p = init.clone().requires_grad_(True)
        prefix = pm.build_prefix([p])
        s = pm.label_scores(prefix, None, batch, labels)
        F.cross_entropy(s, batch.labels).backward()
        scores[name], grads[name] = s.detach(), p.grad
        gens[name] = pm.generate(prefix.detach(), None, batch, max_new_tokens=NEW_TOKENS, do_sample=False).tolist()
    assert float(((scores["fast"] - scores["naive"]).abs() / scores["naive"].abs()).max()) <= 1e-4
    assert grads["fast"] is not None and grads["naive"] is not None
    assert rel(grads["fast"], grads["naive"]) <= 1e-4
    assert gens["fast"] == gens["naive"]
    assert all(len(g) == NEW_TOKENS for g in gens["fast"])


# ----- 9. a decoder's --head linear --------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", CAUSAL)
def test_decoder_linear_head_scores_match_reference(kind: str, sharp_backbone: BackboneFn) -> None:
    """label_scores with a head on a decoder = the head on the hand-built forward's last hidden state (left-padded
    batch, fast and naive paths); a head whose rows are the verbalizer's output embeddings (make_head's start)
    gives verbalizer scoring's class probabilities; gradients reach the prompt and the head, not the model."""
    from softprompt.data import DataConfig
    from softprompt.task import BoundTask, TaskSpec

    bb = sharp_backbone(kind)
    prompt = make_prompt(6, bb.embed_dim, seed=21)
    cls = [bb.tokenizer.cls_token_id]
    torch.manual_seed(1)
    head = LinearHead(bb.embed_dim, 3)
    with torch.no_grad():
        last = [bb.model.base_model(inputs_embeds=embeds(bb, cls, prompt, plain_ids(bb, t)))[0][0, -1] for t in TEXTS]
        want = head(torch.stack(last))
        for naive in (False, True):
            pm = PromptedModel(bb, naive=naive)
            pm.head = head
            got = pm.label_scores(pm.build_prefix([prompt]), None, batch_of(pm, TEXTS), [])
            torch.testing.assert_close(got, want, rtol=0, atol=TOL)

    pm = PromptedModel(bb)
    spec = TaskSpec.from_config(DataConfig(labels="x=a,y=b", head="linear"))  # one token each in every tiny vocab
    task = BoundTask(spec, pm, num_tokens=6)
    start = task.make_head()
    assert isinstance(start, LinearHead)
    batch = batch_of(pm, TEXTS, [0, 1, 0, 1])
    with torch.no_grad():
        verbalizer = pm.label_scores(pm.build_prefix([prompt]), None, batch, task.label_ids).softmax(-1)
        pm.head = start
        headed = pm.label_scores(pm.build_prefix([prompt]), None, batch, task.label_ids).softmax(-1)
    assert all(len(ids) == 1 for ids in task.label_ids)
    torch.testing.assert_close(headed, verbalizer, rtol=0, atol=1e-5)
    p = prompt.clone().requires_grad_(True)
    pm.loss(pm.build_prefix([p]), batch, task.label_ids).backward()
    assert all(q.grad is None for q in bb.model.parameters())
    assert p.grad is not None and float(p.grad.abs().max()) > 0
    assert all(q.grad is not None and float(q.grad.abs().max()) > 0 for q in start.parameters())
