"""The soft prompt: a (num_tokens, embed_dim) tensor and the rules that initialise it.

Initialisation rules (Lester et al. 2021, section 3):
- `random`: uniform(-scale, scale), scale 0.5 by default.
- `vocab`: rows copied from the input embeddings of token ids drawn without replacement among the
  5,000 lowest non-special ids. BPE and SentencePiece vocabularies are built roughly in frequency order
  (merges/pieces are added most frequent first), so low ids approximate "the 5,000 most frequent tokens".
  WordPiece (BERT) vocabularies are not frequency-ordered; for them the rule still draws from the first
  5,000 non-special ids, skipping BERT's `[unusedN]` placeholders.
- `sample-vocab`: rows of token ids drawn uniformly, with replacement, from the whole vocabulary: PEFT's
  SAMPLE_VOCAB rule (`torch.randint(0, V, (P,))`), special tokens included as there.
- `text:"phrase"`: the embeddings of the phrase's tokens, repeated cyclically (or cut) to num_tokens.
- `labels`: row i is the mean embedding of the tokens of class-label word i (a multi-piece word is
  averaged); rows beyond the number of labels follow the `vocab` rule. With more labels than rows, the
  first num_tokens labels are used.
- `file:PATH`: the rows of another prompt checkpoint (prompt transfer); a shorter source is completed with
  the `vocab` rule, a longer one is cut. The embedding dim must match.

The plain prompt method (`--method prompt`, the default; softprompt.methods). Trained: the SoftPrompt tensor
(P, d). Prefix: [lead token][P prompt rows], built by PromptedModel.build_prefix (decoder-only: run once, its
per-layer keys/values shared by every row). File: the tensor `prompt` (P, d).

Residual reparameterisation (`--reparam residual`, Residual Prompt Tuning, Razdaibiedina et al. 2023): during
training the prompt is P' = P + LayerNorm(W_up ReLU(W_down P)), one bottleneck MLP (d -> --reparam-hidden -> d)
shared by every token, applied to each row. The LayerNorm's gain starts at 0, so step 0 runs exactly the --init
prompt (ReZero-style; the paper's LayerNorm starts at gain 1). At save the MLP is folded away: the file holds P'
as an ordinary prompt (metadata `reparam: residual`), served at no extra cost; the training state (--resume)
keeps P and the MLP.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from softprompt.checkpoint import PromptCheckpoint
from softprompt.config import PromptConfig
from softprompt.methods import MethodError
from softprompt.prefix import Prefix
from softprompt.prompted import PromptedModel

VOCAB_TOP_K = 5000


class InitError(ValueError):
    """A bad --init value; the message names the flag."""


@dataclass(frozen=True)
class InitSpec:
    kind: str  # random | vocab | text | labels | file
    arg: str = ""

    @classmethod
    def parse(cls, spec: str) -> InitSpec:
        spec = spec.strip()
        if spec in ("random", "vocab", "labels", "sample-vocab"):
            return cls(spec)
        for kind in ("text", "file"):
            if spec.startswith(kind + ":"):
                arg = spec[len(kind) + 1 :].strip()
                if len(arg) >= 2 and arg[0] == arg[-1] and arg[0] in "\"'":
                    arg = arg[1:-1]
                if not arg:
                    raise InitError(
                        f"--init {kind}: needs a value, e.g. {kind}:" + ('"a phrase"' if kind == "text" else "PATH")
                    )
                return cls(kind, arg)
        raise InitError(
            f'--init: unknown rule {spec!r} (use random, vocab, sample-vocab, text:"...", labels or file:PATH)'
        )

    def __str__(self) -> str:
        return f"{self.kind}:{self.arg}" if self.arg else self.kind


class SoftPrompt(nn.Module):
    """The trainable tensor. forward() returns it, (P, d)."""

    def __init__(self, num_tokens: int, embed_dim: int) -> None:
        super().__init__()
        if num_tokens < 1:
            raise InitError(f"--num-tokens must be >= 1, got {num_tokens}")
        self.embedding = nn.Parameter(torch.zeros(num_tokens, embed_dim))

    @property
    def num_tokens(self) -> int:
        return int(self.embedding.shape[0])

    def forward(self) -> torch.Tensor:
        return self.embedding


def vocab_candidate_ids(tokenizer, vocab_size: int) -> list[int]:
    """The ids the `vocab` rule draws from: the first VOCAB_TOP_K non-special, non-placeholder ids."""
    special = set(getattr(tokenizer, "all_special_ids", []) or [])
    out: list[int] = []
    for i in range(vocab_size):
        if i in special:
            continue
        tok = tokenizer.convert_ids_to_tokens(i) if tokenizer is not None else None
        if isinstance(tok, str) and (tok.startswith("[unused") or tok.startswith("<unused")):
            continue
        out.append(i)
        if len(out) == VOCAB_TOP_K:
            break
    return out


def _vocab_rows(n: int, embed: torch.Tensor, tokenizer, gen: torch.Generator) -> tuple[torch.Tensor, list[int]]:
    cand = vocab_candidate_ids(tokenizer, embed.shape[0])
    if n > len(cand):
        raise InitError(f"--init vocab: {n} tokens requested but only {len(cand)} candidate ids")
    pick = torch.randperm(len(cand), generator=gen)[:n].tolist()
    ids = [cand[i] for i in pick]
    return embed[ids].clone(), ids


def word_token_ids(tokenizer, word: str) -> list[int]:
    ids = tokenizer(word, add_special_tokens=False)["input_ids"]
    return list(ids)


def init_prompt(
    spec: str | InitSpec,
    num_tokens: int,
    embed: torch.Tensor,
    tokenizer,
    *,
    seed: int = 0,
    scale: float = 0.5,
    label_words: list[str] | None = None,
) -> torch.Tensor:
    """Initial prompt values (num_tokens, d) in float32 following the rule `spec` (see module docstring).

    `embed` is the backbone's input-embedding matrix (V, d); `label_words` are the verbalizer words as they
    follow the template (e.g. " positive" for a causal LM).
    """
    rule = spec if isinstance(spec, InitSpec) else InitSpec.parse(spec)
    embed = embed.detach().float().cpu()
    d = embed.shape[1]
    gen = torch.Generator().manual_seed(seed)
    if rule.kind == "random":
        return (torch.rand(num_tokens, d, generator=gen) * 2 - 1) * scale
    if rule.kind == "vocab":
        return _vocab_rows(num_tokens, embed, tokenizer, gen)[0]
    if rule.kind == "sample-vocab":  # PEFT's PromptTuningInit.SAMPLE_VOCAB
        return embed[torch.randint(0, embed.shape[0], (num_tokens,), generator=gen)].clone()
    if rule.kind == "text":
        ids = word_token_ids(tokenizer, rule.arg)
        if not ids:
            raise InitError(f"--init text: the phrase {rule.arg!r} tokenises to nothing")
        reps = (ids * (num_tokens // len(ids) + 1))[:num_tokens]
        return embed[reps].clone()
    if rule.kind == "labels":
        if not label_words:
            raise InitError("--init labels: needs a classification task with --labels (a verbalizer)")
        rows = []
        for w in label_words[:num_tokens]:
            ids = word_token_ids(tokenizer, w)
            if not ids:
                raise InitError(f"--init labels: label word {w!r} tokenises to nothing")
            rows.append(embed[ids].mean(0))
        out = torch.stack(rows)
        if len(rows) < num_tokens:
            out = torch.cat([out, _vocab_rows(num_tokens - len(rows), embed, tokenizer, gen)[0]])
        return out
    if rule.kind == "file":
        from softprompt.checkpoint import CheckpointError, load_prompt

        try:
            src = load_prompt(rule.arg).prompt.float()
        except CheckpointError as e:
            raise InitError(f"--init file: {e}") from None
        if src.shape[1] != d:
            raise InitError(f"--init file:{rule.arg}: prompt dim {src.shape[1]} != model embedding dim {d}")
        if src.shape[0] >= num_tokens:
            return src[:num_tokens].clone()
        return torch.cat([src, _vocab_rows(num_tokens - src.shape[0], embed, tokenizer, gen)[0]])
    raise InitError(f"--init: unknown rule {rule.kind!r}")


def tensor_digest(t: torch.Tensor) -> str:
    """Content hash of a tensor (dtype, shape and bytes): identifies a prompt's values, e.g. as a cache key."""
    h = hashlib.sha256(f"{t.dtype}{tuple(t.shape)}".encode())
    h.update(t.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


class ResidualReparam(nn.Module):
    """p (P, d) -> p + LayerNorm(up(relu(down(p)))), row by row; the identity at start (LayerNorm gain 0)."""

    def __init__(self, d: int, hidden: int) -> None:
        super().__init__()
        self.down = nn.Linear(d, hidden)
        self.up = nn.Linear(hidden, d)
        self.norm = nn.LayerNorm(d)
        nn.init.zeros_(self.norm.weight)

    def forward(self, p: torch.Tensor) -> torch.Tensor:
        return p + self.norm(self.up(F.relu(self.down(p))))


class PlainPrompt(nn.Module):
    """The trainable prompt (P, d), optionally produced by a residual reparameterisation while training."""

    def __init__(self, init: torch.Tensor, *, reparam: str = "none", hidden: int = 0) -> None:
        super().__init__()
        self.soft = SoftPrompt(int(init.shape[0]), int(init.shape[1]))
        with torch.no_grad():
            self.soft.embedding.copy_(init)
        if reparam not in ("none", "residual"):
            raise MethodError(f"--reparam must be none or residual, got {reparam!r}")
        if reparam == "residual" and hidden < 1:
            raise MethodError(f"--reparam residual needs --reparam-hidden >= 1, got {hidden}")
        self.reparam = ResidualReparam(int(init.shape[1]), hidden) if reparam == "residual" else None

    @property
    def embedding(self) -> nn.Parameter:
        return self.soft.embedding

    def forward(self) -> torch.Tensor:
        """The prompt the model sees (P, d)."""
        p = self.soft()
        return p if self.reparam is None else self.reparam(p)

    def trainable(self) -> list[nn.Parameter]:
        return [self.soft.embedding] + ([] if self.reparam is None else list(self.reparam.parameters()))

    def prefix(self, pm: PromptedModel) -> Prefix:
        return pm.build_prefix([self()])

    @torch.no_grad()
    def eval_prefix(self, pm: PromptedModel) -> Prefix:
        return pm.build_prefix([self().detach()])

    def saved(self) -> tuple[torch.Tensor, dict[str, torch.Tensor], dict[str, Any]]:
        if self.reparam is None:
            return self.soft.embedding, {}, {"method": "prompt"}
        with torch.no_grad():  # folded: the file is an ordinary prompt
            return self().detach(), {}, {"method": "prompt", "reparam": "residual"}


class _Plain:
    name = "prompt"
    needs_kv = False
    per_row = False
    exports = frozenset({"peft", "prompt-table"})

    def create(self, pm: PromptedModel, init: torch.Tensor, cfg: PromptConfig) -> PlainPrompt:
        return PlainPrompt(init, reparam=cfg.reparam, hidden=cfg.reparam_hidden).to(pm.backbone.device)

    def load_prefix(self, pm: PromptedModel, ckpt: PromptCheckpoint, *, kv: bool | None) -> Prefix:
        # (kv only changes a decoder's prefix; Prefix.stack refuses an encoder batch mixing K/V slots and none)
        return pm.build_prefix([ckpt.prompt.to(pm.backbone.device)], kv=kv)

    def vectors(self, ckpt: PromptCheckpoint) -> torch.Tensor:
        return ckpt.prompt.double()


METHOD = _Plain()
