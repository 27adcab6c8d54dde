"""Prompts, ICL, prompt tuning, LoRA: the measurements behind docs/results-compile.md and docs/choosing.md.

    python -m bench.compile [--tasks sst2,agnews,rte] [--methods zero,instr,icl4,...] [--steps 60] [--out runs/compile]
    python -m bench.compile_report            # bench/results/compile.jsonl -> docs/results-compile.md

On one fixed-seed sample per task (the same train rows, eval rows, batches, steps and seed for every method):
zero-shot (the template alone); hand-written instructions (k = 0); ICL with k = 4, 8, 16 balanced demonstrations
(after the same instructions; the context's keys/values computed once per evaluation, softprompt.icl); prompt
tuning (20 tokens); a prompt distilled from the 16-shot context (softprompt.distill, 20 tokens, the train rows as
unlabelled inputs); LoRA (PEFT LoraConfig, rank 8 on q/k/v/o) and full fine-tuning (AdamW on every weight).
Prompt tuning, distillation, LoRA and full fine-tuning all train through the one trainer (softprompt.trainer.fit:
the same optimiser code, lr schedule, clipping and batch schedule), LoRA and full fine-tuning on a copy of the model
scored by the same forward path (softprompt.prompted) with no prompt.

Further rows, each on the same evaluation rows: `icl16-long` (SST-2 only: 16 demonstrations among the training rows
of at least Task.long_demo_words words, since SST-2's train split is mostly phrase fragments and its 16-shot context
stays under 400 tokens); `distill-deep` (a deep prompt, per-layer keys/values, as the student: initialised from the
K/V of the hard prompt's own first 20 tokens, as Cartridges initialise theirs, and the teacher sharpened by
--sharp-temperature; its teacher is the long context where the task has one); `distill-deep-long` and `pt-long` (the
same with --long-train-n rows and --long-steps steps: a superset of the same sample's training rows);
`pt-deep` (deep prompt tuning: distill-deep's student and budget trained on the labels, no teacher) and
`pt-deep-long` (the same with pt-long's rows and steps);
`distill-deep-longer` (twice those rows and steps);
`distill-deep-hard` (distill-deep-long with the teacher at --hard-temperature, nearly its argmax);
`distill-deep-soft` (the same with the teacher's own distribution, T = 1); `distill-deep-fast` (the same at 3x
--deep-lr); `distill-deep-vocab` (distill-deep-long
plus --vocab-kl: the teacher's whole next-token distribution at the answer position); `distill-deep-input` (the
same KL at every position of the input, --vocab-kl-at input); `distill-deep-anchors` (the same student started
from the teacher context's own keys/values at its label words, --student-init anchors); `distill-deep-pos` (the
input at the positions it has behind the teacher's context, --student-positions teacher) and
`distill-deep-pos-anchors` (both); `distill-deep-epochs` (distill-deep-long's inputs, 4x its steps: 4 epochs) and
`distill-deep-batch` (the same 4 epochs in distill-deep-long's steps, batches of 4x --batch); `distill-deep-data`
(distill-deep-batch's steps and batches over 4x --long-train-n inputs: one epoch, the same compute);
`distill-deep-batch-more` (4 epochs in batches of 4x --batch over 2x the inputs: 2x the steps) and
`distill-deep-data-twice` (2 epochs in those batches over 4x the inputs: the same 2x the steps);
`distill-deep-reparam` (distill-deep-long trained through the --deep-reparam MLP, prefix tuning's
reparameterisation, at a tenth of --deep-lr); `distill-deep-alpha` (distill-deep-long with --alpha times the
labelled cross-entropy added to the KL: the training rows' own labels); `distill-deep-self`
(distill-deep-long's budget on --long-train-n inputs the model writes itself behind the teacher's context:
softprompt.icl.self_study, seed 0, instead of the training rows);
`distill-deep-boundary` (distill-deep-long's budget; half its inputs the ones nearest the teacher's decision
boundary among twice as many sample rows); `distill-deep-sent` (SST-2: distill-deep-long's budget on training rows
of >= Task.long_demo_words words only, inputs like the evaluation rows); `distill-deep-best` (the same student, its
teacher the most accurate ICL context measured so far: "a prompt distilled from the best ICL context");
`minilm-pt`, `minilm-ft` (minilm-l6, an encoder: prompt tuning with a linear head through the one trainer, and full
fine-tuning with bench.quality_experiments.encoder_reference), `minilm-lora` (LoRA rank 8 on its attention
projections + the head, the same reference) and their `-long` variants; `lora-long`, `ft-long` (LoRA and full
fine-tuning with pt-long's rows and steps); `teacher-noise` (the deep students' teacher against itself with its
demonstrations reordered, and against teachers of other draws: the scale for their agreement); `margins` (each saved
distilled prompt's agreement with its teacher by the teacher's top-2 margin) and `margins-dev` (the same on every
row of the evaluation split, the table's rows first: agreement measured on more held-out rows); `accuracy-dev`
(zero-shot, every ICL context and every saved prompt's accuracy on every row of the evaluation split).

Each run records: accuracy, trainable parameters, checkpoint bytes, training time per step, peak RSS during the run,
and the inference latency per example at batch 1 on the same rows, timed interleaved with the zero-shot model in
the same run (the ratio is the robust number on a shared machine); ICL and prompts also their per-task key/value
bytes, ICL 16 the uncached latency (the model's own forward of [BOS] context input), the distilled prompt its
agreement with its teacher. Each finished run is appended to bench/results/compile.jsonl (--results; committed, so
a new machine resumes the study and the page can be rebuilt) and skipped on a rerun (--redo: run again, the new
record superseding the old); --seed S > 0 repeats the trained rows as runs NAME@sS.
Data: fixed-seed samples of ../shared/data (read there, written to a temporary directory, never into the
repository); a task whose files are absent is skipped with the reason.
"""

from __future__ import annotations

import argparse
import copy
import gc
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from bench._common import ResultLog, interleaved, note, peak_rss_bytes, rss_bytes
from bench.compile_diagnostics import accuracy_dev, boundary_rows, margins, teacher_noise
from bench.compile_tasks import TASKS, sample
from bench.compile_weights import ENCODER, WeightsObjective, encoder_ft, encoder_pt, lora_model

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results" / "compile.jsonl"  # one JSON object per finished run
TOKENS = 20  # the soft tokens of every trained prompt in the tables (the targets' student size)
MODEL = "smollm2-135m"
METHODS = (
    "zero", "icl4", "icl8", "icl16", "pt", "distill", "lora", "instr", "ft", "distill-sharp", "icl16-long",
    "distill-deep", "distill-deep-long", "distill-deep-longer", "distill-deep-sent", "distill-deep-hard",
    "distill-deep-boundary", "distill-deep-best", "pt-long", "minilm-pt", "minilm-ft", "minilm-pt-long",
    "minilm-ft-long", "margins", "distill-deep-soft", "distill-deep-vocab", "minilm-lora", "minilm-lora-long",
    "lora-long", "ft-long", "distill-deep-self", "distill-deep-fast", "distill-deep-input",
    "distill-deep-anchors", "distill-deep-pos", "distill-deep-pos-anchors", "distill-deep-epochs",
    "distill-deep-batch", "distill-deep-reparam", "teacher-noise", "distill-deep-data",
    "distill-deep-batch-more", "distill-deep-data-twice", "distill-deep-alpha", "pt-deep", "margins-dev",
    "pt-deep-long", "accuracy-dev",
)  # fmt: skip
# the distill-deep rows that differ only in Study._deep's settings (from the parsed flags): the deep student of
# 20 slots on the task's long context, 2,000 inputs x 250 steps (distill-deep-long) unless a row says otherwise
DEEP_ROWS: dict[str, Callable[[argparse.Namespace], dict[str, Any]]] = {
    "distill-deep": lambda a: {"times": 0},  # the table's rows and steps
    "distill-deep-long": lambda a: {},
    "distill-deep-longer": lambda a: {"times": 2},  # 2x the rows and 2x the steps
    "distill-deep-soft": lambda a: {"temperature": 1.0},  # the teacher's own distribution
    "distill-deep-hard": lambda a: {"temperature": a.hard_temperature},  # near the teacher's argmax
    "distill-deep-fast": lambda a: {"lr": 3 * a.deep_lr},
    "distill-deep-epochs": lambda a: {"epochs": 4},  # 4x the steps over the same inputs
    "distill-deep-batch": lambda a: {"batch": 4 * a.batch},  # the same 4 epochs in distill-deep-long's steps
    "distill-deep-data": lambda a: {"batch": 4 * a.batch, "rows": 4},  # its steps and batches, 4x the inputs once
    "distill-deep-batch-more": lambda a: {"batch": 4 * a.batch, "rows": 2, "epochs": 2},  # 4 epochs, 2x the inputs
    "distill-deep-data-twice": lambda a: {"batch": 4 * a.batch, "rows": 4, "epochs": 2},  # 2 epochs, 4x the inputs
    # an lr step of the MLP's last layer moves every K/V entry by up to width x lr: a tenth of --deep-lr
    "distill-deep-reparam": lambda a: {"reparam": a.deep_reparam, "lr": a.deep_lr / 10},
    "distill-deep-alpha": lambda a: {"alpha": a.alpha},  # + --alpha x the labelled cross-entropy
    "distill-deep-vocab": lambda a: {"vocab_kl": a.vocab_kl},  # + the whole-vocabulary KL at the answer
    "distill-deep-input": lambda a: {"vocab_kl": a.vocab_kl, "vocab_at": "input"},  # that KL at every position
    "distill-deep-anchors": lambda a: {"student_init": "anchors"},  # from the teacher's own label-word K/V
    "distill-deep-pos": lambda a: {"student_positions": "teacher"},  # the input at its teacher's positions
    "distill-deep-pos-anchors": lambda a: {"student_positions": "teacher", "student_init": "anchors"},
}
# the ICL rows: their contexts
ICL_K: dict[str, int | str] = {"instr": 0, "icl4": 4, "icl8": 8, "icl16": 16, "icl16-long": "16long"}
# rows that --seed does not change (the demonstrations are drawn with seed 0)
UNTRAINED = ("zero", "margins", "margins-dev", "accuracy-dev", "teacher-noise", *ICL_K)


def reset_peak() -> None:
    """Linux: reset this process's peak RSS (VmHWM) so that each run reports its own peak."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


class Study:
    def __init__(self, args: argparse.Namespace) -> None:
        self.a = args
        self.out = Path(args.out)
        self.out.mkdir(parents=True, exist_ok=True)
        self.log = ResultLog(Path(args.results))
        self.done = self.log.done
        self.tmp = Path(tempfile.mkdtemp(prefix="compile-"))
        self._bb: Any = None
        self._encoder: Any = None
        self._supersets: dict[str, str] = {}

    def superset(self, n: int, min_words: int = 0) -> str:
        """A training file of n rows of the task's fixed-seed sample: a superset of the table's rows (min_words > 0:
        only its rows of at least that many words), with the same evaluation rows; written once per run."""
        name = f"{self.key}-{n}-{min_words}"
        if name not in self._supersets:
            files = sample(TASKS[self.key], n, self.a.eval_n, self.tmp / name, min_words=min_words)
            assert not isinstance(files, str) and Path(files[1]).read_text() == Path(self.eval_file).read_text()
            self._supersets[name] = files[0]
        return self._supersets[name]

    def long_rows(self, times: int = 1) -> str:
        """The training file of the *-long rows: times x --long-train-n rows of the sample."""
        return self.superset(times * self.a.long_train_n)

    def encoder(self):
        from softprompt import load_backbone

        if self._encoder is None:
            self._encoder = load_backbone(ENCODER, progress=False)
        return self._encoder

    def backbone(self):
        from softprompt import load_backbone

        if self._bb is None:
            self._bb = load_backbone(MODEL, progress=False)
        return self._bb

    def name(self, key: str, method: str) -> str:
        """A run's key in the results: the first study's names for 20 tokens and seed 0; --tokens N != 20 appends
        @tN, seed s > 0 appends @s<s>."""
        wide = f"@t{self.a.tokens}" if self.a.tokens != TOKENS else ""
        return f"{key}:{method}{wide}" + (f"@s{self.a.seed}" if self.a.seed else "")

    def checkpoint(self, name: str) -> Path:
        """Where run `name` keeps its prompt: OUT/sst2-pt@s1.safetensors for sst2:pt@s1."""
        return self.out / f"{name.replace(':', '-')}.safetensors"

    def record(self, r: dict[str, Any]) -> dict[str, Any]:
        return self.log.record(r)

    # ---- one task -------------------------------------------------------------------------------------
    def task(self, key: str) -> None:
        t = TASKS[key]
        todo = [m for m in self.a.methods if self.name(key, m) not in self.done or m in self.a.redo]
        if not t.long_demo_words and "icl16-long" in todo:
            todo.remove("icl16-long")  # the task's 16-shot context is long already
        self.key = key
        if not todo:
            return
        files = sample(t, self.a.train_n, self.a.eval_n, self.tmp)
        if isinstance(files, str):
            note(f"{key}: {files}")
            return
        from softprompt.config import DataConfig
        from softprompt.data import load_samples
        from softprompt.icl import build_context, choose_demos
        from softprompt.prompted import PromptedModel
        from softprompt.task import BoundTask, TaskSpec

        bb = self.backbone()
        self.train_file, self.eval_file = files
        self.spec = TaskSpec.from_config(DataConfig(template=t.template, labels=t.labels))
        self.pm0 = PromptedModel(bb)
        probe = BoundTask(self.spec, self.pm0, num_tokens=0)
        self.label_ids = probe.label_ids
        pool = load_samples(self.train_file, self.spec.data_config(), self.spec.verbalizer)
        self.contexts: dict[int | str, Any] = {
            k: build_context(probe, choose_demos(pool, k, seed=0, balanced=True), t.instructions) for k in (0, 4, 8, 16)
        }
        self.teacher_key: int | str = 16  # the teacher of the distill-deep rows: the long context where there is one
        self.pool = pool  # where the teacher's demonstrations come from
        needs_long = any(m.startswith(("icl16-long", "distill-deep", "teacher-", "margins", "accuracy-")) for m in todo)
        if t.long_demo_words and needs_long:  # 16 balanced demonstrations (seed 0) among the rows of >= N words
            self.pool = [s for s in pool if len(s.record[self.spec.fields[0]].split()) >= t.long_demo_words]
            self.contexts["16long"] = build_context(probe, choose_demos(self.pool, 16, seed=0, balanced=True),
                                                    t.instructions)  # fmt: skip
            self.teacher_key = "16long"
        self.instructions = t.instructions
        self.probe = probe
        self.eval_set, _, _ = probe.encode_file(self.eval_file)
        self.lat_rows = self.eval_set[: self.a.latency_rows]
        with torch.no_grad():
            self.prefix0 = self.pm0.build_prefix([None])
        for m in todo:
            note(f"--- {key}:{m}")
            gc.collect()
            reset_peak()
            base_rss = rss_bytes()
            t0 = time.time()
            if m in ICL_K:
                r = self._icl(ICL_K[m])
            elif m in DEEP_ROWS:
                r = self._deep(key, m, **DEEP_ROWS[m](self.a))
            else:
                r = getattr(self, "run_" + m.replace("-", "_"))(key)
            r.update(name=self.name(key, m), task=key, method=m, seed=self.a.seed, model=r.get("model", MODEL),
                     wall_s=round(time.time() - t0, 1),
                     peak_rss_mib=round(peak_rss_bytes() / 2**20), start_rss_mib=round(base_rss / 2**20),
                     train_n=self.a.train_n, eval_n=len(self.eval_set), date=time.strftime("%Y-%m-%d"),
                     command="python -m bench.compile " + " ".join(sys.argv[1:]))  # fmt: skip
            self.record(r)

    # ---- timing -------------------------------------------------------------------------------------
    @torch.no_grad()
    def _score(self, pm, prefix) -> None:
        for e in self.lat_rows:  # batch 1: one request at a time
            pm.label_scores(prefix, None, pm.collate([e.input_ids]), self.label_ids)

    def latency(self, fn: Callable[[], None]) -> dict[str, Any]:
        """Per-example latency of `fn` (scores self.lat_rows one by one), interleaved with zero-shot's."""
        tm = interleaved({"zero": lambda: self._score(self.pm0, self.prefix0), "m": fn}, rounds=3, warmup=1)
        n = len(self.lat_rows)
        return {"latency_ms": round(tm.median("m") / n * 1e3, 2), "zero_latency_ms": round(tm.median("zero") / n * 1e3,
                2), "latency_ratio": round(tm.ratio("m", "zero"), 3)}  # fmt: skip

    def accuracy(self, pm, prefix) -> float:
        from softprompt.evaluate import evaluate_examples

        m = evaluate_examples(pm, prefix, self.eval_set, task="classify", label_ids=self.label_ids,
                              labels=self.spec.verbalizer.labels)  # fmt: skip
        return round(100 * float(m["accuracy"]), 2)

    # ---- no training ----------------------------------------------------------------------------------
    def run_zero(self, key: str) -> dict[str, Any]:
        r = {"accuracy": self.accuracy(self.pm0, self.prefix0), "trainable": 0, "checkpoint_bytes": 0}
        return {**r, **self.latency(lambda: self._score(self.pm0, self.prefix0)), "kv_bytes": self.prefix0.nbytes()}

    def _icl(self, k: int | str) -> dict[str, Any]:
        from softprompt.icl import context_prefix

        ctx = self.contexts[k]
        t0 = time.perf_counter()
        prefix = context_prefix(self.pm0, ctx)  # the context's K/V: once per task
        prefill_s = time.perf_counter() - t0
        r = {"accuracy": self.accuracy(self.pm0, prefix), "trainable": 0, "checkpoint_bytes": len(ctx.text.encode()),
             "k": 16 if k == "16long" else k, "context_tokens": len(ctx.token_ids), "kv_bytes": prefix.nbytes(),
             "prefill_s": round(prefill_s, 3), **self.latency(lambda: self._score(self.pm0, prefix))}  # fmt: skip
        if k == "16long":
            r["demo_min_words"] = TASKS[self.key].long_demo_words
        if k in (16, "16long"):
            r["uncached"] = self.latency(lambda: self._uncached(ctx))
        return r

    @torch.no_grad()
    def _uncached(self, ctx) -> None:
        model, lead = self.pm0.model, self.pm0.prefix_ids
        words = torch.tensor([w[0] for w in self.label_ids])
        for e in self.lat_rows:  # the model's own forward of [BOS] context input, no cache
            ids = torch.tensor([lead + ctx.token_ids + e.input_ids])
            model(input_ids=ids, logits_to_keep=1).logits[0, -1].log_softmax(-1)[words]

    # ---- training through softprompt.trainer.fit ------------------------------------------------------
    def cfg(self, key: str, method: str, lr: float, steps: int = 0, train: str | None = None, batch: int = 0):
        from softprompt.config import RunConfig

        t = TASKS[key]
        cfg = RunConfig()
        cfg.model.model, cfg.model.device = MODEL, "cpu"
        cfg.data.train, cfg.data.eval, cfg.data.template, cfg.data.labels = (
            train or self.train_file, self.eval_file, t.template, t.labels)  # fmt: skip
        cfg.prompt.num_tokens = self.a.tokens
        tr = cfg.train
        tr.max_steps, tr.batch_size, tr.lr, tr.seed = steps or self.a.steps, batch or self.a.batch, lr, self.a.seed
        tr.warmup_steps, tr.save_every, tr.progress, tr.overwrite = max(1, self.a.steps // 10), 10**6, False, True
        tr.out = str(self.checkpoint(self.name(key, method)))
        for p in (Path(tr.out + ".state"), Path(tr.out).with_suffix(".log.jsonl")):  # a fresh run each time
            shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
        return cfg

    def _fit(self, obj, cfg) -> dict[str, Any]:
        from softprompt.train import run_files
        from softprompt.trainer import fit

        res = fit(obj, cfg, run_files(cfg), log=note)
        h = res.history
        per_step = (h[-1]["time_s"] - h[0]["time_s"]) / max(1, len(h) - 1)  # the first step's set-up excluded
        shutil.rmtree(cfg.train.out + ".state", ignore_errors=True)
        return {"steps": res.steps, "train_s_per_step": round(per_step, 3), "lr": cfg.train.lr,
                "batch_size": cfg.train.batch_size, "metrics": res.last.metrics if res.last else {}}  # fmt: skip

    def _prompt(
        self, key: str, method: str, lr: float, teacher_k: int | str | None = None, deep: bool = False, steps: int = 0,
        train: str | None = None, train_set: list[Any] | None = None, batch: int = 0, reparam: int = 0,
        **distill: Any,
    ) -> dict[str, Any]:  # fmt: skip
        """A prompt trained through the one trainer; with teacher_k, distilled from that context: `distill` holds
        DistillObjective's settings (temperature, vocab_kl, vocab_at, student_init), recorded with the run. A
        student not started from its --init (student_init anchors) also records its agreement at step 0, and
        that of the --init it replaced; a deep student also its agreement on the first --margin-train-n of its own
        training inputs (the fit: no better than held out is underfitting). batch: 0 is --batch; reparam: a deep
        student's --deep-reparam."""
        from softprompt.checkpoint import load_prompt
        from softprompt.distill import DistillObjective
        from softprompt.methods import checkpoint_prefix
        from softprompt.train import build_objective

        cfg = self.cfg(key, method, lr, steps, train, batch)
        if deep:  # a deep student (per-layer keys/values) from the K/V of the hard prompt's first N tokens
            cfg.prompt.method, cfg.prompt.init = "deep", f"text:{self.instructions}"
            cfg.prompt.deep_reparam = reparam
        obj: Any = build_objective(cfg, self.backbone(), log=note, train_set=train_set)
        at_init: dict[str, Any] = {}
        if teacher_k is not None:
            ctx = self.contexts[teacher_k]
            obj = DistillObjective(obj, ctx, **{**distill, "student_init": "prompt"})
            if distill.get("student_init", "prompt") == "anchors":
                at_init["init_agreement_prompt"] = round(100 * obj.evaluate().score, 2)  # --init's, for comparison
                obj.start_from_anchors()
                at_init.update(init_agreement=round(100 * obj.evaluate().score, 2), anchors=obj.anchors)
        r = self._fit(obj, cfg)
        ck = load_prompt(cfg.train.out)
        with torch.no_grad():
            prefix = checkpoint_prefix(self.pm0, [ck]).detach()  # the saved file, as a server loads it
        r.update(accuracy=round(100 * r["metrics"]["accuracy"], 2), trainable=sum(p.numel() for p in obj.params),
                 checkpoint_bytes=os.path.getsize(cfg.train.out), kv_bytes=prefix.nbytes(), num_tokens=self.a.tokens,
                 **self.latency(lambda: self._score(self.pm0, prefix)))  # fmt: skip
        if teacher_k is not None:
            m = r.pop("metrics")
            r.update(agreement=round(100 * m["agreement"], 2), teacher_accuracy=round(100 * m["teacher_accuracy"], 2),
                     teacher_tokens=len(self.contexts[teacher_k].token_ids), teacher_k=teacher_k,
                     distill_meta=ck.meta.get("distill"), student=cfg.prompt.method,
                     teacher_temperature=distill.get("temperature", 1.0),
                     **{k: v for k, v in distill.items() if k != "temperature"}, **at_init)  # fmt: skip
            if deep:
                r["train_agreement"] = self.fit_agreement(prefix, self.contexts[teacher_k], obj.base.train_set)
        r.pop("metrics", None)
        r["train_rows"] = obj.n_train
        return r

    @torch.no_grad()
    def fit_agreement(self, student, ctx, rows: list[Any]) -> float:
        """% of the first --margin-train-n `rows` (a student's training inputs) on which `student` (a Prefix)
        predicts its teacher's (`ctx`) class."""
        from softprompt.evaluate import class_probs
        from softprompt.icl import context_prefix

        rows = rows[: self.a.margin_train_n]
        t = class_probs(self.pm0, context_prefix(self.pm0, ctx), rows, self.label_ids)
        s = class_probs(self.pm0, student, rows, self.label_ids)
        return round(100 * float((t.argmax(-1) == s.argmax(-1)).float().mean()), 2)

    def run_pt(self, key: str) -> dict[str, Any]:
        return self._prompt(key, "pt", self.a.pt_lr)

    def run_pt_deep(self, key: str) -> dict[str, Any]:  # deep prompt tuning: the deep students' prompt, on labels
        return self._prompt(key, "pt-deep", self.a.deep_lr, deep=True)

    def run_pt_deep_long(self, key: str) -> dict[str, Any]:  # pt-deep with pt-long's rows and steps
        return self._prompt(key, "pt-deep-long", self.a.deep_lr, deep=True, steps=self.a.long_steps,
                            train=self.long_rows())  # fmt: skip

    def run_pt_long(self, key: str) -> dict[str, Any]:  # the long sample and steps of distill-deep-long
        return self._prompt(key, "pt-long", self.a.pt_lr, steps=self.a.long_steps, train=self.long_rows())

    def run_distill(self, key: str) -> dict[str, Any]:
        return self._prompt(key, "distill", self.a.pt_lr, teacher_k=16)

    def run_distill_sharp(self, key: str) -> dict[str, Any]:  # --teacher-temperature: pulled toward the argmax
        return self._prompt(key, "distill-sharp", self.a.pt_lr, teacher_k=16, temperature=self.a.sharp_temperature)

    def _deep(
        self, key: str, method: str, *, times: int = 1, train: str | None = None, teacher_k: int | str | None = None,
        train_set: list[Any] | None = None, lr: float | None = None, epochs: int = 1, rows: int = 0, **distill: Any,
    ) -> dict[str, Any]:  # fmt: skip
        """A deep student (the distill-deep* rows): Cartridges-style init, the sharpened teacher (the long context
        where the task has one; `distill`: other DistillObjective settings, or _prompt's batch and reparam); times 0:
        the table's rows and steps; times k: k x --long-steps steps over `train`, by default k x --long-train-n rows
        of the sample (rows r > 0: r x --long-train-n rows instead); epochs e: e times those steps."""
        if times and train is None:
            train = self.long_rows(rows or times)
        teacher_k = self.teacher_key if teacher_k is None else teacher_k
        distill.setdefault("temperature", self.a.sharp_temperature)
        return self._prompt(key, method, lr or self.a.deep_lr, teacher_k=teacher_k, deep=True,
                            steps=epochs * times * self.a.long_steps, train=train, train_set=train_set,
                            **distill)  # fmt: skip

    def run_distill_deep_self(self, key: str) -> dict[str, Any]:  # inputs the model writes itself (self-study)
        from softprompt.icl import self_study
        from softprompt.task import BoundTask

        t0 = time.time()
        texts = self_study(self.pm0, self.contexts[self.teacher_key], self.spec, self.a.long_train_n, seed=0)
        gen_s = time.time() - t0
        rows, _ = BoundTask(self.spec, self.pm0, num_tokens=self.a.tokens).encode_texts(texts)
        r = self._deep(key, "distill-deep-self", train_set=rows)
        return {**r, "self_study_s": round(gen_s, 1), "self_study_examples": texts[:5]}

    def run_distill_deep_sent(self, key: str) -> dict[str, Any]:  # inputs like the eval rows
        words = TASKS[key].long_demo_words
        r = self._deep(key, "distill-deep-sent", train=self.superset(self.a.long_train_n, min_words=words))
        return {**r, "input_min_words": words}

    def run_distill_deep_boundary(self, key: str) -> dict[str, Any]:  # boundary-heavy inputs
        r = self._deep(key, "distill-deep-boundary", train=boundary_rows(self, key))
        return {**r, "boundary_pool": 2 * self.a.long_train_n}

    def run_distill_deep_best(self, key: str) -> dict[str, Any]:  # the teacher: the most accurate ICL row so far
        icl = {k: self.done[f"{key}:{m}"]["accuracy"] for m, k in ICL_K.items() if k and f"{key}:{m}" in self.done}
        return self._deep(key, "distill-deep-best", times=0, teacher_k=max(icl, key=lambda k: icl[k]))

    def _weights(self, key: str, method: str, lr: float, long: bool = False) -> dict[str, Any]:
        """LoRA (method lora*) or full fine-tuning (ft*) through the one trainer; long: the -long rows' sample and
        steps (pt-long's)."""
        from softprompt.prompted import PromptedModel
        from softprompt.train import build_objective

        bb = self.backbone()
        lora = method.startswith("lora")
        peft, model = lora_model(bb.model) if lora else (None, copy.deepcopy(bb.model))
        if not lora:
            for p in model.parameters():
                p.requires_grad_(True)
        twin = copy.copy(bb)
        twin.model, twin.skip_equivalence_check = model, True  # the base backbone passed softprompt's guard
        steps = self.a.long_steps if long else self.a.ft_steps if method == "ft" else 0
        cfg = self.cfg(key, method, lr, steps, self.long_rows() if long else None)
        base = build_objective(cfg, bb, log=note)  # the same encoded rows and batch schedule as prompt tuning
        obj = WeightsObjective(base, PromptedModel(twin), method, Path(cfg.train.out).with_suffix(""), peft)
        r = self._fit(obj, cfg)
        acc = round(100 * r.pop("metrics")["accuracy"], 2)
        pm = obj.pm
        with torch.no_grad():
            prefix = pm.build_prefix([None])
        r.update(accuracy=acc, trainable=sum(p.numel() for p in obj.params),
                 checkpoint_bytes=obj.saved_bytes(), train_rows=obj.n_train,
                 **self.latency(lambda: self._score(pm, prefix)))  # fmt: skip
        obj.cleanup()
        return r

    def run_lora(self, key: str) -> dict[str, Any]:
        return self._weights(key, "lora", self.a.lora_lr)

    def run_ft(self, key: str) -> dict[str, Any]:
        return self._weights(key, "ft", self.a.ft_lr)

    def run_lora_long(self, key: str) -> dict[str, Any]:  # pt-long's rows and steps
        return self._weights(key, "lora-long", self.a.lora_lr, long=True)

    def run_ft_long(self, key: str) -> dict[str, Any]:
        return self._weights(key, "ft-long", self.a.ft_lr, long=True)

    # ---- where the distilled prompts disagree with their teachers (bench.compile_diagnostics) ---------------------
    def run_teacher_noise(self, key: str) -> dict[str, Any]:
        return teacher_noise(self, key)

    def run_margins(self, key: str) -> dict[str, Any]:
        return margins(self, key, previous=self.done.get(self.name(key, "margins")))

    def run_margins_dev(self, key: str) -> dict[str, Any]:  # margins on every row of the evaluation split
        return margins(self, key, self.dev_rows(key), previous=self.done.get(self.name(key, "margins-dev")))

    def run_accuracy_dev(self, key: str) -> dict[str, Any]:  # every prompt and context on the whole split
        ctx = {m: self.contexts[k] for m, k in ICL_K.items() if k in self.contexts}
        return accuracy_dev(self, key, self.dev_rows(key), ctx, previous=self.done.get(self.name(key, "accuracy-dev")))

    def dev_rows(self, key: str) -> list[Any]:
        """Every row of the task's evaluation split, encoded: the table's rows first."""
        files = sample(TASKS[key], self.a.train_n, 10**9, self.tmp / "dev")
        assert not isinstance(files, str), files
        rows = self.probe.encode_file(files[1])[0]
        assert [r.input_ids for r in rows[: len(self.eval_set)]] == [r.input_ids for r in self.eval_set]  # a superset
        return rows

    # ---- minilm-l6: no LM head, so no zero-shot, ICL or distillation (bench.compile_weights) ------------------
    def run_minilm_pt(self, key: str) -> dict[str, Any]:
        return encoder_pt(self, key, "minilm-pt", long=False)

    def run_minilm_ft(self, key: str) -> dict[str, Any]:
        return encoder_ft(self, key, long=False)

    def run_minilm_pt_long(self, key: str) -> dict[str, Any]:
        return encoder_pt(self, key, "minilm-pt-long", long=True)

    def run_minilm_ft_long(self, key: str) -> dict[str, Any]:
        return encoder_ft(self, key, long=True)

    def run_minilm_lora(self, key: str) -> dict[str, Any]:
        return encoder_ft(self, key, long=False, lora=True)

    def run_minilm_lora_long(self, key: str) -> dict[str, Any]:
        return encoder_ft(self, key, long=True, lora=True)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tasks", default="sst2,agnews,rte")
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--train-n", type=int, default=400, help="training rows of the fixed-seed sample")
    p.add_argument("--eval-n", type=int, default=200, help="evaluation rows of the fixed-seed sample")
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--sharp-temperature", type=float, default=0.25, help="distill-sharp's --teacher-temperature")
    p.add_argument("--tokens", type=int, default=TOKENS, help="soft tokens of the trained prompts (runs NAME@tN)")
    p.add_argument("--pt-lr", type=float, default=0.03)
    p.add_argument("--lora-lr", type=float, default=1e-3)
    p.add_argument("--ft-lr", type=float, default=2e-5)
    p.add_argument("--ft-steps", type=int, default=0, help="full fine-tuning's steps (0: --steps; fewer: timing only)")
    p.add_argument("--encoder-ft-lr", type=float, default=5e-5, help="minilm-l6 full fine-tuning's peak lr")
    p.add_argument("--hard-temperature", type=float, default=0.05, help="distill-deep-hard's --teacher-temperature")
    p.add_argument("--vocab-kl", type=float, default=1.0, help="distill-deep-vocab's --vocab-kl weight")
    p.add_argument("--deep-lr", type=float, default=0.01, help="the deep students' peak lr (distill-deep*)")
    p.add_argument("--alpha", type=float, default=0.5, help="distill-deep-alpha's weight of the labelled loss")
    p.add_argument("--deep-reparam", type=int, default=512, help="distill-deep-reparam's --deep-reparam width")
    p.add_argument("--long-steps", type=int, default=250, help="the *-long methods' steps")
    p.add_argument("--long-train-n", type=int, default=2000, help="the *-long methods' training rows (a superset)")
    p.add_argument("--latency-rows", type=int, default=8)
    p.add_argument("--margin-train-n", type=int, default=300, help="margins: training inputs to measure the fit on")
    p.add_argument("--out", default=str(ROOT / "runs" / "compile"), help="checkpoints and run files")
    p.add_argument("--results", default=str(RESULTS), help="the study's record (committed: a new machine resumes it)")
    redo = "methods of --methods to run again although recorded (the new record supersedes the old; the margins and"
    p.add_argument("--redo", default="", help=redo + " accuracy-dev rows keep what they measured of prompts now gone)")
    p.add_argument("--seed", type=int, default=0, help="the trained rows' seed (batches, init); > 0: runs NAME@sSEED")
    return p


def main(argv: list[str] | None = None) -> int:
    p = parser()
    a = p.parse_args(argv)
    a.methods = [m for m in a.methods.split(",") if m]
    bad = [m for m in a.methods if m not in METHODS]
    if bad:
        p.error(f"--methods: unknown {', '.join(bad)}; choose from {', '.join(METHODS)}")
    a.redo = [m for m in a.redo.split(",") if m]
    if stray := [m for m in a.redo if m not in a.methods]:
        p.error(f"--redo: {', '.join(stray)} not in --methods")
    if a.seed and (fixed := [m for m in a.methods if m in UNTRAINED]):
        p.error(f"--seed {a.seed}: {', '.join(fixed)} train nothing, a seed does not change them")
    os.environ.setdefault("SOFTPROMPT_TENSORBOARD", "0")
    torch.manual_seed(0)
    study = Study(a)
    for key in a.tasks.split(","):
        if key not in TASKS:
            p.error(f"--tasks: unknown {key}; choose from {', '.join(TASKS)}")
        study.task(key)
    shutil.rmtree(study.tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
