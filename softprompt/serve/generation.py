"""Iteration-level batched generation for decoder-only models, each row behind its own task's soft prompt.

A DecodeBatch holds the rows being decoded: per-layer keys/values (N, H, S, dh) in a DynamicCache, the attention
mask (N, S) and each row's next position id. New requests are prefilled (PromptedModel.run_decoder: their prompt
K/V gathered per row from the per-task caches, then their input run once) and merged in between decoding steps
(PromptedModel.decode_step): both caches are left-padded to a common length (softprompt.prefix.left_pad), masked
slots never attend. Finished rows leave (their rows are dropped and all-padding columns trimmed). Masks and
positions are the forward path's own, so a row's computation equals the one it gets alone; greedy decoding is
token-identical to PromptedModel.generate / `softprompt generate`.

Sampling is per row: temperature, top-p and a torch.Generator seeded per request. Stop strings end a row and are
cut from its text. Encoder-decoder models are not batched at the iteration level: `seq2seq_generate` runs one
request at a time through PromptedModel.generate.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
from transformers import DynamicCache

from softprompt.prefix import left_pad
from softprompt.prompted import Batch, Prefix, PromptedModel

MAX_TEMPERATURE = 10.0
SEED_MIN, SEED_MAX = -(2**63), 2**64 - 1  # what torch.Generator.manual_seed takes


@dataclass(frozen=True)
class GenParams:
    max_new_tokens: int = 32
    temperature: float = 0.0  # 0: greedy
    top_p: float = 1.0
    stop: tuple[str, ...] = ()
    seed: int | None = None

    def __post_init__(self) -> None:
        """Every value finite and in range (the HTTP layer checks them first; this guards every other caller)."""
        if not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be an integer >= 1, got {self.max_new_tokens!r}")
        if not (math.isfinite(self.temperature) and 0 <= self.temperature <= MAX_TEMPERATURE):
            raise ValueError(f"temperature must be in [0, {MAX_TEMPERATURE:g}], got {self.temperature!r}")
        if not (math.isfinite(self.top_p) and 0 < self.top_p <= 1):
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p!r}")
        if self.seed is not None and not (SEED_MIN <= self.seed <= SEED_MAX):
            raise ValueError(f"seed must be in [{SEED_MIN}, {SEED_MAX}], got {self.seed!r}")

    @property
    def greedy(self) -> bool:
        return self.temperature <= 0


@dataclass(eq=False)
class GenRow:
    """Decoding state of one request (touched by the model thread only)."""

    owner: Any  # the scheduler's request
    params: GenParams
    eos: frozenset[int]
    pad_id: int
    tokens: list[int] = field(default_factory=list)
    text: str = ""  # decoded so far (stop strings cut)
    sent: int = 0  # characters of the visible text already streamed
    finish: str | None = None  # stop | length
    last: int = -1
    gen: torch.Generator | None = None

    def __post_init__(self) -> None:
        if not self.params.greedy:
            seed = self.params.seed if self.params.seed is not None else int(torch.randint(0, 2**62, (1,)))
            self.gen = torch.Generator().manual_seed(seed)

    def choose(self, logits: torch.Tensor) -> int:
        """Next token from this row's logits (V,): argmax when greedy, else temperature / top-p sampling."""
        p = self.params
        if p.greedy:
            return int(logits.argmax())
        x = logits.float().cpu()
        probs = ((x - x.max()) / p.temperature).softmax(-1)  # the max at 0: no overflow for any temperature > 0
        if not bool(torch.isfinite(probs).all()):
            raise FloatingPointError("sampling: the model gave non-finite logits")
        if p.top_p < 1.0:
            sp, si = probs.sort(descending=True)
            keep = (sp.cumsum(0) - sp) < p.top_p  # the smallest set whose mass reaches top_p (first always kept)
            sp = sp * keep
            return int(si[torch.multinomial(sp, 1, generator=self.gen)])
        return int(torch.multinomial(probs, 1, generator=self.gen))

    def advance(self, token: int, decode: Any) -> str | None:
        """Take `token`; returns the newly visible text (for streaming) or None. Sets `finish` when done."""
        if token in self.eos:
            self.finish = "stop"
            return self._flush()
        self.tokens.append(token)
        self.last = token
        self.text = decode([t for t in self.tokens if t != self.pad_id])
        if self.params.stop:
            cut = min((i for i in (self.text.find(s) for s in self.params.stop) if i >= 0), default=-1)
            if cut >= 0:
                self.text = self.text[:cut]
                self.finish = "stop"
                return self._flush()
        if len(self.tokens) >= self.params.max_new_tokens:
            self.finish = "length"
            return self._flush()
        visible = self.text.lstrip()
        hold = max((len(s) for s in self.params.stop), default=1) - 1
        end = len(visible) - hold
        while end > self.sent and visible[end - 1] == "\ufffd":  # an incomplete multi-byte character
            end -= 1
        if end <= self.sent:
            return None
        delta, self.sent = visible[self.sent : end], end
        return delta

    def _flush(self) -> str | None:
        final = self.output
        delta = final[self.sent :] if len(final) > self.sent else ""
        self.sent = max(self.sent, len(final))
        return delta or None

    @property
    def output(self) -> str:
        return self.text.strip()  # what Predictor.generate returns


class DecodeBatch:
    """The rows being decoded together: a DynamicCache (N, H, S, dh) per layer, mask (N, S), next positions (N,)."""

    def __init__(self, cache: DynamicCache, mask: torch.Tensor, pos: torch.Tensor, rows: list[GenRow]) -> None:
        self.cache, self.mask, self.pos, self.rows = cache, mask, pos, rows

    @property
    def n(self) -> int:
        return len(self.rows)

    def layers(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        return [(layer.keys, layer.values) for layer in self.cache.layers]  # type: ignore[union-attr,misc]

    @staticmethod
    @torch.no_grad()
    def prefill(
        pm: PromptedModel, prefix: Prefix, prows: torch.Tensor, batch: Batch, rows: list[GenRow]
    ) -> tuple[DecodeBatch, torch.Tensor]:
        """Run new rows (left-padded `batch`, row i behind prompt `prows[i]` of `prefix`) through
        PromptedModel.run_decoder and return their decode state and next-token logits (N, V). With prompt K/V
        (prefix.kv) only the inputs go through the model; without, the prompt is recomputed (the PEFT way)."""
        out = pm.run_decoder(prefix, prows, batch.ids, batch.mask, keep_cache=True)
        assert out.cache is not None
        return DecodeBatch(out.cache, out.mask, out.next_pos, rows), pm.lm_logits(out.hidden[:, -1])

    @torch.no_grad()
    def step(self, pm: PromptedModel) -> torch.Tensor:
        """Feed every row's last token (PromptedModel.decode_step); returns next-token logits (N, V)."""
        tokens = torch.tensor([r.last for r in self.rows], dtype=torch.long, device=self.mask.device)
        self.mask = pm.step_mask(self.mask)
        hidden = pm.decode_step(tokens, self.cache, self.mask, self.pos)  # the cache grows by one column
        self.pos = self.pos + 1
        return pm.lm_logits(hidden)

    def keep(self, idx: list[int]) -> DecodeBatch | None:
        """Only rows `idx` (in order); leading columns no row uses any more are trimmed."""
        if not idx:
            return None
        if len(idx) == self.n:
            return self
        sel = torch.tensor(idx, device=self.mask.device)
        mask = self.mask[sel]
        used = mask.any(0).nonzero()
        first = int(used[0]) if len(used) else 0
        layers = [(k[sel][:, :, first:], v[sel][:, :, first:]) for k, v in self.layers()]
        return DecodeBatch(
            DynamicCache(ddp_cache_data=layers), mask[:, first:], self.pos[sel], [self.rows[i] for i in idx]
        )

    @staticmethod
    def merge(parts: Iterable[DecodeBatch | None]) -> DecodeBatch | None:
        """One batch from several: caches and masks left-padded to the longest, rows concatenated."""
        items = [p for p in parts if p is not None and p.n]
        if not items:
            return None
        if len(items) == 1:
            return items[0]
        width = max(p.mask.shape[1] for p in items)
        per = [p.layers() for p in items]
        layers = [
            (
                torch.cat([left_pad(ls[i][0], width, 2) for ls in per]),
                torch.cat([left_pad(ls[i][1], width, 2) for ls in per]),
            )
            for i in range(len(per[0]))
        ]
        mask = torch.cat([left_pad(p.mask, width, 1) for p in items])
        return DecodeBatch(
            DynamicCache(ddp_cache_data=layers),
            mask,
            torch.cat([p.pos for p in items]),
            [r for p in items for r in p.rows],
        )


@torch.no_grad()
def seq2seq_generate(pm: PromptedModel, prefix: Prefix, batch: Batch, row: GenRow, decode: Any) -> None:
    """One encoder-decoder request through PromptedModel.generate (whole generation at once); fills `row`."""
    p = row.params
    kw: dict[str, Any] = {"max_new_tokens": p.max_new_tokens, "do_sample": not p.greedy}
    if not p.greedy:
        kw.update(temperature=p.temperature, top_p=p.top_p)
        torch.manual_seed(p.seed if p.seed is not None else int(torch.randint(0, 2**62, (1,))))
    seq = pm.generate(prefix, None, batch, **kw)[0].tolist()
    if seq and seq[0] == pm.model.config.decoder_start_token_id:
        seq = seq[1:]
    for t in seq:
        row.advance(int(t), decode)
        if row.finish:
            break
    if row.finish is None:
        row.finish = "length"
