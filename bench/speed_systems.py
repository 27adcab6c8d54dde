"""The two systems bench/speed.py compares, and what they share: softprompt and PEFT prompt tuning.

Softprompt and Peft wrap each system's training step, forward, classification scores and greedy generation;
Setup loads the backbones once and gives both the same fixed-length input rows (Rows) and prompt initial
values; Checks and loss_check verify that the two compute the same losses/scores before anything is timed.
The measurements, the CLI and the report are in bench/speed.py.
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from bench._common import fixed_length_rows, note, sst2_sentences
from softprompt.models import Backbone, load_backbone
from softprompt.prompt import init_prompt
from softprompt.prompted import Batch, LinearHead, PromptedModel

CAUSAL_MODEL = "smollm2-135m"
ENCODER_MODEL = "minilm-l6"
TEMPLATE = "Review: {sentence}\nSentiment:"
WORDS = ["negative", "positive"]
INPUT_LEN = 64  # every row exactly this many ids: no padding, so PEFT (right padding) and softprompt agree
LR = 1e-3
TOL = 1e-4  # softprompt and PEFT must agree this closely before they are timed


# ----- the two systems ------------------------------------------------------------------------------------
def optimizer_step(opt: torch.optim.Optimizer, loss: torch.Tensor) -> float:
    """One training step of either system: backward, the optimiser's step, gradients cleared; the loss."""
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    return float(loss)


@dataclass
class Rows:
    """One batch of fixed-length rows, as each system wants it."""

    ids: torch.Tensor  # (B, T)
    mask: torch.Tensor  # (B, T) all ones
    y: torch.Tensor  # (B,) class index
    sp: Batch  # softprompt's collated batch


class Softprompt:
    """softprompt's real training step and inference calls (what train.py and a loaded Predictor do)."""

    name = "softprompt"

    def __init__(self, bb: Backbone, init: torch.Tensor, words: list[str] | None, head: nn.Module | None = None):
        # position="start": the prompt goes in front of everything, BOS/CLS included, exactly where PEFT puts it
        self.pm = PromptedModel(bb, position="start")
        self.pm.head = head
        self.prompt = nn.Parameter(init.clone().to(bb.device))
        self.label_ids = self.pm.verbalizer_ids(words, TEMPLATE) if words else []
        extra = [p for p in head.parameters() if p.requires_grad] if head is not None else []
        self.opt = torch.optim.AdamW([self.prompt, *extra], lr=LR)

    def loss(self, r: Rows) -> torch.Tensor:
        prefix = self.pm.build_prefix([self.prompt])  # per-layer K/V of the prompt, once (decoder-only)
        return self.pm.loss(prefix, r.sp, self.label_ids or None)

    def train_step(self, r: Rows) -> float:
        return optimizer_step(self.opt, self.loss(r))

    @torch.no_grad()
    def forward(self, r: Rows) -> float:
        return float(self.loss(r))

    @torch.no_grad()
    def cached_prefix(self, with_prompt: bool = True):
        """What a loaded Predictor keeps: the prompt's K/V computed once (or the empty prefix, no prompt)."""
        return self.pm.build_prefix([self.prompt if with_prompt else None]).detach()

    @torch.no_grad()
    def scores(self, r: Rows, prefix=None) -> torch.Tensor:
        """(B, L) log-probability of each verbalizer token after the input (full-vocabulary softmax)."""
        return self.pm.label_scores(prefix if prefix is not None else self.cached_prefix(), None, r.sp, self.label_ids)

    def generate(self, r: Rows, prefix, new: int) -> torch.Tensor:
        return self.pm.generate(prefix, None, r.sp, max_new_tokens=new, min_new_tokens=new, do_sample=False)


class Peft:
    """PEFT prompt tuning on its own copy of the frozen weights, used the way PEFT's docs train and infer."""

    name = "peft"

    def __init__(
        self,
        model: nn.Module,
        task: str,
        init: torch.Tensor,
        label_ids: list[list[int]],
        pad_id: int,
        head: nn.Module | None = None,
    ):
        from peft import PromptTuningConfig, TaskType, get_peft_model

        cfg = PromptTuningConfig(task_type=getattr(TaskType, task), num_virtual_tokens=init.shape[0])
        self.model = get_peft_model(model, cfg)
        emb = self.model.prompt_encoder["default"].embedding.weight
        with torch.no_grad():
            emb.copy_(init.to(emb))
        self.model.eval()  # frozen backbone in eval mode, as softprompt's (no dropout on either side)
        self.P = init.shape[0]
        self.head = head
        self.label_tok = torch.tensor([v[0] for v in label_ids]) if label_ids else None
        self.pad_id = pad_id
        self.native_generate = True  # see check_native_generate
        params = [p for p in self.model.parameters() if p.requires_grad]
        assert len(params) == 1, "PEFT prompt tuning should train the prompt embedding only"
        extra = [p for p in head.parameters() if p.requires_grad] if head is not None else []
        self.opt = torch.optim.AdamW(params + extra, lr=LR)

    def loss(self, r: Rows) -> torch.Tensor:
        if self.head is not None:  # encoder: the same linear head on mean-pooled input positions
            h = self.model(input_ids=r.ids, attention_mask=r.mask)[0][:, self.P :]
            w = r.mask[..., None].to(h.dtype)
            return F.cross_entropy(self.head((h * w).sum(1) / w.sum(1)).float(), r.y)
        # causal LM: the verbalizer token appended after the input; labels -100 everywhere else
        assert self.label_tok is not None
        gold = self.label_tok.to(r.ids.device)[r.y][:, None]
        ids = torch.cat([r.ids, gold], 1)
        labels = torch.cat([torch.full_like(r.ids, -100), gold], 1)
        return self.model(input_ids=ids, attention_mask=torch.ones_like(ids), labels=labels).loss

    def train_step(self, r: Rows) -> float:
        return optimizer_step(self.opt, self.loss(r))

    @torch.no_grad()
    def scores(self, r: Rows) -> torch.Tensor:
        """PEFT inference: forward of the batch, log-softmax of the last position's logits, verbalizer tokens."""
        assert self.label_tok is not None
        logits = self.model(input_ids=r.ids, attention_mask=r.mask).logits[:, -1].float()
        return logits.log_softmax(-1)[:, self.label_tok.to(logits.device)]

    @torch.no_grad()
    def generate(self, r: Rows, new: int, *, native: bool | None = None) -> torch.Tensor:
        """Greedy new tokens (B, new). `native`: PEFT's own generate; else the prompt embeddings (PEFT's
        get_prompt) in front of the input embeddings, through the base model's generate: what PEFT's generate
        does on its first step, with transformers' cache doing the rest. Default: native when it is correct."""
        kw = dict(max_new_tokens=new, min_new_tokens=new, do_sample=False, pad_token_id=self.pad_id)
        if self.native_generate if native is None else native:
            return self.model.generate(input_ids=r.ids, attention_mask=r.mask, **kw)[:, -new:]
        emb = self.model.word_embeddings(r.ids)
        x = torch.cat([self.model.get_prompt(batch_size=r.ids.shape[0]).to(emb.dtype), emb], 1)
        mask = torch.cat([torch.ones(r.ids.shape[0], self.P, dtype=r.mask.dtype, device=r.mask.device), r.mask], 1)
        return self.model.get_base_model().generate(inputs_embeds=x, attention_mask=mask, **kw)[:, -new:]

    def check_native_generate(self, r: Rows, new: int = 4) -> bool:
        """Whether PEFT's own generate gives the tokens the plain-concatenation path gives. PEFT 0.21 with
        transformers 5 does not: its prepare_inputs_for_generation looks for `past_key_values` (now `cache`),
        misses the cache and prepends the prompt again at every step (wrong tokens, and slower)."""
        self.native_generate = torch.equal(self.generate(r, new, native=True), self.generate(r, new, native=False))
        return self.native_generate


# ----- shared set-up ---------------------------------------------------------------------------------------
class Setup:
    """Backbones (loaded once), input rows and prompt initial values shared by every measurement."""

    def __init__(self) -> None:
        self._bb: dict[str, Backbone] = {}
        self.sentences, self.data_source = sst2_sentences()

    def backbone(self, name: str) -> Backbone:
        if name not in self._bb:
            t0 = time.perf_counter()
            self._bb[name] = load_backbone(name, progress=False)
            note(f"loaded {name} in {time.perf_counter() - t0:.1f} s")
        return self._bb[name]

    def rows(self, bb: Backbone, batch: int, pm: PromptedModel) -> Rows:
        def encode(body: str) -> list[int]:
            return pm.encode_input(TEMPLATE.format(sentence=body))

        ids, labels = fixed_length_rows(encode, self.sentences, batch, INPUT_LEN)
        sp = pm.collate(ids, labels=labels).to(bb.device)
        return Rows(sp.ids, sp.mask, sp.labels, sp)  # type: ignore[arg-type]

    @staticmethod
    def init(bb: Backbone, tokens: int) -> torch.Tensor:
        """The prompt's initial values (the `vocab` rule, seed 0): given to both systems."""
        return init_prompt("vocab", tokens, bb.model.get_input_embeddings().weight, bb.tokenizer, seed=0)

    def causal_pair(self, tokens: int, batch: int, *, peft: bool = True) -> tuple[Softprompt, Peft | None, Rows]:
        bb = self.backbone(CAUSAL_MODEL)
        init = self.init(bb, tokens)
        sp = Softprompt(bb, init, WORDS)
        if any(len(v) != 1 for v in sp.label_ids):
            raise SystemExit(f"verbalizer {WORDS} is not one token per word for {CAUSAL_MODEL}")
        rows = self.rows(bb, batch, sp.pm)
        pf = Peft(copy.deepcopy(bb.model), "CAUSAL_LM", init, sp.label_ids, sp.pm.pad_id) if peft else None
        return sp, pf, rows

    def encoder_pair(self, tokens: int, batch: int, *, peft: bool = True) -> tuple[Softprompt, Peft | None, Rows]:
        bb = self.backbone(ENCODER_MODEL)
        init = self.init(bb, tokens)
        torch.manual_seed(0)
        head = LinearHead(bb.embed_dim, len(WORDS)).to(bb.device)
        sp = Softprompt(bb, init, None, head=head)
        rows = self.rows(bb, batch, sp.pm)
        pf = None
        if peft:
            pf = Peft(copy.deepcopy(bb.model), "FEATURE_EXTRACTION", init, [], sp.pm.pad_id, copy.deepcopy(head))
        return sp, pf, rows


# ----- checks ----------------------------------------------------------------------------------------------
class Checks:
    """Equality checks run before timing; any failure is reported in the table, the JSON and the exit code."""

    def __init__(self) -> None:
        self.results: dict[str, float] = {}

    def record(self, name: str, diff: float) -> str:
        self.results[name] = diff
        return f"{diff:.1e}" + ("" if diff <= TOL else " FAIL")

    @property
    def ok(self) -> bool:
        return all(v <= TOL for v in self.results.values())


def loss_check(sp: Softprompt, pf: Peft, r: Rows) -> tuple[float, float]:
    """The loss each system trains on, computed on the same batch: (softprompt's, PEFT's).

    Causal LM: PEFT's `labels` loss is the full-vocabulary NLL of the gold verbalizer token after the input;
    softprompt's label_scores give the same log-probabilities, so -mean(score of the gold class) must match.
    (softprompt trains a cross-entropy over the verbalizer classes, a different normalisation of the same
    forward pass.) Encoder: both are cross-entropy of the same head on the same pooled states."""
    with torch.no_grad():
        theirs = float(pf.loss(r))
        if sp.pm.family == "encoder":
            return float(sp.loss(r)), theirs
        s = sp.scores(r, sp.pm.build_prefix([sp.prompt]))
        return float(-s.gather(1, r.y[:, None]).mean()), theirs
