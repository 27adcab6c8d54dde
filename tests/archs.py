"""Tiny random models of many architectures (hidden 32, 2 layers), built from transformers' config classes.

The architecture matrix (tests/test_architectures.py) runs each through softprompt and compares it with the model's
own forward. Every kind shares the MiniLM tokenizer (tests/tiny.py). After init, every 2-D weight is scaled by
SHARP (as conftest's sharp models) so that scores and greedy generations depend on the prompt and differences
stand well above float noise. Sliding windows are 8 positions, so the probe rows (up to ~20 positions) cross them.
Independent of softprompt on purpose.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from tiny import tiny_tokenizer

SHARP = 8.0
WINDOW = 8
NEO_WINDOW = 32  # GPT-Neo: exact within its window, refused for padded rows across it (test_architectures)


@dataclass(frozen=True)
class Arch:
    model_type: str  # transformers' model_type (AutoConfig.for_model)
    family: str  # causal | seq2seq | encoder
    extra: dict[str, Any] = field(default_factory=dict)  # config overrides for this architecture
    name: str = ""  # matrix id, when one model_type appears twice

    @property
    def id(self) -> str:
        return self.name or self.model_type


_MOE = {"num_local_experts": 4, "num_experts_per_tok": 2}
_SEQ2SEQ = {
    "d_model": 32, "encoder_layers": 2, "decoder_layers": 2, "encoder_attention_heads": 4,
    "decoder_attention_heads": 4, "encoder_ffn_dim": 64, "decoder_ffn_dim": 64,
}  # fmt: skip

ARCHS: tuple[Arch, ...] = (
    # decoder-only: dense, grouped-query and multi-query attention
    Arch("gpt2", "causal"),
    Arch("llama", "causal", {"num_key_value_heads": 2}),
    Arch("qwen2", "causal", {"num_key_value_heads": 2}),
    Arch("qwen3", "causal", {"num_key_value_heads": 2, "head_dim": 8}),
    Arch("gemma", "causal", {"num_key_value_heads": 1, "head_dim": 8}),  # multi-query, scaled embeddings
    Arch("phi3", "causal", {"num_key_value_heads": 2}),
    Arch("olmo", "causal"),
    Arch("olmo2", "causal"),
    Arch("stablelm", "causal", {"num_key_value_heads": 2}),
    Arch("smollm3", "causal", {"num_key_value_heads": 2}),
    Arch("opt", "causal", {"ffn_dim": 64, "word_embed_proj_dim": 32}),
    Arch("gpt_bigcode", "causal", {"multi_query": True}),  # multi-query
    Arch("persimmon", "causal"),
    Arch("starcoder2", "causal", {"num_key_value_heads": 2}),
    # parallel attention + MLP blocks
    Arch("gpt_neox", "causal"),
    Arch("gptj", "causal", {"rotary_dim": 4}),
    Arch("phi", "causal"),
    Arch("codegen", "causal", {"rotary_dim": 4}),
    Arch("falcon", "causal", {"multi_query": True, "parallel_attn": True}),  # multi-query + parallel
    # ALiBi position biases
    Arch("bloom", "causal"),
    Arch("falcon", "causal", {"alibi": True, "multi_query": False, "new_decoder_architecture": False}, "falcon-alibi"),
    # mixture of experts
    Arch("mixtral", "causal", {"num_key_value_heads": 2, **_MOE}),
    Arch(
        "qwen2_moe",
        "causal",
        {
            "num_key_value_heads": 2,
            "num_experts": 4,
            "num_experts_per_tok": 2,
            "moe_intermediate_size": 32,
            "shared_expert_intermediate_size": 32,
        },
    ),  # fmt: skip
    Arch(
        "qwen3_moe", "causal", {"num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 32, "head_dim": 8}
    ),  # fmt: skip
    Arch("phimoe", "causal", {"num_key_value_heads": 2, **_MOE}),
    Arch("granitemoe", "causal", {"logits_scaling": 4.0, "embedding_multiplier": 3.0, **_MOE}),
    # scaled logits / scaled embeddings
    Arch(
        "granite",
        "causal",
        {"logits_scaling": 4.0, "embedding_multiplier": 3.0, "attention_multiplier": 0.5, "residual_multiplier": 0.5},
    ),  # fmt: skip
    Arch("cohere", "causal", {"logit_scale": 0.25}),
    Arch("xglm", "causal", {"d_model": 32, "ffn_dim": 64, "attention_heads": 4, "num_layers": 2}),
    Arch("biogpt", "causal"),
    # sliding windows (all layers, alternating, soft-capped)
    Arch("mistral", "causal", {"num_key_value_heads": 2, "sliding_window": WINDOW}),
    Arch(
        "gemma2",
        "causal",
        {
            "head_dim": 8,
            "sliding_window": WINDOW,
            "final_logit_softcapping": 2.0,
            "layer_types": ["sliding_attention", "full_attention"],
        },
    ),  # fmt: skip
    Arch(
        "gemma3_text",
        "causal",
        {"head_dim": 8, "sliding_window": WINDOW, "layer_types": ["sliding_attention", "full_attention"]},
    ),  # fmt: skip
    Arch("cohere2", "causal", {"sliding_window": WINDOW, "layer_types": ["sliding_attention", "full_attention"]}),
    # local attention inside the layers: refused where padding would enter the window
    Arch(
        "gpt_neo", "causal", {"num_layers": 2, "attention_types": [[["global", "local"], 1]], "window_size": NEO_WINDOW}
    ),
    # refused: MPT's ALiBi bias is built from key columns, so pad slots and the prompt shift it (REFUSED)
    Arch("mpt", "causal", {"d_model": 32, "n_heads": 4, "expansion_ratio": 2}),
    # encoder-decoder
    Arch("t5", "seq2seq", {"d_model": 32, "d_kv": 8, "d_ff": 64, "num_layers": 2, "num_heads": 4}),
    Arch("mt5", "seq2seq", {"d_model": 32, "d_kv": 8, "d_ff": 64, "num_layers": 2, "num_heads": 4}),
    Arch("bart", "seq2seq", _SEQ2SEQ),
    Arch("mbart", "seq2seq", _SEQ2SEQ),
    Arch("marian", "seq2seq", {**_SEQ2SEQ, "scale_embedding": True}),
    Arch("pegasus", "seq2seq", {**_SEQ2SEQ, "scale_embedding": True}),
    Arch("m2m_100", "seq2seq", {**_SEQ2SEQ, "scale_embedding": True}),
    Arch("blenderbot", "seq2seq", _SEQ2SEQ),
    # encoders (incl. factorized embeddings: embedding_size != hidden_size)
    Arch("bert", "encoder"),
    Arch("roberta", "encoder"),
    Arch("xlm-roberta", "encoder"),
    Arch("distilbert", "encoder", {"dim": 32, "n_layers": 2, "n_heads": 4, "hidden_dim": 64}),
    Arch("albert", "encoder", {"embedding_size": 16}),
    Arch("electra", "encoder", {"embedding_size": 16}),
    Arch("deberta-v2", "encoder"),
    Arch("mpnet", "encoder"),
)
BY_ID = {a.id: a for a in ARCHS}
REFUSED = {"mpt": "ALiBi bias by key column: padding and the prompt shift it; refused by the load-time guard"}


def _build(arch: Arch, tok: Any) -> Any:
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoModelForSeq2SeqLM

    ids = {"bos_token_id": tok.cls_token_id, "eos_token_id": tok.sep_token_id, "pad_token_id": tok.pad_token_id}
    base = {"vocab_size": len(tok), "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4}
    base |= {"intermediate_size": 64, "max_position_embeddings": 512, **ids}
    if arch.family == "seq2seq":
        base |= {"decoder_start_token_id": tok.pad_token_id, "forced_eos_token_id": None}
    cfg = AutoConfig.for_model(arch.model_type, **(base | arch.extra))
    cls = {"causal": AutoModelForCausalLM, "seq2seq": AutoModelForSeq2SeqLM, "encoder": AutoModel}[arch.family]
    torch.manual_seed(0)
    model = cls.from_config(cfg)
    with torch.no_grad():
        for p in model.parameters():  # tied embeddings appear once
            if p.ndim == 2:
                p.mul_(SHARP)
    return model


def arch_model_dir(arch_id: str, root: Path) -> Path:
    """Write the tiny model of `arch_id` and its tokenizer to root/arch_id (built once, reused)."""
    arch = BY_ID[arch_id]
    out = Path(root) / arch.id
    if out.is_dir():
        return out
    tmp = Path(root) / f".{arch.id}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    tok = tiny_tokenizer(tmp)
    _build(arch, tok).save_pretrained(str(tmp))
    tmp.rename(out)
    return out
