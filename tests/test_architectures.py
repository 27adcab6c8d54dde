"""The architecture matrix: every tiny model of tests/archs.py, run through softprompt, equals the model's own forward.

For each architecture (decoder-only incl. MoE, ALiBi, parallel-attention, multi-query, sliding-window and
scaled-logit families; encoder-decoders; encoders incl. factorized embeddings):
- the load-time guard passes and measures the difference (softprompt.arch);
- the supported-architectures table (`softprompt models --architectures`, the README) lists exactly this matrix;
- label scores of a padded batch behind a prompt of real-token embeddings equal the model's own `input_ids`
  forward of each row alone with those tokens in the prompt's place (so embedding scales, output scaling and
  sliding windows are checked against the model itself, not against softprompt's idea of it);
- the batch equals each row alone through softprompt (padding invariance);
- prompt gradients equal a hand-built `inputs_embeds` forward of the model; no backbone weight gets a gradient;
- greedy generation equals the model's own `generate` from `input_ids` (decoder-only and encoder-decoder);
- PEFT's prompt tuning gives the same outputs where PEFT supports the class;
- `softprompt train` (2 steps) then `softprompt eval` run from the command line.
Architectures that cannot be exact are refused, and tests below prove the refusals.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from archs import ARCHS, NEO_WINDOW, REFUSED, arch_model_dir

from softprompt import arch as arch_mod
from softprompt.cli import main
from softprompt.models import Backbone
from softprompt.prompted import PromptedModel

TEXTS = ["the movie was a delight from the first scene to the very end", "dull", "not bad at all , really"]
WORDS = ["good", "bad"]  # one WordPiece token each
PROMPT = "great film indeed"  # the one-token-per-word prompt whose embeddings stand in for a soft prompt
TOL = 1e-4
EXACT = [a.id for a in ARCHS if a.id not in REFUSED]

BackboneFn = Callable[[str], Backbone]


def tok_ids(bb: Backbone, text: str) -> list[int]:
    return list(bb.tokenizer(text, add_special_tokens=False)["input_ids"])


def own_ids(pm: PromptedModel, prompt_ids: list[int], text: str) -> torch.Tensor:
    """(1, S) the row as plain token ids, the prompt's tokens in the prompt's place."""
    return torch.tensor([pm.prefix_ids + prompt_ids + pm.encode_input(text)])


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).abs().max() / b.float().abs().max().clamp(min=1e-6))


def scores_ours(pm: PromptedModel, prefix, texts: list[str], labels: list[list[int]]) -> torch.Tensor:
    batch = pm.collate([pm.encode_input(t) for t in texts])
    if pm.family == "encoder":
        return pm.pooled(prefix, None, batch)  # (B, d): what every encoder head reads
    return pm.label_scores(prefix, None, batch, labels)  # (B, L)


def scores_own(pm: PromptedModel, ids: torch.Tensor, labels: list[list[int]], n_skip: int) -> torch.Tensor:
    """The model's own forward of one row of ids: label scores, or (encoders) the mean over non-prompt tokens."""
    m = pm.model
    if pm.family == "causal":
        logp = m(input_ids=ids).logits[0, -1].float().log_softmax(-1)
        return logp[[lab[0] for lab in labels]]
    if pm.family == "seq2seq":
        out = []
        for lab in labels:
            logp = m(input_ids=ids, labels=torch.tensor([lab])).logits[0].float().log_softmax(-1)
            out.append(logp[torch.arange(len(lab)), lab].mean())
        return torch.stack(out)
    h = m(input_ids=ids)[0][0]  # (S, d)
    keep = torch.ones(h.shape[0], dtype=torch.bool)
    keep[len(pm.prefix_ids) : len(pm.prefix_ids) + n_skip] = False  # prompt slots are not pooled
    return h[keep].mean(0)


def label_ids(pm: PromptedModel) -> list[list[int]]:
    if pm.family == "causal":  # vocabulary tokens (qwen2's tokenizer would split the words into characters)
        return [[int(pm.tok.convert_tokens_to_ids(w))] for w in WORDS]
    return pm.verbalizer_ids(WORDS, "{text}")


# ----- the guard and the scores ----------------------------------------------------------------------------------
@pytest.mark.parametrize("naive", [False, True], ids=["kv", "concat"])
@pytest.mark.parametrize("arch_id", EXACT)
def test_scores_equal_the_models_own_forward(arch_id: str, naive: bool, arch_backbone: BackboneFn) -> None:
    bb = arch_backbone(arch_id)
    if naive and bb.family != "causal":
        pytest.skip("encoders and encoder-decoders have one path (concatenation)")
    pm = PromptedModel(bb, naive=naive)
    measured = bb.verified[f"{bb.family}:{'concat' if pm.naive else 'kv'}:auto"]
    assert measured < TOL
    prompt_ids = tok_ids(bb, PROMPT)
    labels = label_ids(pm)
    with torch.no_grad():
        for prompt in (None, prompt_ids):
            pids = prompt or []
            prefix = pm.build_prefix([pm.embed(torch.tensor(pids)) if prompt else None])
            got = scores_ours(pm, prefix, TEXTS, labels)
            want = torch.stack([scores_own(pm, own_ids(pm, pids, t), labels, len(pids)) for t in TEXTS])
            assert rel(got, want) < TOL, (arch_id, rel(got, want))
            alone = torch.cat([scores_ours(pm, prefix, [t], labels) for t in TEXTS])
            assert rel(got, alone) < TOL  # padding invariance: the batch equals each row alone
    print(f"{arch_id}: guard {measured:.1e}, scores vs own forward {rel(got, want):.1e}")


@pytest.mark.parametrize("arch_id", EXACT)
def test_prompt_gradient_matches_hand_built_forward(arch_id: str, arch_backbone: BackboneFn) -> None:
    bb = arch_backbone(arch_id)
    pm = PromptedModel(bb)
    labels = label_ids(pm)
    base = pm.embed(torch.tensor(tok_ids(bb, PROMPT))).detach()
    noise = torch.randn(base.shape, generator=torch.Generator().manual_seed(0)) * base.std()
    ours = (base + noise).requires_grad_(True)
    got = scores_ours(pm, pm.build_prefix([ours]), TEXTS, labels)
    proj = torch.randn(got.shape[-1], generator=torch.Generator().manual_seed(1))
    (got @ proj).sum().backward()
    ref = (base + noise).requires_grad_(True)
    lead = pm.embed(torch.tensor(pm.prefix_ids, dtype=torch.long))
    total = torch.zeros(())
    for t in TEXTS:  # hand-built: [lead][prompt][input] embeddings, the model called on inputs_embeds, each alone
        x = torch.cat([lead, ref, pm.embed(torch.tensor(pm.encode_input(t)))])[None]
        if bb.family == "causal":
            total = (
                total + bb.model(inputs_embeds=x).logits[0, -1].float().log_softmax(-1)[[v[0] for v in labels]] @ proj
            )
        elif bb.family == "seq2seq":
            s = [
                bb.model(inputs_embeds=x, labels=torch.tensor([v]))
                .logits[0]
                .float()
                .log_softmax(-1)[torch.arange(len(v)), v]
                .mean()
                for v in labels
            ]
            total = total + torch.stack(s) @ proj
        else:
            h = bb.model(inputs_embeds=x)[0][0]
            keep = torch.ones(h.shape[0], dtype=torch.bool)
            keep[len(pm.prefix_ids) : len(pm.prefix_ids) + ref.shape[0]] = False
            total = total + h[keep].mean(0) @ proj
    total.backward()
    assert ours.grad is not None and ref.grad is not None
    assert rel(ours.grad, ref.grad) < 1e-3, (arch_id, rel(ours.grad, ref.grad))
    assert all(p.grad is None for p in bb.model.parameters())  # the backbone stays frozen


@pytest.mark.parametrize("arch_id", [a for a in EXACT if next(x for x in ARCHS if x.id == a).family != "encoder"])
def test_greedy_generation_equals_model_generate(arch_id: str, arch_backbone: BackboneFn) -> None:
    bb = arch_backbone(arch_id)
    pm = PromptedModel(bb)
    pids = tok_ids(bb, PROMPT)
    prefix = pm.build_prefix([pm.embed(torch.tensor(pids))])
    batch = pm.collate([pm.encode_input(t) for t in TEXTS])
    kw = {"max_new_tokens": 6, "do_sample": False, "pad_token_id": pm.pad_id}
    with torch.no_grad():
        got = pm.generate(prefix, None, batch, **kw).tolist()
        for i, t in enumerate(TEXTS):
            ids = own_ids(pm, pids, t)
            out = bb.model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), **kw)[0].tolist()
            want = out[ids.shape[1] :] if bb.family == "causal" else out
            assert got[i][: len(want)] == want, (arch_id, i, got[i], want)
            assert all(x == pm.pad_id for x in got[i][len(want) :])


@pytest.mark.parametrize("arch_id", EXACT)
def test_peft_prompt_tuning_equivalence(arch_id: str, arch_backbone: BackboneFn) -> None:
    from peft import PromptTuningConfig, get_peft_model

    bb = arch_backbone(arch_id)
    pm = PromptedModel(bb, position="start")  # PEFT's layout: the prompt before everything
    if pm.input_scale != 1.0:
        pytest.skip("PEFT feeds unscaled embed_tokens(ids): it differs from the model's own forward here")
    prompt = pm.embed(torch.tensor(tok_ids(bb, PROMPT))).detach()
    task = {"causal": "CAUSAL_LM", "seq2seq": "SEQ_2_SEQ_LM", "encoder": "FEATURE_EXTRACTION"}[bb.family]
    extra = {"num_transformer_submodules": 1} if bb.family == "seq2seq" else {}
    try:
        pmod = get_peft_model(
            copy.deepcopy(bb.model), PromptTuningConfig(task_type=task, num_virtual_tokens=len(prompt), **extra)
        )
        with torch.no_grad():
            pmod.prompt_encoder["default"].embedding.weight.copy_(prompt)
        pmod.eval()
        ids = torch.tensor([pm.encode_input(TEXTS[0])])
        with torch.no_grad():
            if bb.family == "causal":
                want = pmod(input_ids=ids, attention_mask=torch.ones_like(ids)).logits[0, -1].float()
            elif bb.family == "seq2seq":
                lab = torch.tensor([label_ids(pm)[0]])
                want = pmod(input_ids=ids, attention_mask=torch.ones_like(ids), labels=lab).logits[0].float()
            else:
                want = pmod(input_ids=ids, attention_mask=torch.ones_like(ids)).last_hidden_state[0]
    except Exception as e:  # noqa: BLE001 - PEFT's own limits are not softprompt's
        pytest.skip(f"PEFT does not run {bb.architecture}: {str(e).splitlines()[0][:120]}")
    prefix = pm.build_prefix([prompt])
    batch = pm.collate([ids[0].tolist()])
    with torch.no_grad():
        if bb.family == "causal":
            T = batch.ids.shape[1]
            got = pm.lm_logits(pm.causal_hidden(prefix, None, batch.ids, batch.mask, torch.tensor([[T - 1]])))[0, 0]
        elif bb.family == "seq2seq":
            h, attn, _ = pm.encoder_hidden(prefix, None, batch.ids, batch.mask)
            got = pm._decoder_logp(h, attn, lab)[0]
            want = want.log_softmax(-1)
        else:
            got = pm.encoder_hidden(prefix, None, batch.ids, batch.mask)[0][0]
    assert rel(got, want) < TOL, (arch_id, rel(got, want))


@pytest.mark.slow
@pytest.mark.parametrize("arch_id", EXACT)
def test_cli_train_two_steps_then_eval(
    arch_id: str, arch_root: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    family = next(a.family for a in ARCHS if a.id == arch_id)
    data = tmp_path / "d.jsonl"
    rows = [{"text": f"{w} movie {i}", "label": "p" if w == "good" else "n"} for i, w in enumerate(["good", "bad"] * 4)]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "p.safetensors"
    head = ["--head", "linear"] if family == "encoder" else []
    argv = ["train", "--model", str(arch_model_dir(arch_id, arch_root)), "--train", str(data), "--out", str(out)]
    argv += ["--labels", "p=good,n=bad", "--template", "{text} is", "--device", "cpu", "--no-progress"]
    argv += ["--num-tokens", "2", "--batch-size", "4", "--max-steps", "2", "--warmup-steps", "0", *head]
    assert main(argv) == 0, capsys.readouterr().err
    capsys.readouterr()
    assert main(["eval", "--prompt", str(out), "--data", str(data), "--device", "cpu"]) == 0
    metrics = json.loads(capsys.readouterr().out)
    assert metrics["n"] == len(rows) and 0.0 <= metrics["accuracy"] <= 1.0


# ----- refusals -------------------------------------------------------------------------------------------------


def test_local_attention_inside_the_layers_is_refused_only_where_padding_enters_it(arch_backbone: BackboneFn) -> None:
    """GPT-Neo's local attention is built into its layers (key columns, not positions): exact while every row fits
    the window or no row is padded; a padded batch spanning more than the window is refused, naming the window."""
    bb = arch_backbone("gpt_neo")
    pm = PromptedModel(bb)
    long = " ".join(["word"] * (NEO_WINDOW + 4))
    prefix = pm.build_prefix([None])
    labels = label_ids(pm)
    with torch.no_grad():
        alone = pm.label_scores(prefix, None, pm.collate([pm.encode_input(long)]), labels)  # no pads: exact
        want = scores_own(pm, own_ids(pm, [], long), labels, 0)
        assert rel(alone[0], want) < TOL
        with pytest.raises(arch_mod.ArchitectureError, match=rf"GPTNeoForCausalLM.*window {NEO_WINDOW}"):
            pm.label_scores(prefix, None, pm.collate([pm.encode_input(t) for t in (long, "dull")]), labels)


def test_factorized_embedding_heads_read_the_hidden_width(arch_backbone: BackboneFn) -> None:
    """ALBERT / ELECTRA: embedding_size 16, hidden_size 32; a linear head reads the 32-wide pooled output."""
    for arch_id in ("albert", "electra"):
        bb = arch_backbone(arch_id)
        assert (bb.embed_dim, bb.hidden_dim) == (16, 32)
        pm = PromptedModel(bb)
        prefix = pm.build_prefix([torch.zeros(2, bb.embed_dim)])
        pooled = pm.pooled(prefix, None, pm.collate([pm.encode_input(t) for t in TEXTS]))
        assert pooled.shape == (len(TEXTS), 32)
        assert F.linear(pooled, torch.zeros(2, bb.hidden_dim)).shape == (len(TEXTS), 2)


@pytest.mark.parametrize("arch_id", ["llama", "mistral", "gemma2", "gemma3_text", "cohere2"])
def test_server_decode_loop_equals_model_greedy(arch_id: str, arch_backbone: BackboneFn) -> None:
    """The server's iteration-level batches (serve.generation.DecodeBatch: prefill, steps, a batch merged in midway
    with left-padded caches) decode each row as the model's own greedy loop does alone, sliding windows included."""
    from softprompt.serve.generation import DecodeBatch, GenParams, GenRow

    bb = arch_backbone(arch_id)
    pm = PromptedModel(bb)
    pids = tok_ids(bb, PROMPT)
    prefix = pm.build_prefix([pm.embed(torch.tensor(pids))])
    steps = 8

    def rows(n: int) -> list[GenRow]:
        return [GenRow(None, GenParams(max_new_tokens=steps), frozenset(), pm.pad_id) for _ in range(n)]

    def prefill(texts: list[str], gen: list[GenRow]) -> DecodeBatch:
        batch = pm.collate([pm.encode_input(t) for t in texts])
        state, logits = DecodeBatch.prefill(pm, prefix, torch.zeros(len(texts), dtype=torch.long), batch, gen)
        for r, lg in zip(gen, logits):
            r.advance(r.choose(lg), pm.decode)
        return state

    first, second = rows(2), rows(1)
    with torch.no_grad():
        state = prefill(TEXTS[:2], first)
        for k in range(steps - 1):
            if k == 2:  # a new request joins: caches of different lengths, left-padded to one
                state = DecodeBatch.merge([state, prefill(TEXTS[2:], second)])
            for r, lg in zip(state.rows, state.step(pm)):
                r.advance(r.choose(lg), pm.decode)
        for r, t in zip(first + second, TEXTS):
            ids = own_ids(pm, pids, t)
            want: list[int] = []
            for _ in range(len(r.tokens)):  # the model's own greedy loop, the row alone
                want.append(int(bb.model(input_ids=ids).logits[0, -1].argmax()))
                ids = torch.cat([ids, torch.tensor([[want[-1]]])], 1)
            assert r.tokens == want, (arch_id, t, r.tokens, want)
    assert len(second[0].tokens) == steps - 2 and len(first[0].tokens) == steps


@pytest.mark.parametrize("arch_id", [a.id for a in ARCHS if a.family == "causal" and a.id not in REFUSED])
def test_decoder_linear_head_starts_as_the_verbalizer(arch_id: str, arch_backbone: BackboneFn) -> None:
    """--head linear on a decoder starts from the model's own output path (logit scaling included): its class
    probabilities at step 0 are the verbalizer's, exactly where that path is affine (all but soft-capping)."""
    from softprompt.data import DataConfig
    from softprompt.task import BoundTask, TaskSpec

    bb = arch_backbone(arch_id)
    if getattr(bb.model.config, "final_logit_softcapping", None):
        pytest.skip("a soft-capped output path is not affine: the head starts at its tangent, not exactly")
    pm = PromptedModel(bb)
    task = BoundTask(TaskSpec.from_config(DataConfig(labels="x=a,y=b", head="linear")), pm, num_tokens=3)
    head = task.make_head()
    assert head is not None and tuple(head.linear.weight.shape) == (2, bb.hidden_dim)
    prefix = pm.build_prefix([pm.embed(torch.tensor(tok_ids(bb, PROMPT)))])
    batch = pm.collate([pm.encode_input(t) for t in TEXTS])
    with torch.no_grad():
        verbalizer = pm.label_scores(prefix, None, batch, task.label_ids).softmax(-1)
        pm.head = head
        headed = pm.label_scores(prefix, None, batch, task.label_ids).softmax(-1)
    assert rel(headed, verbalizer) < 1e-4, (arch_id, rel(headed, verbalizer))


@pytest.mark.parametrize("arch_id", ["llama", "gpt2", "mistral"])
def test_beam_search_equals_model_generate(arch_id: str, arch_backbone: BackboneFn) -> None:
    """Beam search behind a prompt (its K/V copied for each beam) = the model's own beam search from input_ids."""
    bb = arch_backbone(arch_id)
    pm = PromptedModel(bb)
    pids = tok_ids(bb, PROMPT)
    prefix = pm.build_prefix([pm.embed(torch.tensor(pids))])
    kw = {"max_new_tokens": 5, "do_sample": False, "num_beams": 3, "pad_token_id": pm.pad_id}
    with torch.no_grad():
        for t in TEXTS[1:]:
            got = pm.generate(prefix, None, pm.collate([pm.encode_input(t)]), **kw)[0].tolist()
            ids = own_ids(pm, pids, t)
            want = bb.model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), **kw)[0, ids.shape[1] :]
            assert got[: len(want)] == want.tolist(), (arch_id, t)


def test_supported_table_lists_exactly_the_matrix(capsys: pytest.CaptureFixture[str]) -> None:
    """`softprompt models --architectures` and the README show one table, and it claims what the matrix runs."""
    assert arch_mod.model_types() == {a.model_type for a in ARCHS}
    refused = {t for f in arch_mod.FAMILIES if f.path == "refused" for t in f.model_types}
    assert refused == {next(a.model_type for a in ARCHS if a.id == r) for r in REFUSED}
    assert main(["models", "--architectures"]) == 0
    out = capsys.readouterr().out.strip()
    assert out == arch_mod.markdown()
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    assert out in readme, (
        "README's supported-architectures table is out of date: paste `softprompt models --architectures`"
    )
