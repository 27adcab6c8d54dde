"""What an architecture's own forward does around its layers, repeated exactly by softprompt's forward path.

softprompt feeds the backbone `inputs_embeds` (so a prompt can sit among the tokens), reads hidden states at
the positions it scores, and lays a batch out as `[prefix][pads][input]`. Each of these skips or changes a step of
the model's own `input_ids` forward on some architectures; this module holds the general mechanisms that put the
step back; the load-time guard (below) checks the result against the model's own forward, and the
supported-architectures table (at the end) says what the architecture matrix verifies.

- Input scale: Marian, Pegasus, FSMT & co multiply `embed_tokens(input_ids)` by `embed_scale` inside their
  encoder/decoder, and skip it for `inputs_embeds`; models whose embedding module scales by itself (Gemma, BART,
  XGLM: a `*ScaledWordEmbedding`) and models that scale `inputs_embeds` too (Granite) need nothing.
- Output path: scored hidden states go through the model's own `*ForCausalLM.forward` after its decoder (the LM
  head plus whatever the architecture does to the logits: Granite's `logits_scaling`, Cohere's `logit_scale`,
  Gemma 2's soft-capping), never a re-derived `lm_head` call.
- Sliding windows: transformers measures a window in key columns, so the pad slots between a prefix and a shorter
  row would count; the mask is then built from positions instead (each row sees the keys it sees alone).
  Windows built into the attention layer itself (GPT-Neo's local attention) cannot be moved: a batch whose pads
  would enter such a window is refused.

The load-time equivalence guard: softprompt's forward path must give what the model's own forward gives.
softprompt never runs a model the way its authors tested it (it feeds `inputs_embeds`, reuses prompt keys and
values across rows, pads between prefix and input, and scores only a few positions), so every architecture it has
not been built for is a chance of plausible but wrong numbers. Before a PromptedModel is used, a probe batch
goes through softprompt's own path (the one this PromptedModel will use: shared prompt K/V or concatenation):
two rows of different lengths, each with no prompt and behind a one-token prompt (the embedding of a real
token), all four in one mixed batch; and through the model's own `input_ids` forward with that token in the
prompt's place (one right-padded batch: exactly each row alone). The two must agree at every scored position:

  causal LMs   logits of every input token (N, T, V)
  seq2seq      decoder log-probabilities for a probe target (the verbalizer path)
  encoders     the encoder's last hidden states (what every head reads)

The measure is max |ours - reference| / max |reference|; allowed: 1e-4 in float32, 5e-2 in bfloat16 / float16 or
with quantized weights (both sides run the same rounded weights, but in a different order of operations). On a
mismatch the PromptedModel is refused with one line naming the architecture, the measured difference and the
override flag (`--skip-equivalence-check`). The result is cached on the Backbone, once per forward path.

The supported-architectures table (`softprompt models --architectures`, the README's table): each row is a family of
transformers architectures, the forward path softprompt takes for it, what softprompt does to stay exact there
(above), and what the architecture matrix (tests/test_architectures.py) verifies on a tiny random model of every
listed `model_type`; a test keeps this table and the matrix the same set. Any other architecture loads too: the
load-time guard compares softprompt's forward with the model's own and refuses it with a one-line error where they
differ.

Notation: N rows, Q query tokens, K key columns (prefix slots + pads + tokens), d hidden size, V vocabulary.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F

from softprompt.data import pad_right

if TYPE_CHECKING:  # the guard is called by prompted.py and imports nothing of it at run time
    from softprompt.prompted import PromptedModel

FULL, SLIDING = "full_attention", "sliding_attention"


class ArchitectureError(ValueError):
    """softprompt cannot run this architecture (or this batch on it) exactly; the message names model and cause."""


def input_scale(model: Any, family: str) -> float:
    """The factor the model's own forward applies to `embed_tokens(input_ids)` outside the embedding module."""
    if hasattr(model.get_input_embeddings(), "embed_scale"):
        return 1.0  # a scaled embedding module: get_input_embeddings()(ids) is already what the layers see
    consumer = model.get_encoder() if family == "seq2seq" else model.base_model
    scale = getattr(consumer, "embed_scale", None)
    return 1.0 if scale is None else float(scale)


class _Outputs:
    """A decoder's outputs holding only its last hidden state; every other field (cache, attentions) is None."""

    def __init__(self, hidden: torch.Tensor) -> None:
        self.last_hidden_state = hidden

    def __getitem__(self, i: int | str) -> torch.Tensor:
        if i in (0, "last_hidden_state"):
            return self.last_hidden_state
        raise KeyError(i)

    def __getattr__(self, name: str) -> None:
        return None


class _Decoded:
    """Stands for the decoder inside a `*ForCausalLM.forward` call: whatever it is asked, it returns `out`."""

    def __init__(self, out: _Outputs) -> None:
        self._out = out

    def __call__(self, *args: Any, **kwargs: Any) -> _Outputs:
        return self._out

    def __getattr__(self, name: str) -> _Decoded:  # OPT calls self.model.decoder(...)
        return self


class _WithHidden:
    """The causal LM itself, except that its decoder (`base_model_prefix`) returns given hidden states."""

    def __init__(self, model: Any, hidden: torch.Tensor) -> None:
        self.__dict__["_model"] = model
        self.__dict__["_decoder"] = _Decoded(_Outputs(hidden))

    def __getattr__(self, name: str) -> Any:
        if name == self._model.base_model_prefix:
            return self._decoder
        return getattr(self._model, name)


class OutputPath:
    """hidden (..., d) -> logits (..., V) float32: the causal LM's own forward after its decoder, run on the given
    hidden states (no copy of its head logic here, so scaling, soft-capping and any future step come along)."""

    def __init__(self, model: Any) -> None:
        self.model = model
        self.forward = type(model).forward
        params = inspect.signature(self.forward).parameters
        self.kwargs: dict[str, Any] = {k: v for k, v in (("use_cache", False), ("logits_to_keep", 0)) if k in params}

    def __call__(self, hidden: torch.Tensor) -> torch.Tensor:
        h = hidden if hidden.ndim == 3 else hidden.reshape(-1, 1, hidden.shape[-1])  # (N, K, d)
        out = self.forward(_WithHidden(self.model, h), **self.kwargs)
        logits = out.logits if hasattr(out, "logits") else out[0]  # (N, K, V)
        return logits.float().reshape(*hidden.shape[:-1], logits.shape[-1])


@dataclass(frozen=True)
class Windows:
    """Local attention of a decoder: the layer types it has and their window (keys less than `size` positions
    back, the query's own included), and whether the window lives in the attention mask (`maskable`: built by
    transformers' masking utilities, so softprompt can build it from positions) or inside the layers."""

    types: tuple[str, ...]
    size: int
    maskable: bool


def windows_of(config: Any) -> Windows | None:
    """The sliding windows of a decoder config, or None when every layer attends to all earlier keys."""
    c = config.get_text_config()
    if getattr(c, "model_type", "") == "gpt_neo" and "local" in (getattr(c, "attention_layers", None) or []):
        return Windows(("global", "local"), int(c.window_size), maskable=False)
    types = tuple(sorted(set(getattr(c, "layer_types", None) or [])))
    size = getattr(c, "sliding_window", None)
    if not types:
        types = (SLIDING,) if size else (FULL,)
    unknown = [t for t in types if t not in (FULL, SLIDING)]
    if unknown:
        raise ArchitectureError(f"{type(config).__name__}: layers of type {unknown[0]!r} are not supported")
    if SLIDING not in types:
        return None
    if not size:
        raise ArchitectureError(f"{type(config).__name__}: sliding-attention layers without a sliding_window size")
    return Windows(types, int(size), maskable=True)


def attention_mask(
    attn: torch.Tensor, q_len: int, windows: Windows | None, impl: str, dtype: torch.dtype, name: str
) -> torch.Tensor | dict[str, torch.Tensor]:
    """What to pass as `attention_mask` for keys `attn` (N, K; 1 = real) of which the last `q_len` are the queries.

    The 2-D mask when no window can cut (no window, or K <= its size: every key is within it); else a 4-D mask per
    layer type built from positions (a real key's position is its rank among its row's real keys, as if alone).
    """
    K = attn.shape[1]
    if windows is None or K <= windows.size:
        return attn
    if not windows.maskable:
        if bool(attn.all()):  # no pad slot anywhere: key columns are positions, the layers' own window is exact
            return attn
        raise ArchitectureError(
            f"{name}: its local attention (window {windows.size}) is built into the layers and counts padding slots;"
            f" a batch of rows of different lengths spanning more than {windows.size} positions cannot be exact"
            " (use batch size 1)"
        )
    pos = attn.cumsum(-1) - 1  # (N, K)
    dist = pos[:, -q_len:, None] - pos[:, None, :]  # (N, Q, K) query position - key position
    seen = attn.bool()[:, None, :] & (dist >= 0)
    own = F.pad(torch.eye(q_len, dtype=torch.bool, device=attn.device), (K - q_len, 0))  # (Q, K): a pad query sees
    masks: dict[str, torch.Tensor] = {}  # itself, so no row of the mask is empty (NaN in softmax)
    for t in windows.types:
        m = ((seen & (dist < windows.size)) if t == SLIDING else seen) | own
        masks[t] = m[:, None]  # (N, 1, Q, K)
    if impl == "eager":
        lo = torch.finfo(dtype).min
        masks = {t: torch.zeros(m.shape, dtype=dtype, device=m.device).masked_fill(~m, lo) for t, m in masks.items()}
    elif "sdpa" not in impl:
        raise ArchitectureError(f"{name}: sliding windows need the sdpa or eager attention, not {impl!r}")
    return masks[windows.types[0]] if len(windows.types) == 1 else masks


# The load-time equivalence guard ---------------------------------------------------------------------------

PROBE_TEXTS = ("the cat sat on the warm mat by the door", "a dog")  # two rows of different lengths
TOLERANCE = {"float32": 1e-4, "reduced": 5e-2}  # relative; "reduced": bfloat16, float16 or quantized weights
FLAG = "--skip-equivalence-check"


class EquivalenceError(RuntimeError):
    """softprompt's forward path does not reproduce the model's own forward; one line, names the architecture."""


def tolerance(model: Any) -> float:
    quantized = getattr(model, "hf_quantizer", None) is not None or hasattr(model.config, "quantization_config")
    reduced = quantized or next(model.parameters()).dtype in (torch.bfloat16, torch.float16)
    return TOLERANCE["reduced" if reduced else "float32"]


def ensure_equivalent(pm: PromptedModel, position: str) -> float:
    """Run the probe once per backbone and forward path; return the relative difference or raise EquivalenceError."""
    key = f"{pm.family}:{'concat' if pm.naive else 'kv'}:{position}"
    verified = pm.backbone.verified
    if key in verified:
        return verified[key]
    name = f"{pm.backbone.architecture} ({pm.backbone.model_id})"
    was_training = pm.model.training
    pm.model.eval()  # dropout would make the two sides differ at random
    try:
        with torch.no_grad():
            err = measure(pm)
    except Exception as e:  # a forward that crashes on the probe would crash on real data: refuse it now
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise EquivalenceError(f"{name}: softprompt's forward path fails on this architecture: {msg}") from e
    finally:
        pm.model.train(was_training)
    tol = tolerance(pm.model)
    if not err <= tol:  # NaN fails too
        raise EquivalenceError(
            f"{name}: softprompt's forward differs from the model's own by {err:.3g} (relative, allowed {tol:g});"
            f" its scores would be wrong, so it is refused (pass {FLAG} to run it anyway)"
        )
    verified[key] = err
    return err


def measure(pm: PromptedModel) -> float:
    """Largest relative difference over the probe rows, each without a prompt and behind a one-token prompt.

    Four forwards in all: the two prefixes, softprompt's mixed batch (every row behind every prompt, left-padded,
    prompts of different widths) and the model's own `input_ids` forward of the same rows right-padded in one batch
    (exactly each row alone: a causal row never sees the pads after it, an encoder's are masked)."""
    dev = pm.backbone.device
    token = int(pm.tok("the", add_special_tokens=False)["input_ids"][0])
    prompts = [[], [token]]  # prompt 0: none; prompt 1: the embedding of a real token
    prefix = pm.build_prefix([None, pm.embed(torch.tensor(prompts[1], dtype=torch.long, device=dev))])
    cases = [(g, pm.encode_input(t)) for g in range(len(prompts)) for t in PROBE_TEXTS]
    batch = pm.collate([r for _, r in cases]).to(dev)
    rows = torch.tensor([g for g, _ in cases], device=dev)
    refs = [pm.prefix_ids + prompts[g] + r for g, r in cases]  # the same rows as plain token ids
    ref_ids, ref_mask = pad_right(refs, pm.pad_id)
    ours, theirs = _compare(pm, prefix, rows, batch, ref_ids.to(dev), ref_mask.to(dev), [len(r) for _, r in cases])
    worst = 0.0
    for a, b in zip(ours, theirs, strict=True):
        worst = max(worst, float((a.float() - b.float()).abs().max() / b.float().abs().max().clamp(min=1e-6)))
    return worst


def _compare(
    pm: PromptedModel,
    prefix: Any,
    rows: torch.Tensor,
    batch: Any,
    ref_ids: torch.Tensor,
    ref_mask: torch.Tensor,
    lens: list[int],
) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Per row: softprompt's tensor and the model's own, at the same positions (`lens`: input tokens per row)."""
    dev, model = pm.backbone.device, pm.model
    n_ref = ref_mask.sum(-1).tolist()  # real tokens of each reference row (prefix ids, prompt tokens, input)
    if pm.family == "causal":
        N, T = batch.ids.shape
        every = torch.arange(T, device=dev)[None].expand(N, -1)  # (N, T): all positions, rows left-padded
        logits = pm.lm_logits(pm.causal_hidden(prefix, rows, batch.ids, batch.mask, every))  # (N, T, V)
        own = model(input_ids=ref_ids, attention_mask=ref_mask, use_cache=False).logits
        return [logits[i, T - n :] for i, n in enumerate(lens)], [own[i, m - n : m] for i, (n, m) in
                                                                  enumerate(zip(lens, n_ref))]  # fmt: skip
    if pm.family == "seq2seq":
        target = ref_ids.new_tensor([ref_ids[0, : n_ref[0]][-3:].tolist()]).repeat(len(lens), 1)  # (N, 3)
        h, attn, _ = pm.encoder_hidden(prefix, rows, batch.ids, batch.mask)
        ours = list(pm._decoder_logp(h, attn, target))
        own = model(input_ids=ref_ids, attention_mask=ref_mask, labels=target).logits  # its own label shift
        return ours, list(own.float().log_softmax(-1))
    h, _, _ = pm.encoder_hidden(prefix, rows, batch.ids, batch.mask)  # (N, S, d) right-padded, prefix slots first
    own = model(input_ids=ref_ids, attention_mask=ref_mask)[0]
    return [h[i, :m] for i, m in enumerate(n_ref)], [own[i, :m] for i, m in enumerate(n_ref)]


# The supported-architectures table -------------------------------------------------------------------------

ALL_CHECKS = "scores = own forward, padding, gradients, frozen backbone, greedy = own generate, PEFT, CLI"
ENCODER_CHECKS = "hidden states = own forward, padding, gradients, frozen backbone, PEFT, CLI (--head linear)"


@dataclass(frozen=True)
class Family:
    name: str
    model_types: tuple[str, ...]  # transformers model_type of each architecture verified in the matrix
    path: str  # shared prompt K/V | concatenation | refused
    how: str  # what softprompt does there
    verified: str = ALL_CHECKS


FAMILIES: tuple[Family, ...] = (
    Family(
        "decoder-only, dense / grouped-query / multi-query attention",
        (
            "gpt2",
            "llama",
            "qwen2",
            "qwen3",
            "smollm3",
            "gemma",
            "phi3",
            "olmo",
            "olmo2",
            "stablelm",
            "starcoder2",
            "persimmon",
            "opt",
            "gpt_bigcode",
        ),
        "shared prompt K/V",
        "prompt run once, K/V broadcast; positions as if each row were alone",
    ),  # fmt: skip
    Family(
        "decoder-only, parallel attention + MLP",
        ("gpt_neox", "gptj", "phi", "codegen", "falcon"),
        "shared prompt K/V",
        "as above",
    ),
    Family("decoder-only, ALiBi (mask-aware)", ("bloom", "falcon"), "shared prompt K/V", "ALiBi from the 2-D mask"),
    Family(
        "decoder-only, mixture of experts",
        ("mixtral", "qwen2_moe", "qwen3_moe", "phimoe", "granitemoe"),
        "shared prompt K/V",
        "as above",
    ),
    Family(
        "decoder-only, scaled logits / embeddings",
        ("granite", "granitemoe", "cohere", "xglm", "biogpt"),
        "shared prompt K/V",
        "scored states go through the model's own output path (logits_scaling, logit_scale); scaled embedding"
        " modules kept",
    ),
    Family(
        "decoder-only, sliding window",
        ("mistral", "gemma2", "gemma3_text", "cohere2"),
        "shared prompt K/V",
        "window masks built from positions (pads never count); soft-capping via the own output path; generate runs"
        " a row alone where pads could enter the window",
    ),
    Family(
        "decoder-only, local attention inside the layers",
        ("gpt_neo",),
        "shared prompt K/V; refused per batch",
        "exact while no padded batch spans the window; such a batch is refused naming the window",
    ),
    Family(
        "decoder-only, ALiBi by key column",
        ("mpt",),
        "refused",
        "its bias counts pad and prompt columns: refused at load by the guard",
        "refusal",
    ),
    Family(
        "encoder-decoder",
        ("t5", "mt5", "bart", "mbart", "blenderbot", "marian", "pegasus", "m2m_100"),
        "concatenation",
        "encoder input scaled as the model scales input_ids (Marian, Pegasus: embed_scale)",
        ALL_CHECKS + " (PEFT: not Marian/Pegasus, whose embeddings PEFT leaves unscaled)",
    ),
    Family(
        "encoder",
        ("bert", "roberta", "xlm-roberta", "distilbert", "deberta-v2", "mpnet", "albert", "electra"),
        "concatenation",
        "heads read the hidden width (ALBERT / ELECTRA: embedding_size != hidden_size)",
        ENCODER_CHECKS + " (PEFT: not DistilBERT, ALBERT, ELECTRA, which PEFT does not run)",
    ),
)


def model_types() -> set[str]:
    return {t for f in FAMILIES for t in f.model_types}


def markdown() -> str:
    """The table as Markdown (README, `softprompt models --architectures`)."""
    rows = [
        "| family | architectures (model_type) | path | how softprompt stays exact | verified |",
        "|---|---|---|---|---|",
    ]
    for f in FAMILIES:
        rows.append(f"| {f.name} | {', '.join(f.model_types)} | {f.path} | {f.how} | {f.verified} |")
    rows.append(
        "| any other | — | by family | the load-time guard compares softprompt's forward with the model's own and"
        " refuses a difference (`--skip-equivalence-check` to override) | guard |"
    )
    return "\n".join(rows)
