"""The supported-architectures table (`softprompt models --architectures`, the README's table).

Each row is a family of transformers architectures, the forward path softprompt takes for it, what softprompt does
to stay exact there (softprompt.arch), and what the architecture matrix (tests/test_architectures.py) verifies on a
tiny random model of every listed `model_type`; a test keeps this table and the matrix the same set. Any other
architecture loads too: the load-time guard (softprompt.equivalence) compares softprompt's forward with the
model's own and refuses it with a one-line error where they differ.
"""

from __future__ import annotations

from dataclasses import dataclass

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
