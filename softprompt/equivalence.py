"""The load-time equivalence guard: softprompt's forward path must give what the model's own forward gives.

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
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from softprompt.data import pad_right

if TYPE_CHECKING:  # the guard is called by prompted.py and imports nothing of it at run time
    from softprompt.prompted import PromptedModel

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
