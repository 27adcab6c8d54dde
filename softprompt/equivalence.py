"""The load-time equivalence guard: softprompt's forward path must give what the model's own forward gives.

softprompt never runs a model the way its authors tested it (it feeds `inputs_embeds`, reuses prompt keys and
values across rows, pads between prefix and input, and scores only a few positions), so every architecture it has
not been built for is a chance of plausible but wrong numbers. Before a PromptedModel is used, a probe batch of
two rows of different lengths goes through softprompt's own path (the one this PromptedModel will use: shared
prompt K/V or concatenation) with no prompt and with a one-token prompt (the embedding of a real token), and
through the model's own `input_ids` forward, each row alone, with that token in the prompt's place. The two
must agree at every scored position:

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
    """Largest relative difference over the probe rows, without a prompt and with a one-token prompt."""
    dev = pm.backbone.device
    rows = [pm.encode_input(t) for t in PROBE_TEXTS]
    token = int(pm.tok("the", add_special_tokens=False)["input_ids"][0])
    worst = 0.0
    for prompt_ids in ([], [token]):
        prompt = pm.embed(torch.tensor(prompt_ids, dtype=torch.long, device=dev)) if prompt_ids else None
        prefix = pm.build_prefix([prompt])
        batch = pm.collate(rows).to(dev)
        refs = [pm.prefix_ids + prompt_ids + r for r in rows]  # the same rows as plain token ids, each alone
        ours, theirs = _compare(pm, prefix, batch, refs, [len(r) for r in rows], n_prefix=len(prompt_ids))
        for a, b in zip(ours, theirs):
            worst = max(worst, float((a.float() - b.float()).abs().max() / b.float().abs().max().clamp(min=1e-6)))
    return worst


def _compare(
    pm: PromptedModel, prefix: Any, batch: Any, refs: list[list[int]], lens: list[int], n_prefix: int
) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Per row: softprompt's tensor and the model's own, at the same positions."""
    dev, model = pm.backbone.device, pm.model
    ids = [torch.tensor([r], dtype=torch.long, device=dev) for r in refs]
    if pm.family == "causal":
        N, T = batch.ids.shape
        every = torch.arange(T, device=dev)[None].expand(N, -1)  # (N, T): all positions, rows left-padded
        logits = pm.lm_logits(pm.causal_hidden(prefix, None, batch.ids, batch.mask, every))  # (N, T, V)
        ours = [logits[i, T - n :] for i, n in enumerate(lens)]
        return ours, [model(input_ids=x, use_cache=False).logits[0, -n:] for x, n in zip(ids, lens)]
    if pm.family == "seq2seq":
        target = torch.tensor([refs[0][-3:]] * len(refs), dtype=torch.long, device=dev)  # (N, 3) probe target
        h, attn, _ = pm.encoder_hidden(prefix, None, batch.ids, batch.mask)
        ours = list(pm._decoder_logp(h, attn, target))
        own = [model(input_ids=x, labels=target[:1]) for x in ids]  # the model shifts its labels by its own rule
        return ours, [o.logits[0].float().log_softmax(-1) for o in own]
    h, _, _ = pm.encoder_hidden(prefix, None, batch.ids, batch.mask)  # (N, S, d) right-padded
    width = [len(pm.prefix_ids) + n_prefix + n for n in lens]
    return [h[i, :w] for i, w in enumerate(width)], [model(input_ids=x)[0][0] for x in ids]
