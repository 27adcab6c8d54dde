"""Interoperability: PEFT adapters, serving-engine prompt tables and vLLM prompt embeddings.

PEFT (`softprompt export --to peft PROMPT DIR`, `softprompt import --from peft DIR PROMPT`)
    A PEFT prompt-tuning adapter is `adapter_config.json` + `adapter_model.safetensors` holding one tensor,
    `prompt_embeddings` (num_virtual_tokens, token_dim). PEFT puts the virtual tokens in front of *everything*,
    including a BOS/CLS token the tokenizer adds: `[prompt][BOS][text]`. That is softprompt's `--position start`.
    softprompt's default `--position auto` keeps the BOS first: `[BOS][prompt][text]`. So:
      - position start, or a tokenizer that adds no leading special token (SmolLM2, GPT-2, T5): exported as is;
        PEFT's outputs equal softprompt's for the same input ids.
      - position auto behind a BOS/CLS: refused unless `fold_bos` (the BOS embedding becomes virtual token 0,
        num_virtual_tokens = P + 1, and PEFT is fed the input ids *without* the BOS:
        `tokenizer(text, add_special_tokens=False)`; outputs are then identical) or `force` (exported anyway,
        outputs differ).
    softprompt's own metadata (template, verbalizer, position, fingerprint, folding) rides along in the
    safetensors header of `adapter_model.safetensors`, which PEFT ignores, so export -> import is lossless.
    Importing a PEFT-trained adapter gives a `--position start` prompt, fingerprinted against the base model
    that `adapter_config.json` names (or `--model`).

Prompt table (`softprompt export --to prompt-table PROMPT... DIR`)
    `prompt_table.npy` (tasks, tokens, dim), the layout TensorRT-LLM's prompt-tuning path (`--prompt_table_path`,
    `--prompt_tasks`) and NeMo's TensorRT-LLM exporter take; shorter prompts are zero-padded to the longest
    (each request uses only its task's own count of virtual ids). `prompt_table.json` is the index: task name ->
    id, per-task token count and leading token ids, vocab_size, dim, dtype, base model and fingerprint. Virtual
    token i of a request is input id `vocab_size + i`; `table_input_ids` builds a request's ids.

vLLM (`--enable-prompt-embeds`)
    `prompt_embeds_for(prompt_path, text, backbone)` returns the (P + T, d) tensor vLLM accepts as
    `{"prompt_embeds": tensor}` (offline `LLM.generate`), and `encode_prompt_embeds` its base64 form for the
    OpenAI-compatible server. The rows are exactly what softprompt's concatenation path feeds the model:
    [leading special token][prompt][input tokens].
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from softprompt.checkpoint import (
    CheckpointError,
    PromptCheckpoint,
    atomic_write,
    check_compatible,
    load_prompt,
    save_prompt,
)
from softprompt.config import DataConfig, ModelConfig
from softprompt.methods import check_export
from softprompt.models import ALIASES, Backbone, load_backbone

PEFT_CONFIG_FILE = "adapter_config.json"
PEFT_WEIGHTS_FILE = "adapter_model.safetensors"
PEFT_KEY = "prompt_embeddings"
PEFT_TASK_TYPES = {"causal": "CAUSAL_LM", "seq2seq": "SEQ_2_SEQ_LM", "encoder": "FEATURE_EXTRACTION"}
FAMILY_OF_TASK_TYPE = {
    "CAUSAL_LM": "causal",
    "SEQ_2_SEQ_LM": "seq2seq",
    "FEATURE_EXTRACTION": "encoder",
    "SEQ_CLS": "encoder",
    "TOKEN_CLS": "encoder",
    "QUESTION_ANS": "encoder",
}
META_KEY = "softprompt_meta"  # our checkpoint metadata (JSON), in the adapter's safetensors header
FOLD_KEY = "softprompt_folded_prefix"  # number of leading rows that are folded BOS/CLS embeddings
TABLE_FILE = "prompt_table.npy"
TABLE_INDEX = "prompt_table.json"
TABLE_FORMAT = "softprompt-prompt-table"


class InteropError(ValueError):
    """An export or import that cannot be done faithfully; the message says why and which flag changes it."""


# ----- shared -------------------------------------------------------------------------------------------------
def _backbone(name: str | None, backbone: Backbone | None, device: str = "cpu") -> Backbone:
    if backbone is not None:
        return backbone
    if not name:
        raise InteropError("no base model: the file names none; pass --model")
    return load_backbone(ModelConfig(model=name, device=device), progress=False)


def _prompted(bb: Backbone, position: str):
    from softprompt.prompted import PromptedModel

    return PromptedModel(bb, position=position)


def _lead_embeds(bb: Backbone, ids: list[int]) -> torch.Tensor:
    emb = bb.model.get_input_embeddings()
    with torch.no_grad():
        return emb(torch.tensor(ids, dtype=torch.long, device=bb.device)).detach().float().cpu()


def _peft_base_name(bb: Backbone, override: str | None) -> str:
    """What PEFT's `base_model_name_or_path` should say: something transformers can load on its own."""
    if override:
        return override
    name = bb.model_id
    if name in ALIASES:  # an alias means nothing to PEFT: point at the local safetensors copy it resolves to
        from softprompt.models import _resolve_source

        return _resolve_source(name, progress=False)[0]
    path = Path(name).expanduser()
    return str(path.resolve()) if path.exists() else name


# ----- PEFT export ----------------------------------------------------------------------------------------------
def export_peft(
    prompt_path: str | Path,
    out_dir: str | Path,
    *,
    model: str | None = None,
    backbone: Backbone | None = None,
    base_model: str | None = None,
    fold_bos: bool = False,
    force: bool = False,
    allow_other_model: bool = False,
) -> dict[str, Any]:
    """Write a PEFT prompt-tuning adapter (adapter_config.json + adapter_model.safetensors) for a prompt file.

    `model`/`backbone`: the base model (default: the one recorded in the prompt). `base_model`: what to write as
    `base_model_name_or_path` (default: a loadable path or hub name for that model). Returns a summary dict.
    """
    ck = load_prompt(prompt_path)
    check_export(ck, "peft")
    bb = _backbone(model or ck.meta.get("base_model"), backbone)
    check_compatible(ck, bb.embed_dim, bb.fingerprint, allow_other_model=allow_other_model)
    position = str(ck.meta.get("position", "auto"))
    pm = _prompted(bb, position)
    notes: list[str] = []
    rows, folded, exact = ck.prompt.float(), 0, True
    if pm.prefix_ids:  # trained behind a BOS/CLS that PEFT would put after the prompt
        if fold_bos:
            rows, folded = torch.cat([_lead_embeds(bb, pm.prefix_ids), rows]), len(pm.prefix_ids)
            notes.append("BOS folded into virtual token 0: feed PEFT tokenizer(text, add_special_tokens=False)")
        elif force:
            exact = False
            notes.append("position auto exported as is: PEFT puts the prompt before the BOS, outputs differ")
            warnings.warn(f"{prompt_path}: {notes[-1]}", stacklevel=2)
        else:
            tok = bb.tokenizer.convert_ids_to_tokens(pm.prefix_ids[0])
            raise InteropError(
                f"{prompt_path}: trained with --position auto behind {tok!r} ([{tok}][prompt][text]); PEFT puts "
                f"virtual tokens first ([prompt][{tok}][text]). Use --fold-bos for identical outputs (the {tok!r} "
                "embedding becomes virtual token 0; feed PEFT input ids without special tokens), or --force"
            )
    if ck.extra:
        if not force:
            raise InteropError(
                f"{prompt_path}: holds {', '.join(sorted(ck.extra))} (an encoder head), which a PEFT prompt-tuning "
                "adapter cannot carry; --force exports the prompt alone"
            )
        exact = False
        notes.append(f"not exported (no place in PEFT): {', '.join(sorted(ck.extra))}")
    cfg = bb.model.config.get_text_config() if hasattr(bb.model.config, "get_text_config") else bb.model.config
    adapter = {
        "auto_mapping": None,
        "base_model_name_or_path": _peft_base_name(bb, base_model),
        "inference_mode": True,
        "modules_to_save": None,
        "num_attention_heads": getattr(cfg, "num_attention_heads", None),
        "num_layers": getattr(cfg, "num_hidden_layers", None),
        "num_transformer_submodules": 1,  # encoder-decoders too: softprompt prompts the encoder only, as PEFT does
        "num_virtual_tokens": int(rows.shape[0]),
        "peft_type": "PROMPT_TUNING",
        "prompt_tuning_init": "RANDOM",  # unused with inference_mode; the weights come from the file
        "prompt_tuning_init_text": None,
        "revision": None,
        "task_type": PEFT_TASK_TYPES[bb.family],
        "token_dim": int(rows.shape[1]),
        "tokenizer_kwargs": None,
        "tokenizer_name_or_path": None,
    }
    header = {"format": "pt", META_KEY: json.dumps(_raw_meta(ck), sort_keys=True), FOLD_KEY: str(folded)}
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tensors = {PEFT_KEY: rows.contiguous()}
    atomic_write(out / PEFT_WEIGHTS_FILE, lambda tmp: save_file(tensors, tmp, metadata=header))
    text = json.dumps(adapter, indent=2, sort_keys=True) + "\n"
    atomic_write(out / PEFT_CONFIG_FILE, lambda tmp: Path(tmp).write_text(text))
    feed = "tokenizer(text, add_special_tokens=False)" if folded else "the ids softprompt feeds (tokenizer(text))"
    readme = _PEFT_README.format(
        base=adapter["base_model_name_or_path"],
        n=adapter["num_virtual_tokens"],
        src=Path(prompt_path).name,
        feed=feed,
        position=position,
        folded=folded,
    )
    atomic_write(out / "README.md", lambda tmp: Path(tmp).write_text(readme))
    return {
        "out": str(out),
        "num_virtual_tokens": int(rows.shape[0]),
        "task_type": adapter["task_type"],
        "base_model_name_or_path": adapter["base_model_name_or_path"],
        "folded_prefix": folded,
        "exact": exact,
        "notes": notes,
    }


_PEFT_README = """# PEFT prompt-tuning adapter exported by softprompt

Source: `{src}` (softprompt position `{position}`, folded leading tokens: {folded}); {n} virtual tokens.

```python
from peft import PeftModel
from transformers import AutoModelForCausalLM  # or the class that fits the base model

base = AutoModelForCausalLM.from_pretrained("{base}")
model = PeftModel.from_pretrained(base, "<this directory>")
```

Feed the model {feed}; its outputs then equal softprompt's.
`softprompt import --from peft <this directory> prompt.safetensors` converts it back losslessly.
"""


def _raw_meta(ck: PromptCheckpoint) -> dict[str, str]:
    """The checkpoint's metadata as the strings save_prompt writes."""
    return {k: v if isinstance(v, str) else json.dumps(v, sort_keys=True) for k, v in ck.meta.items() if v is not None}


# ----- PEFT import ----------------------------------------------------------------------------------------------
def read_peft(adapter_dir: str | Path) -> tuple[dict[str, Any], torch.Tensor, dict[str, str]]:
    """adapter_config.json, the prompt_embeddings tensor (float32) and the safetensors header metadata."""
    d = Path(adapter_dir)
    cfg_path, w_path = d / PEFT_CONFIG_FILE, d / PEFT_WEIGHTS_FILE
    if not d.is_dir():
        raise InteropError(f"{d}: not a directory (expected a PEFT adapter directory)")
    if not cfg_path.is_file():
        raise InteropError(f"{d}: no {PEFT_CONFIG_FILE} (not a PEFT adapter directory)")
    try:
        cfg = json.loads(cfg_path.read_text())
    except (OSError, ValueError) as e:
        raise InteropError(f"{cfg_path}: unreadable ({e})") from None
    ptype = cfg.get("peft_type")
    if ptype != "PROMPT_TUNING":
        hint = " (P-tuning's prompt comes out of an MLP/LSTM encoder)" if ptype == "P_TUNING" else ""
        raise InteropError(f"{cfg_path}: peft_type {ptype!r}; only PROMPT_TUNING adapters are soft prompts{hint}")
    if not w_path.is_file():
        if (d / "adapter_model.bin").is_file():
            raise InteropError(
                f"{d}: only adapter_model.bin (a pickle, never loaded here); re-save it with PEFT's "
                "save_pretrained(..., safe_serialization=True)"
            )
        raise InteropError(f"{d}: no {PEFT_WEIGHTS_FILE}")
    try:
        with safe_open(str(w_path), framework="pt") as f:
            header = dict(f.metadata() or {})
            if PEFT_KEY not in f.keys():
                raise InteropError(f"{w_path}: no {PEFT_KEY!r} tensor (has {', '.join(f.keys()) or 'none'})")
            emb = f.get_tensor(PEFT_KEY).float()
    except InteropError:
        raise
    except Exception as e:
        raise InteropError(f"{w_path}: corrupt safetensors file ({str(e).splitlines()[0]})") from None
    n = int(cfg.get("num_virtual_tokens") or 0)
    if emb.ndim != 2 or n < 1 or emb.shape[0] < n:
        raise InteropError(f"{w_path}: {PEFT_KEY} has shape {tuple(emb.shape)}, num_virtual_tokens is {n}")
    # Seq2seq adapters may hold 2 * n rows (num_transformer_submodules 2); prompt tuning only ever uses the first n.
    return cfg, emb[:n].contiguous(), header


def import_peft(
    adapter_dir: str | Path,
    out_path: str | Path,
    *,
    model: str | None = None,
    backbone: Backbone | None = None,
    allow_other_model: bool = False,
    task: str | None = None,
    template: str | None = None,
    labels: str | None = None,
) -> PromptCheckpoint:
    """Convert a PEFT prompt-tuning adapter into a softprompt prompt file, fingerprinting its base model.

    The base model is `model`/`backbone`, else the adapter's `base_model_name_or_path`. An adapter written by
    `export_peft` gets its original metadata back (and its folded BOS removed); a PEFT-trained one becomes a
    `--position start` prompt with `task`/`template`/`labels` (default: generate, "{text}"; classify with labels).
    """
    cfg, rows, header = read_peft(adapter_dir)
    ours = _decode_meta_header(header.get(META_KEY))
    name = model or cfg.get("base_model_name_or_path") or ours.get("base_model")
    bb = _backbone(name, backbone)
    if rows.shape[1] != bb.embed_dim:
        raise InteropError(f"{adapter_dir}: prompt dim {rows.shape[1]} != the embedding dim {bb.embed_dim} of {name}")
    fam = FAMILY_OF_TASK_TYPE.get(str(cfg.get("task_type")))
    if fam is not None and fam != bb.family:
        warnings.warn(
            f"{adapter_dir}: task_type {cfg.get('task_type')} but {name} loads as a {bb.family} model", stacklevel=2
        )
    folded = int(header.get(FOLD_KEY, "0") or 0)
    if ours:  # one of ours: restore everything, drop the folded leading token(s)
        meta = dict(ours)
        fp = meta.get("fingerprint")
        if fp and fp != bb.fingerprint and not allow_other_model:
            raise CheckpointError(
                f"{adapter_dir}: exported from a prompt trained on another model (fingerprint {fp}, {name} has "
                f"{bb.fingerprint}); pass --allow-other-model to import it anyway"
            )
        if folded:
            lead = _prompted(bb, str(meta.get("position", "auto"))).prefix_ids
            if len(lead) != folded or not torch.allclose(rows[:folded], _lead_embeds(bb, lead), atol=1e-6):
                warnings.warn(f"{adapter_dir}: folded rows differ from {name}'s BOS/CLS embedding", stacklevel=2)
            rows = rows[folded:]
        meta.pop("num_tokens", None)
        meta.pop("embed_dim", None)
    else:
        from softprompt.task import TaskSpec

        kind = task or ("classify" if labels else "generate")
        spec = TaskSpec.from_config(
            DataConfig(task=kind, template=template or "{text}", labels=labels), position="start"
        )
        meta = {"init": f"peft:{Path(adapter_dir).name}", **spec.to_meta()}
    base = model or (ours.get("base_model") if ours else None) or name  # an alias round-trips as the alias
    meta.update(
        base_model=base,
        architecture=bb.architecture,
        family=bb.family,
        fingerprint=bb.fingerprint,
        imported_from=f"peft:{Path(adapter_dir).resolve()}",
    )
    save_prompt(out_path, rows, meta)
    return load_prompt(out_path)


def _decode_meta_header(raw: str | None) -> dict[str, Any]:
    if not raw:
        return {}
    from softprompt.checkpoint import _decode_meta

    try:
        return _decode_meta(json.loads(raw))
    except (ValueError, AttributeError):
        return {}


# ----- prompt table (TensorRT-LLM / NeMo) ----------------------------------------------------------------------
def export_prompt_table(
    prompt_paths: Sequence[str | Path],
    out_dir: str | Path,
    *,
    names: Sequence[str] | None = None,
    model: str | None = None,
    backbone: Backbone | None = None,
    dtype: str = "float32",
    allow_other_model: bool = False,
) -> dict[str, Any]:
    """Write prompt_table.npy (tasks, tokens, dim) and its index prompt_table.json; returns the index."""
    if not prompt_paths:
        raise InteropError("export --to prompt-table: at least one prompt file is required")
    np_dtype = {"float32": np.float32, "float16": np.float16}.get(dtype)
    if np_dtype is None:
        raise InteropError(f"--dtype: a prompt table is float32 or float16 (numpy has no bfloat16), got {dtype!r}")
    names = list(names) if names else [Path(p).stem for p in prompt_paths]
    if len(names) != len(prompt_paths) or len(set(names)) != len(names):
        raise InteropError(f"--task-names: need {len(prompt_paths)} distinct names, got {names}")
    cks = [load_prompt(p) for p in prompt_paths]
    for c in cks:
        check_export(c, "prompt-table")
    bb = _backbone(model or cks[0].meta.get("base_model"), backbone)
    for c in cks:
        check_compatible(c, bb.embed_dim, bb.fingerprint, allow_other_model=allow_other_model)
    width = max(c.num_tokens for c in cks)
    table = np.zeros((len(cks), width, bb.embed_dim), dtype=np_dtype)
    tasks = []
    for i, (c, name) in enumerate(zip(cks, names, strict=True)):
        table[i, : c.num_tokens] = c.prompt.float().numpy().astype(np_dtype)
        position = str(c.meta.get("position", "auto"))
        tasks.append(
            {
                "name": name,
                "id": i,
                "source": str(c.path),
                "num_virtual_tokens": c.num_tokens,
                "position": position,
                "prefix_token_ids": _prompted(bb, position).prefix_ids,
                "task": c.meta.get("task"),
                "template": c.meta.get("template"),
                "labels": c.meta.get("labels"),
            }
        )
    weight = bb.model.get_input_embeddings().weight
    assert isinstance(weight, torch.Tensor)
    vocab = int(weight.shape[0])
    index = {
        "format": TABLE_FORMAT,
        "format_version": 1,
        "table": TABLE_FILE,
        "shape": list(table.shape),
        "dtype": dtype,
        "num_tasks": len(cks),
        "max_virtual_tokens": width,
        "hidden_size": bb.embed_dim,
        "vocab_size": vocab,
        "base_model": bb.model_id,
        "architecture": bb.architecture,
        "fingerprint": bb.fingerprint,
        "task_ids": {t["name"]: t["id"] for t in tasks},
        "tasks": tasks,
        "input_ids": "prefix_token_ids + [vocab_size + i for i < num_virtual_tokens] + the input's token ids "
        "(as softprompt encodes them); the request's task id selects the table row",
    }
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)

    def write_npy(tmp: str) -> None:
        with open(tmp, "wb") as f:
            np.save(f, table)

    atomic_write(out / TABLE_FILE, write_npy)
    text = json.dumps(index, indent=2) + "\n"
    atomic_write(out / TABLE_INDEX, lambda tmp: Path(tmp).write_text(text))
    return index


def load_prompt_table(out_dir: str | Path) -> tuple[np.ndarray, dict[str, Any]]:
    d = Path(out_dir)
    index = json.loads((d / TABLE_INDEX).read_text())
    if index.get("format") != TABLE_FORMAT:
        raise InteropError(f"{d / TABLE_INDEX}: not a softprompt prompt-table index")
    return np.load(d / index["table"], allow_pickle=False), index


def table_input_ids(index: Mapping[str, Any], task: str | int, input_ids: Sequence[int]) -> list[int]:
    """A request's input ids for the prompt-table engines: leading tokens, virtual ids, then the input's ids."""
    t = _table_task(index, task)
    virtual = [int(index["vocab_size"]) + i for i in range(int(t["num_virtual_tokens"]))]
    return [*t["prefix_token_ids"], *virtual, *input_ids]


def _table_task(index: Mapping[str, Any], task: str | int) -> Mapping[str, Any]:
    tid = index["task_ids"].get(task) if isinstance(task, str) else task
    if tid is None or not 0 <= int(tid) < len(index["tasks"]):
        raise InteropError(f"unknown task {task!r}; the table has {', '.join(index['task_ids'])}")
    return index["tasks"][int(tid)]


# ----- vLLM prompt embeddings -----------------------------------------------------------------------------------
class PromptEmbedder:
    """Turns (task, text) into the `prompt_embeds` tensor vLLM accepts, for one backbone and several prompts.

        emb = PromptEmbedder(load_backbone("smollm2-135m"), {"sst2": "sst2.safetensors"})
        llm = vllm.LLM(model=..., enable_prompt_embeds=True)
        llm.generate({"prompt_embeds": emb("sst2", "Review: a fine film\\nSentiment:")})

    `text` is the filled template (as `softprompt predict` takes it) or a dict of the template's fields.
    """

    def __init__(
        self,
        backbone: Backbone,
        prompts: Mapping[str, str | Path] | Sequence[str | Path],
        *,
        allow_other_model: bool = False,
        truncate: bool = True,
    ) -> None:
        from softprompt.task import BoundTask, TaskSpec

        if backbone.family != "causal":
            raise InteropError(f"vLLM prompt embeddings need a decoder-only model, not {backbone.family}")
        self.backbone = backbone
        self.truncate = truncate
        items = prompts.items() if isinstance(prompts, Mapping) else [(Path(p).stem, p) for p in prompts]
        self.tasks: dict[str, tuple[Any, torch.Tensor]] = {}
        for name, path in items:
            ck = load_prompt(path)
            check_compatible(ck, backbone.embed_dim, backbone.fingerprint, allow_other_model=allow_other_model)
            spec = TaskSpec.from_meta(ck.meta)
            pm = _prompted(backbone, spec.position)
            task = BoundTask(spec, pm, num_tokens=ck.num_tokens)
            with torch.no_grad():
                prefix = pm.build_prefix([ck.prompt.to(backbone.device)], kv=False).embeds[0]  # [lead][prompt]
            self.tasks[str(name)] = (task, prefix.detach())

    def input_ids(self, task: str, text: str | Mapping[str, str]) -> list[int]:
        """The input's token ids as softprompt encodes them (template filled, truncated like predict)."""
        bound = self._task(task)[0]
        if not isinstance(text, str):
            from softprompt.data import Template

            text = Template(bound.spec.template).fill(dict(text), "input")
        enc, _ = bound.encode_texts([text], truncate=self.truncate)
        return list(enc[0].input_ids)

    def __call__(self, task: str, text: str | Mapping[str, str], *, dtype: torch.dtype | None = None) -> torch.Tensor:
        """(P + T, d) on the CPU: [leading special token][prompt][input tokens], in the backbone's dtype."""
        bound, prefix = self._task(task)
        ids = torch.tensor([self.input_ids(task, text)], dtype=torch.long, device=self.backbone.device)
        with torch.no_grad():
            x = torch.cat([prefix, bound.pm.embed(ids)[0].to(prefix.dtype)])
        return x.to("cpu", dtype or x.dtype).contiguous()

    def _task(self, task: str) -> tuple[Any, torch.Tensor]:
        if task not in self.tasks:
            raise InteropError(f"unknown task {task!r}; loaded: {', '.join(self.tasks)}")
        return self.tasks[task]


def prompt_embeds_for(
    task_prompt_path: str | Path,
    text: str | Mapping[str, str],
    backbone: Backbone,
    *,
    allow_other_model: bool = False,
    dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """(P + T, d): what vLLM takes as `prompt_embeds` for `text` under one prompt file (see PromptEmbedder)."""
    emb = PromptEmbedder(backbone, {"task": task_prompt_path}, allow_other_model=allow_other_model)
    return emb("task", text, dtype=dtype)


def encode_prompt_embeds(embeds: torch.Tensor) -> str:
    """Base64 of `torch.save(tensor)`: the `prompt_embeds` string vLLM's OpenAI-compatible server decodes
    (with `torch.load(..., weights_only=True)`), e.g. `client.completions.create(model=M, prompt="",
    extra_body={"prompt_embeds": encode_prompt_embeds(t)})`."""
    if embeds.ndim != 2:
        raise InteropError(f"prompt_embeds must be 2-D (tokens, dim), got shape {tuple(embeds.shape)}")
    buf = io.BytesIO()
    torch.save(embeds.detach().cpu().contiguous(), buf)
    return base64.b64encode(buf.getvalue()).decode("ascii")


def decode_prompt_embeds(data: str) -> torch.Tensor:
    """The inverse of encode_prompt_embeds (weights_only: never unpickles arbitrary objects)."""
    return torch.load(io.BytesIO(base64.b64decode(data)), weights_only=True)


# ----- CLI ------------------------------------------------------------------------------------------------------
def run(args: argparse.Namespace) -> int | None:
    """Run `export` / `import`; prints one JSON line. None when the command is not ours."""
    if args.cmd == "export":
        if len(args.paths) < 2:
            raise InteropError("export: give the prompt file(s) and then the output directory")
        *prompts, out = args.paths
        if args.export_to == "peft":
            if len(prompts) != 1:
                raise InteropError("export --to peft: exactly one prompt file, then the output directory")
            res = export_peft(
                prompts[0],
                out,
                model=args.model,
                base_model=args.base_model,
                fold_bos=args.fold_bos,
                force=args.force,
                allow_other_model=args.allow_other_model,
            )
        else:
            names = [s.strip() for s in args.task_names.split(",")] if args.task_names else None
            idx = export_prompt_table(
                prompts, out, names=names, model=args.model, dtype=args.dtype, allow_other_model=args.allow_other_model
            )
            res = {"out": out, "shape": idx["shape"], "task_ids": idx["task_ids"], "vocab_size": idx["vocab_size"]}
        print(json.dumps(res))
        return 0
    if args.cmd == "import":
        ck = import_peft(
            args.adapter_dir,
            args.out,
            model=args.model,
            allow_other_model=args.allow_other_model,
            task=args.task,
            template=args.template,
            labels=args.labels,
        )
        print(
            json.dumps(
                {
                    "out": args.out,
                    "num_tokens": ck.num_tokens,
                    "embed_dim": ck.embed_dim,
                    "base_model": ck.meta.get("base_model"),
                    "fingerprint": ck.meta.get("fingerprint"),
                    "position": ck.meta.get("position"),
                }
            )
        )
        return 0
    return None
