"""The server's pipeline, LitServe-style: decode request -> collate -> predict -> unbatch -> encode response.

Each stage is a small function, unit-tested without HTTP (tests/test_serve_pipeline.py); the routes
(softprompt.serve.app) and the scheduler (queue, policy, lifecycle: softprompt.serve.scheduler) only call them.

- decode request: the bodies (pydantic), a task's kind checked for the endpoint, inputs validated and tokenised
  (`encode_inputs`; lengths on characters first), generation settings checked (`gen_params`): every 4xx here,
  before anything is queued;
- collate: rows of many tasks -> one padded Batch with a prompt index per row (`collate`, pure) and the stacked
  Prefix of their tasks (`stack_prefixes`); decoder-only inputs left-padded, encoder inputs right-padded;
- predict: class scores of every row against its own task's verbalizer or head, PromptedModel.row_scores (the one
  forward path); generation goes through softprompt.serve.generation;
- unbatch: scores -> per-row labels and probabilities (`to_results`), rows -> requests (`unbatch`);
- encode response: the JSON of each endpoint (`classify_response`, `ensemble_results`, `generate_response`,
  `generate_event`, `completion`, `completion_chunk`).

Each row sits behind its own task's prefix (`rows[i]` indexes the stacked Prefix), so a row's scores equal what
`softprompt predict` computes for that input and prompt alone (up to float rounding of the padded matmuls). An
input-dependent task (softprompt.dynamic) puts each row behind its own route (routed) or its own prompt
(conditioned): `collate_rows` maps them.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field

from softprompt import methods
from softprompt.data import pad_left, pad_right
from softprompt.dynamic import resolve
from softprompt.evaluate import combine_probs
from softprompt.prompted import Batch, Prefix, PromptedModel
from softprompt.serve.errors import BadRequest, TooLarge, Unprocessable
from softprompt.serve.generation import GenParams
from softprompt.serve.registry import Registry, TaskEntry, check_text

# ---- decode request --------------------------------------------------------------------------------------
InputValue = str | dict[str, str | int | float | bool]


# ---- request / response models ---------------------------------------------------------------------------
class ClassifyBody(BaseModel):
    model_config = ConfigDict(extra="forbid")
    task: str | list[str] = Field(
        min_length=1,
        description="Task name (a prompt file in the prompts directory), or a list of 2-16 tasks with the same "
        "labels: an ensemble, each input run under every prompt in the same mixed-task batch.",
    )
    inputs: list[InputValue] = Field(
        min_length=1,
        description="Inputs: a string fills the template's single field; an object gives the fields by name.",
    )
    combine: Literal["mean", "vote"] = Field(
        "mean", description="Ensembles: average the probabilities, or majority vote (ties: mean probability)."
    )


class ClassifyResult(BaseModel):
    label: str
    probabilities: dict[str, float]


class ClassifyResponse(BaseModel):
    task: str | list[str]
    results: list[ClassifyResult]


class GenerateBody(BaseModel):
    model_config = ConfigDict(extra="forbid")
    task: str = Field(min_length=1)
    input: InputValue
    max_new_tokens: int = Field(32, ge=1)
    temperature: float = Field(0.0, ge=0.0, le=10.0, allow_inf_nan=False, description="0 = greedy (the default).")
    top_p: float = Field(1.0, gt=0.0, le=1.0, allow_inf_nan=False)
    stop: str | list[str] | None = Field(None, description="Stop strings (cut from the output).")
    seed: int | None = Field(
        None, ge=-(2**63), le=2**64 - 1, description="Seed of this request's sampler (sampling only)."
    )
    stream: bool = Field(False, description="Send server-sent events: deltas, then the final result, then [DONE].")


class Usage(BaseModel):
    input_tokens: int
    output_tokens: int


class GenerateResponse(BaseModel):
    task: str
    output: str
    finish_reason: Literal["stop", "length"]
    usage: Usage


class CompletionBody(BaseModel):
    """OpenAI's legacy completions request; `model` is the task name. Fields this server does not use are ignored."""

    model_config = ConfigDict(extra="ignore")
    model: str = Field(min_length=1)
    prompt: str | list[str]
    max_tokens: int | None = Field(16, ge=1)
    temperature: float | None = Field(1.0, ge=0.0, le=10.0, allow_inf_nan=False)
    top_p: float | None = Field(1.0, gt=0.0, le=1.0, allow_inf_nan=False)
    n: int | None = Field(1, ge=1)
    stream: bool | None = False
    stop: str | list[str] | None = None
    seed: int | None = Field(
        None, ge=-(2**63), le=2**64 - 1, description="Seed of this request's sampler (sampling only)."
    )


def check_kind(entry: TaskEntry, kind: str, param: str, *, family: str = "causal") -> TaskEntry:
    """400 unless `entry` is a `kind` task the model can run (an encoder cannot generate)."""
    if entry.kind != kind:
        other = "/v1/classify" if kind == "generate" else "/v1/generate"
        raise BadRequest(f"task {entry.name!r} is a {entry.kind} task: use {other}", param=param)
    if kind == "generate" and family == "encoder":
        raise BadRequest("this server's model is an encoder: it cannot generate", param=param)
    return entry


def encode_inputs(registry: Registry, entry: TaskEntry, values: Sequence[Any], param: str, *,
                  single: bool = False) -> list[list[int]]:  # fmt: skip
    """Token ids of each input (`param.i` names input i; `param` alone when `single`): 422 / 413 per Registry.encode."""
    return [registry.encode(entry, x, param if single else f"{param}.{i}") for i, x in enumerate(values)]


def gen_params(
    entry: TaskEntry,
    n_input: int,
    max_new: int,
    temperature: float,
    top_p: float,
    stop: str | list[str] | None,
    seed: int | None,
    param: str,
    *,
    max_new_tokens: int,
    position_limit: int | None,
) -> GenParams:
    """A generation request's settings, checked: 422 above the server's --max-new-tokens or for bad stop strings,
    413 when prompt + input + new tokens exceed the model's positions."""
    if max_new > max_new_tokens:
        raise Unprocessable(f"{param}: at most {max_new_tokens} (the server's --max-new-tokens)", param=param)
    if position_limit is not None and entry.prefix_len + n_input + max_new > position_limit:
        raise TooLarge(
            f"prompt ({entry.prefix_len}) + input ({n_input}) + {param} ({max_new}) tokens exceed the model's "
            f"{position_limit} positions",
            param=param,
        )
    stops = [stop] if isinstance(stop, str) else list(stop or [])
    if any(not s or len(s) > 1000 for s in stops) or len(stops) > 16:
        raise Unprocessable("stop: up to 16 non-empty strings of at most 1000 characters", param="stop")
    for s in stops:
        check_text(s, "stop")
    try:
        return GenParams(max_new, temperature, top_p, tuple(stops), seed)
    except ValueError as e:
        name = str(e).split(" ")[0]
        raise Unprocessable(str(e), param=param if name == "max_new_tokens" else name) from None


# ---- collate -------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Item:
    """One row to run: the task it belongs to (any hashable key) and its encoded input ids."""

    task: Hashable
    input_ids: list[int]


def collate(items: Sequence[Item], *, pad_id: int, left: bool) -> tuple[Batch, torch.Tensor, list[Hashable]]:
    """Pad the rows of a mixed-task batch (pure: no model call).

    Returns the Batch (left-padded for decoder-only models, right-padded otherwise), `rows` (N,) the index of each
    row's task in `tasks`, and `tasks`: the distinct task keys in first-seen order. The caller stacks one Prefix per
    entry of `tasks` (`Prefix.stack`), so `rows` indexes that stacked prefix.
    """
    if not items:
        raise ValueError("collate: no items")
    tasks: list[Hashable] = []
    index: dict[Hashable, int] = {}
    rows = []
    for it in items:
        if it.task not in index:
            index[it.task] = len(tasks)
            tasks.append(it.task)
        rows.append(index[it.task])
    seqs = [list(it.input_ids) for it in items]
    ids, mask = (pad_left if left else pad_right)(seqs, pad_id)
    return Batch(ids, mask), torch.tensor(rows, dtype=torch.long), tasks


def unbatch(values: Sequence[Any], sizes: Sequence[int]) -> list[list[Any]]:
    """Split per-row results back into per-request lists (`sizes[r]` rows for request r, in order)."""
    if sum(sizes) != len(values):
        raise ValueError(f"unbatch: {len(values)} values for requests of {sum(sizes)} rows")
    out, at = [], 0
    for n in sizes:
        out.append(list(values[at : at + n]))
        at += n
    return out


def stack_prefixes(parts: Sequence[Prefix]) -> Prefix:
    """One Prefix for the distinct tasks of a batch; a single task keeps its own (G=1: K/V broadcast, no copy)."""
    return parts[0] if len(parts) == 1 else Prefix.stack(list(parts))


def select(batch: Batch, idx: torch.Tensor) -> Batch:
    return Batch(batch.ids[idx], batch.mask[idx])


def stack_key(pm: PromptedModel, entry: TaskEntry) -> tuple[str, int]:
    """Rows whose prefixes can share one forward pass. Decoder-only: all of them. Encoders: a deep prompt's
    per-layer slots only stack with deep prompts of its length, and never with plain prompts."""
    if pm.family == "causal" or not entry.ckpt.is_deep:
        return ("plain", 0)
    return ("deep", entry.ckpt.num_tokens)


RouteCounter = Callable[[TaskEntry, torch.Tensor], None]  # (task, (n,) the route each of its rows took)


def collate_rows(
    registry: Registry, rows: Sequence[tuple[TaskEntry, list[int]]], *, kv: bool = True,
    routes: RouteCounter | None = None,
) -> tuple[Batch, torch.Tensor, Prefix]:  # fmt: skip
    """The Batch (on the model's device), each row's prompt index and the stacked Prefix of their tasks (rows of
    tasks sharing a prompt share its prefix, cached in the registry's LRU unless kv=False). Input-dependent tasks
    (softprompt.dynamic.resolve): a routed task's K routes join the stack and each of its rows indexes the route its
    router picks (told to `routes`); a conditioned task adds one entry per row."""
    pm = registry.pm
    by_key = {e.prefix_key: e for e, _ in rows}
    batch, prow, keys = collate([Item(e.prefix_key, ids) for e, ids in rows], pad_id=pm.pad_id,
                                left=pm.family == "causal")  # fmt: skip
    entries = [by_key[k] for k in keys]  # type: ignore[index]
    statics = [registry.prefix(e, kv=kv) for e in entries]
    dev = registry.backbone.device
    batch, prow = batch.to(dev), prow.to(dev)
    if not any(e.prompt.per_row for e in entries):
        return batch, prow, stack_prefixes(statics)
    ms = [methods.of(e.ckpt) for e in entries]
    rp = resolve(pm, ms, [e.ckpt for e in entries], statics, prow, batch.ids, batch.mask)
    assert rp.rows is not None and rp.routes is not None
    if routes is not None:
        for j, e in enumerate(entries):
            if hasattr(ms[j], "num_routes"):
                routes(e, rp.routes[prow == j])
    return batch, rp.rows, rp.prefix


# ---- predict -------------------------------------------------------------------------------------------
@torch.no_grad()
def predict(
    pm: PromptedModel, prefix: Prefix, prow: torch.Tensor, batch: Batch, entries: Sequence[TaskEntry]
) -> list[torch.Tensor]:
    """Row i's class scores against its own task's verbalizer, or by its own task's head (PromptedModel.row_scores:
    one forward pass where possible, each exactly label_scores' score for that task alone)."""
    return pm.row_scores(prefix, prow, batch, [e.label_ids for e in entries], [e.head for e in entries])


# ---- unbatch -------------------------------------------------------------------------------------------
def to_results(entries: Sequence[TaskEntry], scores: Sequence[torch.Tensor]) -> list[dict[str, Any]]:
    """Per row: {"label", "probabilities"} (its task's labels in order); non-finite scores are an error."""
    out = []
    for e, s in zip(entries, scores, strict=True):
        p = s.float().softmax(-1).cpu()
        if not torch.isfinite(p).all():
            raise FloatingPointError(f"task {e.name!r}: the model gave non-finite scores")
        labels = e.labels or []
        out.append({"label": labels[int(p.argmax())], "probabilities": dict(zip(labels, map(float, p), strict=True))})
    return out


def classify_rows(
    registry: Registry, rows: Sequence[tuple[TaskEntry, list[int]]], *, max_batch_size: int, kv: bool = True,
    routes: RouteCounter | None = None,
) -> list[dict[str, Any]]:  # fmt: skip
    """collate -> predict -> to_results for rows of any tasks, in forward passes of at most max_batch_size rows
    (one group of passes, unless an encoder serves deep and plain prompts)."""
    pm = registry.pm
    groups: dict[tuple[str, int], list[int]] = {}
    for i, (e, _) in enumerate(rows):
        groups.setdefault(stack_key(pm, e), []).append(i)
    out: list[dict[str, Any]] = [{} for _ in rows]
    for idx in groups.values():
        for at in range(0, len(idx), max_batch_size):
            part = idx[at : at + max_batch_size]
            chunk = [rows[i] for i in part]
            batch, prow, prefix = collate_rows(registry, chunk, kv=kv, routes=routes)
            entries = [e for e, _ in chunk]
            for i, res in zip(part, to_results(entries, predict(pm, prefix, prow, batch, entries)), strict=True):
                out[i] = res
    return out


# ---- encode response -----------------------------------------------------------------------------------
def classify_response(task: str | list[str], results: list[dict[str, Any]]) -> dict[str, Any]:
    return {"task": task, "results": results}


def ensemble_results(labels: list[str], per_task: Sequence[list[dict[str, Any]]], combine: str) -> list[dict[str, Any]]:
    """Each input's members' probabilities (per_task[k][i]: member k, input i) combined (mean or vote)."""
    n = len(per_task[0]) if per_task else 0
    p = torch.tensor([[[r[i]["probabilities"][lab] for lab in labels] for r in per_task] for i in range(n)])
    combined = combine_probs(p, combine)  # (N, K, L) -> (N, L)
    return [
        {"label": labels[int(row.argmax())], "probabilities": dict(zip(labels, (row / row.sum()).tolist()))}
        for row in combined
    ]


def usage(res: dict[str, Any]) -> dict[str, int]:
    return {"input_tokens": res["input_tokens"], "output_tokens": res["output_tokens"]}


def generate_response(task: str, res: dict[str, Any]) -> dict[str, Any]:
    """/v1/generate's JSON from the scheduler's result {"text", "finish_reason", "input_tokens", "output_tokens"}."""
    return {"task": task, "output": res["text"], "finish_reason": res["finish_reason"], "usage": usage(res)}


def generate_event(task: str, ev: dict[str, Any]) -> dict[str, Any]:
    """One server-sent event of /v1/generate: a delta, or the final one with the whole output."""
    if not ev.get("done"):
        return {"task": task, "delta": ev.get("delta", "")}
    return {"task": task, "delta": "", "output": ev["text"], "finish_reason": ev["finish_reason"], "usage": usage(ev)}


def openai_usage(n_in: int, n_out: int) -> dict[str, int]:
    return {"prompt_tokens": n_in, "completion_tokens": n_out, "total_tokens": n_in + n_out}


def completion(
    cid: str, created: int, model: str, choices: list[dict[str, Any]], usage: dict[str, int] | None = None
) -> dict[str, Any]:
    """An OpenAI text_completion object (or one streamed chunk of one, without usage)."""
    out = {"id": cid, "object": "text_completion", "created": created, "model": model, "choices": choices}
    if usage is not None:
        out["usage"] = usage
    return out


def choice(text: str, finish_reason: str | None, index: int = 0) -> dict[str, Any]:
    return {"text": text, "index": index, "logprobs": None, "finish_reason": finish_reason}


def classify_completion(cid: str, created: int, model: str, ids: list[list[int]], results: list[dict[str, Any]]
                        ) -> dict[str, Any]:  # fmt: skip
    """A classification task completes with its predicted label, one choice per prompt."""
    choices = [choice(r["label"], "stop", i) for i, r in enumerate(results)]
    return completion(cid, created, model, choices, openai_usage(sum(map(len, ids)), len(ids)))


def generate_completion(cid: str, created: int, model: str, results: list[dict[str, Any]]) -> dict[str, Any]:
    choices = [choice(r["text"], r["finish_reason"], i) for i, r in enumerate(results)]
    n_in, n_out = sum(r["input_tokens"] for r in results), sum(r["output_tokens"] for r in results)
    return completion(cid, created, model, choices, openai_usage(n_in, n_out))


def completion_chunk(cid: str, created: int, model: str, ev: dict[str, Any]) -> dict[str, Any]:
    """One streamed chunk: a delta, or the final one with finish_reason and usage."""
    if not ev.get("done"):
        return completion(cid, created, model, [choice(ev.get("delta", ""), None)])
    return completion(cid, created, model, [choice("", ev["finish_reason"])],
                      openai_usage(ev["input_tokens"], ev["output_tokens"]))  # fmt: skip
