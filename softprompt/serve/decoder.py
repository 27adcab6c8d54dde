"""The decode loop of the server: one iteration of iteration-level batched generation, run in the model thread.

An iteration (`Decoder.step`): rows whose client left or whose deadline passed stop decoding; every other row of
the running DecodeBatch gets its next token (one PromptedModel.decode_step for all); the new requests are prefilled
together (softprompt.serve.pipeline.collate_rows -> DecodeBatch.prefill) and merged in; finished rows leave. It
returns the events for the scheduler to deliver: {"delta": text} while decoding, then the final result
{"done": True, "text", "finish_reason", "input_tokens", "output_tokens", "tokens"}, or an exception.

A row whose sampling or decoding fails ends alone with its error (its batch-mates go on); a prefill that fails is
retried request by request, so one bad request never fails the others. Encoder-decoder models generate one
request at a time through PromptedModel.generate (`seq2seq_generate`).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

import torch

from softprompt.serve.errors import Timeout
from softprompt.serve.generation import DecodeBatch, GenRow, seq2seq_generate
from softprompt.serve.limits import RateLimitedLog
from softprompt.serve.pipeline import Item, collate, collate_rows
from softprompt.serve.registry import Registry

log = logging.getLogger("softprompt.serve")
_notes = RateLimitedLog(log)
Events = list[tuple[Any, Any]]  # (the scheduler's request, an event dict or an exception)
Record = Callable[[str, int, int, float], None]  # kind, rows, tasks, perf_counter at the start


def eos_ids(registry: Registry) -> frozenset[int]:
    """Tokens that end a generation: the model's generation config's EOS ids and the tokenizer's."""
    gc = getattr(registry.backbone.model, "generation_config", None)
    eos = gc.eos_token_id if gc is not None else None
    ids = set(eos if isinstance(eos, list) else [eos] if eos is not None else [])
    if registry.backbone.tokenizer.eos_token_id is not None:
        ids.add(int(registry.backbone.tokenizer.eos_token_id))
    return frozenset(int(e) for e in ids)


def final_event(row: GenRow) -> dict[str, Any]:
    """The last event of a generation (the scheduler's result, once "done" is dropped)."""
    return {
        "done": True,
        "text": row.output,
        "finish_reason": row.finish,
        "input_tokens": len(row.owner.inputs[0]),
        "output_tokens": len(row.tokens),
        "tokens": list(row.tokens),
    }


class Decoder:
    """The rows being decoded (`active`, a DecodeBatch) and the iteration that advances them."""

    def __init__(self, registry: Registry, *, kv_cache: bool, timeout_s: float, record: Record) -> None:
        self.registry, self.pm = registry, registry.pm
        self.kv_cache, self.timeout_s, self.record = kv_cache, timeout_s, record
        self.eos = eos_ids(registry)
        self.active: DecodeBatch | None = None
        self.active_task: int | None = None  # per-task mode: the task of the running batch

    @property
    def n(self) -> int:
        return self.active.n if self.active is not None else 0

    def owners(self) -> list[Any]:
        return [r.owner for r in self.active.rows] if self.active is not None else []

    def reset(self) -> None:
        self.active, self.active_task = None, None

    def decode_text(self, ids: list[int]) -> str:
        with self.registry.tok_lock:
            return str(self.pm.tok.decode(ids, skip_special_tokens=True))

    def new_row(self, req: Any) -> GenRow:
        assert req.params is not None
        return GenRow(req, req.params, self.eos, self.pm.pad_id)

    def step(self, new: list[Any]) -> Events:
        """One iteration with `new` requests joining; the events to deliver."""
        if self.pm.family != "causal":
            return self._seq2seq(new)
        events: Events = []
        state = self.active
        if state is not None:  # rows whose client left or whose deadline passed stop decoding
            now = time.monotonic()
            for r in state.rows:
                if now >= r.owner.deadline and not r.owner.cancelled:
                    events.append((r.owner, Timeout(f"request timed out after {self.timeout_s:g} s")))
                    r.owner.cancelled = True
            state = state.keep([i for i, r in enumerate(state.rows) if not r.owner.cancelled])
        if state is not None:
            t0 = time.perf_counter()
            try:
                logits = state.step(self.pm)
            except Exception as e:  # the forward pass of the whole batch failed: every row ends with the error
                _notes("step", logging.ERROR, "decoding step of %d rows failed: %s", state.n, e, exc_info=e)
                events.extend((r.owner, e) for r in state.rows)
                state = None
            if state is not None:
                self._choose_all(state.rows, logits, events)
                self.record("decode", state.n, len({r.owner.entry.uid for r in state.rows}), t0)
        joined = self._prefill(new, events) if new else None
        state = DecodeBatch.merge([state, joined])
        if state is not None:
            state = state.keep([i for i, r in enumerate(state.rows) if r.finish is None])
        self.active = state
        if state is None:
            self.active_task = None
        return events

    def _seq2seq(self, new: list[Any]) -> Events:
        events: Events = []
        for req in new:
            t0 = time.perf_counter()
            try:
                row = self.new_row(req)
                prefix = self.registry.prefix(req.entry, kv=self.kv_cache)
                batch, _, _ = collate([Item(0, req.inputs[0])], pad_id=self.pm.pad_id, left=False)
                seq2seq_generate(self.pm, prefix, batch.to(self.registry.backbone.device), row, self.decode_text)
                events.append((req, {"delta": row.output} if row.output else {}))
                events.append((req, final_event(row)))
            except Exception as e:
                events.append((req, e))
            self.record("generate", 1, 1, t0)
        return [(r, ev) for r, ev in events if ev]

    def _advance(self, row: GenRow, token: int, events: Events) -> None:
        delta = row.advance(token, self.decode_text)
        if delta:
            events.append((row.owner, {"delta": delta}))
        if row.finish:
            events.append((row.owner, final_event(row)))

    def _choose_all(self, rows: list[GenRow], logits: torch.Tensor, events: Events) -> None:
        """Each row's next token; a row whose sampling or decoding fails ends alone with its error (finish
        "error": it leaves the batch), its batch-mates go on."""
        for i, row in enumerate(rows):
            try:
                self._advance(row, row.choose(logits[i]), events)
            except Exception as e:
                row.finish = "error"
                events.append((row.owner, e))

    def _prefill(self, reqs: list[Any], events: Events) -> DecodeBatch | None:
        t0 = time.perf_counter()
        ok: list[Any] = []
        rows: list[GenRow] = []
        for r in reqs:  # a row that cannot even be set up (e.g. its sampler) fails alone
            try:
                rows.append(self.new_row(r))
                ok.append(r)
            except Exception as e:
                events.append((r, e))
        reqs = ok
        if not reqs:
            return None
        try:
            batch, prow, prefix = collate_rows(self.registry, [(r.entry, r.inputs[0]) for r in reqs], kv=self.kv_cache)
            state, logits = DecodeBatch.prefill(self.pm, prefix, prow, batch, rows)
        except Exception as e:
            if len(reqs) == 1:
                events.append((reqs[0], e))
                return None
            _notes(
                "retry", logging.WARNING, "prefill of %d requests failed (%s); retrying them one by one", len(reqs), e
            )
            return DecodeBatch.merge([self._prefill([r], events) for r in reqs])
        self.record("prefill", len(reqs), int(prefix.mask.shape[0]), t0)
        self._choose_all(rows, logits, events)
        return state
