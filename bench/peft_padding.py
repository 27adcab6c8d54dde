"""Why PEFT's prompt tuning scores a sentence differently inside a padded batch, and softprompt does not.

    python -m bench.peft_padding

PEFT prepends the prompt to the (left-padded) input embeddings and drops position ids, so the model numbers the
positions 0..P+T-1 whatever the padding: a row with k pads sees its text k positions further from the prompt than
when it runs alone (RoPE), and its scores change with the batch it lands in. softprompt gives every row the
positions it has alone (prompt, then text, pads skipped). Prints, for one SST-2-style sentence padded by a longer
one: the largest change of a next-token log-probability, PEFT vs softprompt, and the two systems on the row alone
(equal: same prompt values). smollm2-135m (offline alias); no data needed.
"""

from __future__ import annotations

import copy
import json
import sys

import torch

SHORT = "Review: a gorgeous, witty, seductive movie.\nSentiment:"
LONG = (
    "Review: the plot is nothing but boilerplate cliches from start to finish, and the acting is flat throughout."
    "\nSentiment:"
)


@torch.no_grad()
def main() -> int:
    from peft import PromptTuningConfig, TaskType, get_peft_model

    from softprompt import load_backbone
    from softprompt.prompted import PromptedModel

    bb = load_backbone("smollm2-135m", progress=False)
    torch.manual_seed(0)
    cfg = PromptTuningConfig(task_type=TaskType.CAUSAL_LM, num_virtual_tokens=20)
    peft = get_peft_model(copy.deepcopy(bb.model), cfg)
    prompt = peft.prompt_encoder["default"].embedding.weight.detach().clone()  # the same values for both
    pm = PromptedModel(bb, position="start")
    prefix = pm.build_prefix([prompt])
    a, b = (bb.tokenizer(t)["input_ids"] for t in (SHORT, LONG))
    batch = pm.collate([a, b])  # left-padded (B, T), the layout PEFT is handed as well
    pads = len(b) - len(a)

    def peft_logp(ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return peft(input_ids=ids, attention_mask=mask, logits_to_keep=1).logits[:, -1].float().log_softmax(-1)

    def ours_logp(ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        last = torch.full((ids.shape[0], 1), ids.shape[1] - 1)
        return pm.lm_logits(pm.causal_hidden(prefix, None, ids, mask, last))[:, 0].log_softmax(-1)

    alone = torch.tensor([a]), torch.ones(1, len(a), dtype=torch.long)
    out = {
        "pads": pads,
        "peft_padded_vs_alone": float((peft_logp(*alone)[0] - peft_logp(batch.ids, batch.mask)[0]).abs().max()),
        "softprompt_padded_vs_alone": float((ours_logp(*alone)[0] - ours_logp(batch.ids, batch.mask)[0]).abs().max()),
        "softprompt_vs_peft_alone": float((ours_logp(*alone)[0] - peft_logp(*alone)[0]).abs().max()),
    }
    print(
        f"one row behind {pads} pads, largest change of a next-token log-prob vs the row alone: PEFT "
        f"{out['peft_padded_vs_alone']:.3g}, softprompt {out['softprompt_padded_vs_alone']:.3g} "
        f"(the two alone: {out['softprompt_vs_peft_alone']:.3g})"
    )
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
