"""The one forward path: a frozen backbone run with soft prompts in front of its inputs.

Everything that prepends a prompt, extends a mask, sets positions or scores a verbalizer lives here;
training, evaluation, generation and serving all call it.

Sequence layout (per row):  [prefix tokens][prompt][input tokens]
  prefix tokens: the BOS/CLS token when the tokenizer adds one and --position auto (the prompt follows it),
  nothing otherwise.  "Prefix" below means prefix tokens + prompt: the input-independent part of the row.

Decoder-only models (shared-prefix fast path): under causal attention the prefix's keys/values at every
layer do not depend on the input, so each distinct prefix is run once (batch 1), its per-layer K/V kept, and
broadcast to every row (`expand`, no copy). Rows are left-padded, so position ids are
`prefix_len + cumsum(mask) - 1`, which equals what each row would get alone. Gradients reach the prompt
through the single shared prefix computation. Several prefixes (mixed-task batches) are left-padded to one
length with masked slots and gathered per row.

Late prompts (softprompt.late): K/V prefixes whose slots are keys from their layer up (Prefix.starts, masked below it
by softprompt.layers); a training step may enter at that layer with cached states (Batch.start).

Encoder and encoder-decoder models (and decoder-only with naive=True): each row's prefix embeddings are
concatenated with its input embeddings ("concat path"), as PEFT does.

Only the hidden states that are scored go through the LM head: the verbalizer positions or the target
positions, never the whole vocabulary at every position; they go through the model's own output path, and the
input embeddings and sliding-window masks follow the model's own rules (softprompt.arch). Before a PromptedModel
is used, softprompt.arch's load-time guard checks this path against the model's own forward (once per backbone).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers import DynamicCache

from softprompt import arch
from softprompt.data import pad_left, pad_right
from softprompt.layers import forward_from, hidden_keys
from softprompt.models import Backbone
from softprompt.prefix import (
    Batch,
    LinearHead,
    PerPromptHeads,
    Prefix,
    SimilarityHead,
    VerbalizerHead,
    mean_target_logp,
    pack_rows,
    scores_by_head,
    word_table,
)

__all__ = ["Batch", "LinearHead", "PerPromptHeads", "Prefix", "PromptedModel", "SimilarityHead", "VerbalizerHead"]


@dataclass
class Prefilled:
    """Rows run through the decoder (PromptedModel.run_decoder): what scoring reads and what decoding continues."""

    hidden: torch.Tensor  # (N, T, d) final hidden states of the input tokens
    cache: DynamicCache | None  # every layer's keys/values of prefix + input (N, H, P+T, dh), when kept
    mask: torch.Tensor  # (N, P+T) 1 = a real key
    next_pos: torch.Tensor  # (N,) the position of each row's next token


class PromptedModel(nn.Module):
    """A frozen backbone plus the rules for putting soft prompts in front of its inputs."""

    def __init__(self, backbone: Backbone, *, position: str = "auto", naive: bool = False) -> None:
        super().__init__()
        self.backbone = backbone
        self.model = backbone.model
        self.tok = backbone.tokenizer
        self.family = backbone.family
        self.naive = naive or backbone.family != "causal"
        self.head: nn.Module | None = None  # deprecated fallback: pass head= (label_scores, row_scores, loss)
        self.pad_id = self._pad_id()
        # The leading special token (BOS/CLS) that the tokenizer adds, kept in front of the prompt.
        lead = self._leading_special_id()
        self.prefix_ids: list[int] = [lead] if (lead is not None and position == "auto") else []
        self._strip_lead = lead is not None and position == "auto"
        # The architecture's own steps around its layers (softprompt.arch), then the check that they hold.
        self.input_scale = arch.input_scale(self.model, self.family)
        self.output = arch.OutputPath(self.model) if self.family == "causal" else None
        self.windows = arch.windows_of(self.model.config) if self.family == "causal" else None
        if not backbone.skip_equivalence_check:
            arch.ensure_equivalent(self, position)

    # ----- text -> ids --------------------------------------------------------------------------------
    def _pad_id(self) -> int:
        for tid in (self.tok.pad_token_id, self.tok.eos_token_id, self.tok.unk_token_id, 0):
            if tid is not None:
                return int(tid)
        return 0

    def _leading_special_id(self) -> int | None:
        ids = self.tok("a", add_special_tokens=True)["input_ids"]
        plain = self.tok("a", add_special_tokens=False)["input_ids"]
        if len(ids) > len(plain) and ids[0] in set(self.tok.all_special_ids):
            return int(ids[0])
        return None

    def encode_input(self, text: str) -> list[int]:
        """Token ids of a filled template, without the leading BOS/CLS (it lives in the prefix)."""
        if self.family == "causal":
            ids = list(self.tok(text, add_special_tokens=False)["input_ids"])
            if not self._strip_lead and self._leading_special_id() is not None:
                ids = [self._leading_special_id()] + ids  # --position start: BOS stays with the input, after the prompt
            return ids
        ids = list(self.tok(text, add_special_tokens=True)["input_ids"])
        return ids[1:] if self._strip_lead else ids

    def verbalizer_ids(self, words: list[str], template: str) -> list[list[int]]:
        """Token ids of each label word as it follows the template (see `label_text`)."""
        out = []
        for w in words:
            text = label_text(w, template, self.family)
            if self.family == "seq2seq":
                ids = list(self.tok(text, add_special_tokens=False)["input_ids"])
                if ids and self.tok.eos_token_id is not None:
                    ids.append(int(self.tok.eos_token_id))
            else:
                ids = list(self.tok(text, add_special_tokens=False)["input_ids"])
            out.append(ids)
        return out

    def encode_target(self, text: str) -> list[int]:
        """Target ids for generation: the text then EOS (a leading space for causal LMs, as for labels)."""
        ids = list(self.tok(text, add_special_tokens=False)["input_ids"])
        if self.tok.eos_token_id is not None:
            ids.append(int(self.tok.eos_token_id))
        return ids

    def decode(self, ids: list[int]) -> str:
        """Text of generated or target ids, special tokens dropped, outer whitespace stripped."""
        text = self.tok.decode(ids, skip_special_tokens=True)
        return str(text).strip()

    # ----- collate (pure) -----------------------------------------------------------------------------
    def collate(
        self,
        inputs: list[list[int]],
        labels: list[int] | None = None,
        targets: list[list[int]] | None = None,
    ) -> Batch:
        """Pad a list of encoded inputs into a Batch (pure: no model call). With `targets` on a causal model,
        each row is input + target and target_pos says which hidden state predicts which target token."""
        lab = None if labels is None else torch.tensor(labels, dtype=torch.long)
        if targets is not None and self.family == "causal":
            seqs = [x + y for x, y in zip(inputs, targets)]
            ids, mask = pad_left(seqs, self.pad_id)
            T, M = ids.shape[1], max(len(y) for y in targets)
            tgt = torch.full((len(seqs), M), -100, dtype=torch.long)
            pos = torch.zeros((len(seqs), M), dtype=torch.long)
            for i, y in enumerate(targets):
                tgt[i, : len(y)] = torch.tensor(y)
                # left-padded: target j sits at T - len(y) + j, predicted by the state one before it
                pos[i, : len(y)] = torch.arange(T - len(y) - 1, T - 1)
            return Batch(ids, mask, lab, tgt, pos)
        ids, mask = (pad_left if self.family == "causal" else pad_right)(inputs, self.pad_id)
        padded_targets = None if targets is None else pad_right(targets, -100)[0]
        return Batch(ids, mask, lab, padded_targets)

    # ----- prefixes -----------------------------------------------------------------------------------
    def embedding_matrix(self) -> torch.Tensor:
        """The backbone's input embeddings (V, d) as its first layer sees them (times the input scale, if any)."""
        w = self.model.get_input_embeddings().weight
        assert isinstance(w, torch.Tensor)
        return w if self.input_scale == 1.0 else w * self.input_scale

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        """(..., d) what the model's own forward feeds its first layer for `ids` (softprompt.arch.input_scale)."""
        e = self.model.get_input_embeddings()(ids)
        return e if self.input_scale == 1.0 else e * self.input_scale

    def attention_mask(self, attn: torch.Tensor, q_len: int, dtype: torch.dtype) -> torch.Tensor | dict:
        """`attention_mask` for keys `attn` (N, K) whose last q_len columns are the queries: the 2-D mask, or 4-D masks
        built from positions where a sliding window could count pad slots (softprompt.arch.attention_mask)."""
        impl = str(self.model.config._attn_implementation)
        return arch.attention_mask(attn, q_len, self.windows, impl, dtype, self.backbone.architecture)

    def build_prefix(self, prompts: Sequence[torch.Tensor | None], *, kv: bool | None = None,
                     together: bool = False) -> Prefix:  # fmt: skip
        """Prefixes for G prompts (each (P_g, d) or None for no prompt), left-padded to one width.

        With kv (default: decoder-only and not naive) each prefix is run alone through the model once and its
        per-layer keys/values are kept; gradients flow back to prompts that require grad. together=True: prefixes
        of one length run as one batch instead (no padding: each as alone, up to float rounding; per-row prompts).
        """
        device = self.backbone.device
        dtype = self.embed(torch.zeros(1, 1, dtype=torch.long, device=device)).dtype
        lead = self.embed(torch.tensor([self.prefix_ids], dtype=torch.long, device=device))[0]  # (p0, d)
        seqs = [lead if p is None else torch.cat([lead, p.to(device, dtype)]) for p in prompts]
        lengths = torch.tensor([s.shape[0] for s in seqs], device=device)
        width = int(lengths.max()) if len(seqs) else 0
        d = lead.shape[-1]
        embeds = torch.zeros(len(seqs), width, d, device=device, dtype=dtype)
        mask = torch.zeros(len(seqs), width, dtype=torch.long, device=device)
        pool = torch.zeros_like(mask)
        rows = []
        for g, s in enumerate(seqs):
            n = s.shape[0]
            rows.append(F.pad(s, (0, 0, width - n, 0)))  # left pad
            mask[g, width - n :] = 1
            pool[g, width - n : width - n + len(self.prefix_ids)] = 1
        if rows:
            embeds = torch.stack(rows)
        prefix = Prefix(embeds, mask, pool, lengths)
        use_kv = (not self.naive) if kv is None else kv
        if use_kv and self.family == "causal" and width > 0:
            if together and len(seqs) > 1 and bool((lengths == width).all()):
                pos = torch.arange(width, device=device)[None].expand(len(seqs), -1)
                out = self.model.base_model(inputs_embeds=embeds, position_ids=pos, use_cache=True)  # (G, P, d) in
                prefix.kv = [(layer.keys, layer.values) for layer in out.cache.layers]  # (G, H, P, dh) each
            else:
                prefix.kv = self._prefix_kv(seqs, width)
        return prefix

    def _prefix_kv(self, seqs: list[torch.Tensor], width: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        per_prompt: list[list[tuple[torch.Tensor, torch.Tensor]] | None] = []
        for s in seqs:  # each alone: no padding inside a prefix computation
            n = s.shape[0]
            if n == 0:  # no lead token, no prompt (--position start, a task without a prompt): all padding
                per_prompt.append(None)
                continue
            pos = torch.arange(n, device=s.device)[None]
            out = self.model.base_model(inputs_embeds=s[None], position_ids=pos, use_cache=True)
            layers = [(layer.keys, layer.values) for layer in out.cache.layers]
            per_prompt.append([(F.pad(k, (0, 0, width - n, 0)), F.pad(v, (0, 0, width - n, 0))) for k, v in layers])
        some = next(p for p in per_prompt if p is not None)
        full = [p if p is not None else [(torch.zeros_like(k), torch.zeros_like(v)) for k, v in some]
                for p in per_prompt]  # fmt: skip
        if len(full) == 1:
            return full[0]
        return [(torch.cat([p[i][0] for p in full]), torch.cat([p[i][1] for p in full])) for i in range(len(some))]

    def build_deep_prefix(
        self, deep: Sequence[tuple[torch.Tensor, torch.Tensor]], prompt: torch.Tensor | None = None, gap: int = 0
    ) -> Prefix:
        """A one-prompt Prefix whose prompt is learned keys/values at every layer (deep prompt tuning: prefix tuning,
        P-tuning v2). deep[l] = (keys, values) of layer l, each (H_kv, P, dh), as the model's cache stores them
        (keys after any rotary embedding). Layout [lead token][prompt][P deep slots]: the lead token (and an optional
        input-embedding prompt) is run through the model as usual; the deep slots are appended to every layer's
        keys/values as they are, so gradients reach them directly. gap > 0: the input's positions start that many
        after the slots (a student that keeps its teacher's input positions). Decoder-only (shared-prefix path)."""
        if self.family != "causal":
            raise ValueError(f"build_deep_prefix: a {self.family} model takes deep prompts through softprompt.deep")
        base = self.build_prefix([prompt], kv=True)
        n_deep = int(deep[0][0].shape[1]) if deep else 0
        dtype = base.embeds.dtype
        if base.kv is None:  # nothing in front of the deep slots (no lead token, no prompt)
            kv = [(k[None].to(dtype), v[None].to(dtype)) for k, v in deep]
        else:
            kv = [
                (torch.cat([k0, k[None].to(k0.dtype)], 2), torch.cat([v0, v[None].to(v0.dtype)], 2))
                for (k0, v0), (k, v) in zip(base.kv, deep, strict=True)
            ]
        return Prefix(
            F.pad(base.embeds, (0, 0, 0, n_deep)),  # deep slots have no input embedding (zeros, never read)
            F.pad(base.mask, (0, n_deep), value=1),
            F.pad(base.pool, (0, n_deep)),
            base.lengths + n_deep,
            kv,
            deep=True,
            gap=torch.full_like(base.lengths, gap) if gap else None,
        )

    # ----- hidden states ------------------------------------------------------------------------------
    def _rows(self, prefix: Prefix, rows: torch.Tensor | None, n: int) -> torch.Tensor:
        if rows is None:
            if prefix.mask.shape[0] != 1:
                raise ValueError("rows is required when the prefix holds several prompts")
            return torch.zeros(n, dtype=torch.long, device=prefix.mask.device)
        return rows

    def run_decoder(
        self, prefix: Prefix, rows: torch.Tensor | None, ids: torch.Tensor, mask: torch.Tensor, *, keep_cache: bool,
        start: tuple[int, torch.Tensor] | None = None) -> Prefilled:  # fmt: skip
        """Left-padded rows `ids` (N, T) behind their prefixes through the decoder: THE causal forward. Prefix K/V
        (when built) are read from a cache, else the prefix embeddings are concatenated in front; positions are
        each row's own (prefix lengths + real tokens before it), masks per softprompt.arch; late slots are keys from
        their layer up (softprompt.layers). start (l, (N, T, d)): what enters layer l; only layers >= l run."""
        n, T = ids.shape
        rows = self._rows(prefix, rows, n)
        emb = self.embed(ids) if start is None else start[1]  # (N, T, d)
        attn = torch.cat([prefix.mask[rows], mask], 1)  # (N, P+T)
        base = self.model.base_model
        if (prefix.starts is not None or start is not None) and (prefix.kv is None or keep_cache):
            raise ValueError("a late prompt needs the K/V path, not a decode loop's cache (use PromptedModel.generate)")
        if prefix.kv is not None:
            shared = prefix.mask.shape[0] == 1
            layers = [
                (k.expand(n, -1, -1, -1), v.expand(n, -1, -1, -1))
                if shared
                else (k.index_select(0, rows), v.index_select(0, rows))
                for k, v in prefix.kv
            ]  # (N, H, P, dh): a view when one prompt serves the batch (index_select: ~5x faster than k[rows] on CPU)
            lead = prefix.lengths[rows] + prefix.gaps()[rows]  # (N,) the first input position (after any gap)
            pos = (lead[:, None] + mask.cumsum(-1) - 1).clamp(min=0)  # (N, T) as if alone
            am = self.attention_mask(attn, T, emb.dtype)
            kw = dict(attention_mask=am, position_ids=pos, cache=DynamicCache(ddp_cache_data=layers), use_cache=True)
            with hidden_keys(base, prefix.row_starts(rows)):  # late slots: (N, P) first layers
                out = base(inputs_embeds=emb, **kw) if start is None else forward_from(base, start[0], emb, **kw)
            h = out[0]
        else:
            if prefix.gap is not None and bool(prefix.gap.any()):
                raise ValueError("a prefix with a position gap needs the K/V path")
            x = torch.cat([prefix.embeds[rows].to(emb.dtype), emb], 1)  # (N, P+T, d)
            full_pos = (attn.cumsum(-1) - 1).clamp(min=0)
            am = self.attention_mask(attn, x.shape[1], emb.dtype)
            out = base(inputs_embeds=x, attention_mask=am, position_ids=full_pos, use_cache=keep_cache)
            h = out[0][:, prefix.width :]
        next_pos = prefix.lengths[rows] + prefix.gaps()[rows] + mask.sum(-1)  # (N,)
        return Prefilled(h, out.cache if keep_cache else None, attn, next_pos)

    def decode_step(
        self, tokens: torch.Tensor, cache: DynamicCache, mask: torch.Tensor, pos: torch.Tensor
    ) -> torch.Tensor:
        """One new token per row (N,) at positions `pos` (N,) after `cache`; `mask` (N, K) covers the cached keys and
        the new one. Returns the final hidden states (N, d); the cache grows by one column."""
        am = self.attention_mask(mask, 1, cache.layers[0].keys.dtype)  # type: ignore[union-attr]
        out = self.model.base_model(
            input_ids=tokens[:, None], attention_mask=am, position_ids=pos[:, None], cache=cache, use_cache=True
        )
        return out[0][:, -1]

    @staticmethod
    def step_mask(mask: torch.Tensor) -> torch.Tensor:
        """The mask (N, K+1) a decode_step takes: `mask` (N, K) of the cached keys, then the new token's column."""
        return F.pad(mask, (0, 1), value=1)

    def causal_hidden(
        self, prefix: Prefix, rows: torch.Tensor | None, ids: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor,
        start: tuple[int, torch.Tensor] | None = None) -> torch.Tensor:  # fmt: skip
        """Hidden states (N, K, d) at `positions` (N, K) of rows `ids` (N, T) behind the prefix (start: run_decoder)."""
        h = self.run_decoder(prefix, rows, ids, mask, keep_cache=False, start=start).hidden
        return torch.gather(h, 1, positions[..., None].expand(-1, -1, h.shape[-1]))  # (N, K, d)

    def encoder_hidden(
        self, prefix: Prefix, rows: torch.Tensor | None, ids: torch.Tensor, mask: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Encoder output (N, S, d), its attention mask (N, S) and pooling mask (N, S) for right-padded rows;
        each row is its prefix's real slots followed by its input tokens (exact positions, no inner padding)."""
        n = ids.shape[0]
        rows = self._rows(prefix, rows, n)
        emb = self.embed(ids)
        x, attn, pool = pack_rows(prefix, rows, emb, mask)
        if prefix.kv is not None and self.family == "encoder":  # a deep prompt (softprompt.deep): per-layer K/V
            layers = [(k[rows], v[rows]) for k, v in prefix.kv]  # (N, H, P, dh), handed over as the layers' cache
            slots = torch.ones(n, layers[0][0].shape[2], dtype=attn.dtype, device=attn.device)
            cache = DynamicCache(ddp_cache_data=layers)
            h = self.model(inputs_embeds=x, attention_mask=torch.cat([slots, attn], 1), cache=cache)[0]
            return h, attn, pool
        encoder = self.model.get_encoder() if self.family == "seq2seq" else self.model
        h = encoder(inputs_embeds=x, attention_mask=attn)[0]
        return h, attn, pool

    def pooled(self, prefix: Prefix, rows: torch.Tensor | None, batch: Batch) -> torch.Tensor:
        """What a classification head reads, (N, d): an encoder's output averaged over real tokens (CLS/SEP
        included, prompt slots excluded); a decoder's last hidden state at the last input token (the position
        whose logits verbalizer scoring reads)."""
        if self.family == "causal":
            n, T = batch.ids.shape
            last = torch.full((n, 1), T - 1, dtype=torch.long, device=batch.ids.device)  # rows are left-padded
            return self.causal_hidden(prefix, rows, batch.ids, batch.mask, last, batch.start)[:, 0]  # rows: run_decoder
        h, _, pool = self.encoder_hidden(prefix, rows, batch.ids, batch.mask)
        w = pool.to(h.dtype)[..., None]
        return (h * w).sum(1) / w.sum(1).clamp(min=1)

    # ----- scores and losses --------------------------------------------------------------------------
    def lm_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Logits (..., V), float32, of final hidden states (..., d) through the model's own output path."""
        if self.output is None:
            raise ValueError(f"{self.backbone.architecture}: only a causal LM scores hidden states with its LM head")
        return self.output(hidden)

    def next_token_logp(
        self, prefix: Prefix, rows: torch.Tensor | None, batch: Batch, *, every: bool = False
    ) -> torch.Tensor:
        """(B, V) log-probabilities of the token after each input (a decoder's answer position, the one scored
        position of one-token verbalizers); every=True: (B, T, V), after each of the input's positions (left-padded:
        the last column is the answer position; padded columns are the caller's to mask, batch.mask)."""
        B, T = batch.ids.shape
        dev = batch.ids.device
        pos = torch.arange(T, device=dev).expand(B, T) if every else torch.full((B, 1), T - 1, device=dev)
        h = self.causal_hidden(prefix, self._rows(prefix, rows, B), batch.ids, batch.mask, pos, batch.start)
        logp = self.lm_logits(h).log_softmax(-1)  # (B, T or 1, V)
        return logp if every else logp[:, 0]

    def label_scores(
        self,
        prefix: Prefix,
        rows: torch.Tensor | None,
        batch: Batch,
        label_ids: list[list[int]],
        head: nn.Module | None = None,
    ) -> torch.Tensor:
        """(B, L) class scores: mean log-likelihood of each verbalizer (lm head) or the head's logits (an encoder's
        head, or a decoder's --head linear; `head`, else self.head)."""
        head = head if head is not None else self.head
        if self.family == "encoder" or head is not None:
            if head is None:
                raise ValueError("an encoder backbone needs a head (--head linear or similarity)")
            pooled = self.pooled(prefix, rows, batch)
            if isinstance(head, PerPromptHeads):
                return head(pooled, rows).float()
            return head(pooled).float()
        B, L = batch.ids.shape[0], len(label_ids)
        tgt = word_table(label_ids, batch.ids.device)  # (L, m)
        if self.family == "seq2seq":
            return self._seq2seq_label_scores(prefix, rows, batch, tgt)
        rows_ = self._rows(prefix, rows, B)
        if tgt.shape[1] == 1:  # every verbalizer is one token: one row per example, one scored position
            return self.next_token_logp(prefix, rows_, batch)[:, tgt[:, 0]]  # (B, L)
        owners = torch.arange(B, device=batch.ids.device).repeat_interleave(L)  # row (i, l): input i, word l
        return self._word_scores(prefix, rows_, batch, owners, tgt.repeat(B, 1)).view(B, L)

    def row_scores(
        self,
        prefix: Prefix,
        rows: torch.Tensor | None,
        batch: Batch,
        label_ids: Sequence[list[list[int]]],
        heads: Sequence[nn.Module | None] | None = None,
    ) -> list[torch.Tensor]:
        """Row i's class scores against its own task's verbalizer `label_ids[i]`, or by its own head `heads[i]`
        (mixed-task batches: serving, multi-task training); each exactly label_scores' score for that task.

        Decoder rows with a head or one-token words share one pass (one scored position each); rows with
        multi-token words become one row per (input, word), every task together, in a second pass."""
        n = batch.ids.shape[0]
        rows = self._rows(prefix, rows, n)
        heads = list(heads) if heads is not None else [None] * n
        out: list[torch.Tensor | None] = [None] * n
        if self.family == "encoder":
            if any(h is None for h in heads):
                raise ValueError("an encoder backbone needs a head (--head linear or similarity)")
            return scores_by_head(self.pooled(prefix, rows, batch), heads)
        if self.family == "seq2seq":  # rows grouped by verbalizer, each group scored by label_scores
            groups: dict[tuple[tuple[int, ...], ...], list[int]] = {}
            for i in range(n):
                groups.setdefault(tuple(tuple(w) for w in label_ids[i]), []).append(i)
            for key, members in groups.items():
                idx = torch.tensor(members, device=batch.ids.device)
                sub = Batch(batch.ids[idx], batch.mask[idx])
                for i, sc in zip(members, self.label_scores(prefix, rows[idx], sub, [list(w) for w in key])):
                    out[i] = sc
            return [s for s in out if s is not None]
        dev, T = batch.ids.device, batch.ids.shape[1]
        single = [i for i in range(n) if heads[i] is not None or all(len(w) == 1 for w in label_ids[i])]
        multi = [i for i in range(n) if heads[i] is None and any(len(w) > 1 for w in label_ids[i])]
        if single:
            idx = torch.tensor(single, device=dev)
            pos = torch.full((len(single), 1), T - 1, dtype=torch.long, device=dev)
            h = self.causal_hidden(prefix, rows[idx], batch.ids[idx], batch.mask[idx], pos)[:, 0]  # (S, d)
            verb = [j for j, i in enumerate(single) if heads[i] is None]
            if verb:  # the vocabulary projection only for verbalizer rows
                logp = self.lm_logits(h[verb]).log_softmax(-1)  # (S', V)
                for k, j in enumerate(verb):
                    out[single[j]] = logp[k, torch.tensor([w[0] for w in label_ids[single[j]]], device=dev)]
            headed = [j for j, i in enumerate(single) if heads[i] is not None]
            for j, sc in zip(headed, scores_by_head(h[headed], [heads[single[j]] for j in headed]), strict=True):
                out[single[j]] = sc
        if multi:
            m = max(len(w) for i in multi for w in label_ids[i])
            owners = torch.tensor([i for i in multi for _ in label_ids[i]], device=dev)
            words = torch.tensor([list(w) + [-100] * (m - len(w)) for i in multi for w in label_ids[i]], device=dev)
            scores, at = self._word_scores(prefix, rows, batch, owners, words), 0  # (R,)
            for i in multi:
                out[i], at = scores[at : at + len(label_ids[i])], at + len(label_ids[i])
        return [s for s in out if s is not None]

    def _word_scores(
        self, prefix: Prefix, rows: torch.Tensor, batch: Batch, owners: torch.Tensor, words: torch.Tensor
    ) -> torch.Tensor:
        """(R,) mean log-likelihood of words[r] (R, m; -100-padded) continuing input row owners[r]: row r is
        input + word[:-1], all R rows in one pass; scored positions T-1 .. T+m-2."""
        T, m = batch.ids.shape[1], words.shape[1]
        cont = words[:, :-1].clamp(min=0)  # (R, m-1) fed after the input, right-padded (masked)
        ids = torch.cat([batch.ids[owners], cont], 1)  # (R, T+m-1)
        mask = torch.cat([batch.mask[owners], (words[:, :-1] != -100).long()], 1)
        pos = torch.arange(T - 1, T + m - 1, device=ids.device)[None].expand(len(ids), -1)
        logp = self.lm_logits(self.causal_hidden(prefix, rows[owners], ids, mask, pos)).log_softmax(-1)
        return mean_target_logp(logp, words)

    def _seq2seq_label_scores(
        self, prefix: Prefix, rows: torch.Tensor | None, batch: Batch, tgt: torch.Tensor
    ) -> torch.Tensor:
        B, L = batch.ids.shape[0], tgt.shape[0]
        h, attn, _ = self.encoder_hidden(prefix, rows, batch.ids, batch.mask)
        labels = tgt.repeat(B, 1)  # (B*L, m)
        logp = self._decoder_logp(h.repeat_interleave(L, 0), attn.repeat_interleave(L, 0), labels)
        return mean_target_logp(logp, labels).view(B, L)

    def _decoder_logp(self, enc: torch.Tensor, attn: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        dec_in = _decoder_inputs(self.model, labels)
        out = self.model(encoder_outputs=(enc,), attention_mask=attn, decoder_input_ids=dec_in, use_cache=False)
        return out.logits.float().log_softmax(-1)

    def target_logp(self, prefix: Prefix, rows: torch.Tensor | None, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-token log-probs (B, M) of the generation targets and their mask (B, M)."""
        assert batch.targets is not None
        valid = batch.targets != -100
        if self.family == "causal":
            assert batch.target_pos is not None
            h = self.causal_hidden(prefix, rows, batch.ids, batch.mask, batch.target_pos, batch.start)
            logp = self.lm_logits(h)
        elif self.family == "seq2seq":
            h, attn, _ = self.encoder_hidden(prefix, rows, batch.ids, batch.mask)
            logp = self._decoder_logp(h, attn, batch.targets)
        else:
            raise ValueError("text generation needs a causal or encoder-decoder model, not an encoder")
        logp = logp.log_softmax(-1) if self.family == "causal" else logp
        tok = logp.gather(-1, batch.targets.clamp(min=0)[..., None])[..., 0]
        return tok * valid, valid

    def loss(
        self, prefix: Prefix, batch: Batch, label_ids: list[list[int]] | None, head: nn.Module | None = None,
        rows: torch.Tensor | None = None,
    ) -> torch.Tensor:  # fmt: skip
        """Mean training loss: cross-entropy over class scores (`head` as in label_scores), or token-level CE on
        generation targets; `rows` (N,): each row's prompt in `prefix` (input-dependent prompts), None: prompt 0."""
        if batch.targets is not None:
            tok, valid = self.target_logp(prefix, rows, batch)
            return -tok.sum() / valid.sum().clamp(min=1)
        assert batch.labels is not None
        scores = self.label_scores(prefix, rows, batch, label_ids or [], head)
        return F.cross_entropy(scores, batch.labels)

    # ----- generation ---------------------------------------------------------------------------------
    @torch.no_grad()
    def generate(self, prefix: Prefix, rows: torch.Tensor | None, batch: Batch, **gen_kwargs) -> torch.Tensor:
        """New token ids (N, new) from transformers' generate with each row behind its prefix."""
        n, T = batch.ids.shape
        rows = self._rows(prefix, rows, n)
        gen_kwargs.setdefault("pad_token_id", self.pad_id)
        if self.family == "encoder":
            raise ValueError("generation needs a causal or encoder-decoder model, not an encoder")
        if self.family == "seq2seq":
            x, attn, _ = pack_rows(prefix, rows, self.embed(batch.ids), batch.mask)
            return self.model.generate(inputs_embeds=x, attention_mask=attn, **gen_kwargs)  # type: ignore[operator]
        if self.windows is not None and self._window_may_see_pads(prefix, rows, batch, gen_kwargs):
            return self._generate_rows(prefix, rows, batch, **gen_kwargs)
        attn = torch.cat([prefix.mask[rows], batch.mask], 1)
        if prefix.kv is not None and prefix.width > 0:
            # the cache holds the prefix; placeholder ids stand for it (generate only feeds the uncached tail).
            # generate copies each row's ids for its beams / returned sequences, but not a cache handed to it
            copies = max(int(gen_kwargs.get("num_beams") or 1), int(gen_kwargs.get("num_return_sequences") or 1))
            layers = [
                (k[rows].repeat_interleave(copies, 0), v[rows].repeat_interleave(copies, 0)) for k, v in prefix.kv
            ]
            ids = torch.cat([torch.full((n, prefix.width), self.pad_id, device=batch.ids.device), batch.ids], 1)
            with hidden_keys(self.model.base_model, prefix.row_starts(rows.repeat_interleave(copies, 0))):
                out = self.model.generate(  # type: ignore[operator]
                    input_ids=ids, attention_mask=attn, cache=DynamicCache(ddp_cache_data=layers), **gen_kwargs
                )
            return out[:, prefix.width + T :]
        x = torch.cat([prefix.embeds[rows], self.embed(batch.ids)], 1)
        return self.model.generate(inputs_embeds=x, attention_mask=attn, **gen_kwargs)  # type: ignore[operator]

    def _window_may_see_pads(self, prefix: Prefix, rows: torch.Tensor, batch: Batch, gen_kwargs: dict) -> bool:
        """transformers' generate builds its masks from key columns: with pad slots in a batch whose rows could span
        more than a sliding window, the window would count them (softprompt.arch)."""
        assert self.windows is not None
        padded = not bool(batch.mask.all()) or not bool(prefix.mask[rows].all())
        new = gen_kwargs.get("max_new_tokens")
        return padded and (new is None or prefix.width + batch.ids.shape[1] + int(new) > self.windows.size)

    def _generate_rows(self, prefix: Prefix, rows: torch.Tensor, batch: Batch, **gen_kwargs) -> torch.Tensor:
        """Each row alone (its own prompt's slots, its tokens without pads), right-padded with pad ids as
        transformers pads the finished rows of a batch."""
        outs = []
        for i in range(batch.ids.shape[0]):
            keep = batch.mask[i].bool()
            one = Batch(batch.ids[i : i + 1, keep], batch.mask[i : i + 1, keep])
            outs.append(self.generate(prefix.only(int(rows[i])), None, one, **gen_kwargs)[0])
        width = max(len(o) for o in outs)
        return torch.stack([F.pad(o, (0, width - len(o)), value=int(gen_kwargs["pad_token_id"])) for o in outs])


def label_text(word: str, template: str, family: str) -> str:
    """How a verbalizer word follows the template. Causal LMs: with a leading space unless the template ends in
    whitespace (BPE tokenizers fold the space into the word's first token, as in running text). Others: as is."""
    if family == "causal" and not template.endswith((" ", "\n", "\t")) and not word.startswith(" "):
        return " " + word
    return word


def _decoder_inputs(model: nn.Module, labels: torch.Tensor) -> torch.Tensor:
    """Decoder inputs (N, m) for targets `labels` (N, m; -100 = none): the model's own rule, else the start token then
    the targets shifted right (what that rule does in BART, T5 & co), -100 read as the pad token."""
    if hasattr(model, "prepare_decoder_input_ids_from_labels"):
        return model.prepare_decoder_input_ids_from_labels(labels=labels)  # type: ignore[operator]
    cfg: Any = model.config
    dec = labels.new_full(labels.shape, int(cfg.decoder_start_token_id))
    dec[:, 1:] = labels[:, :-1]
    return dec.masked_fill(dec == -100, int(cfg.pad_token_id))
