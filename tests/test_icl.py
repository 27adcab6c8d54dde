"""softprompt.icl: k demonstrations in context, their K/V computed once, each row exactly the model's own forward
of [BOS] context input."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from softprompt.cli import main
from softprompt.config import DataConfig
from softprompt.data import DataError, load_samples
from softprompt.icl import build_context, choose_demos, context_prefix, icl_evaluate, self_study, text_context
from softprompt.models import Backbone
from softprompt.prompted import PromptedModel
from softprompt.task import BoundTask, TaskSpec

WORDS = ["good", "great", "bad", "awful", "fine", "nice", "poor", "dull"]


def write(path: Path, n: int, offset: int = 0) -> Path:
    rows = [{"text": f"{WORDS[(i * 3) % 8]} film {i + offset}", "label": "a" if i % 3 else "b"} for i in range(n)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def spec() -> TaskSpec:
    return TaskSpec.from_config(DataConfig(template="Review: {text}\nAnswer:", labels="a=yes,b=no"))


def test_demos_are_seeded_and_balanced(tmp_path: Path) -> None:
    samples = load_samples(str(write(tmp_path / "d.jsonl", 12)), spec().data_config(), spec().verbalizer)
    a = choose_demos(samples, 6, seed=1)
    assert [s.text for s in a] == [s.text for s in choose_demos(samples, 6, seed=1)]
    assert [s.text for s in a] != [s.text for s in choose_demos(samples, 6, seed=2)]
    bal = choose_demos(samples, 6, seed=1, balanced=True)
    assert [s.label for s in bal] == [0, 1, 0, 1, 0, 1]  # round-robin over the classes
    with pytest.raises(DataError, match="--k 13: the demonstrations file has only 12 examples"):
        choose_demos(samples, 13)


def test_each_row_scores_as_the_models_own_forward_of_bos_context_input(
    tmp_path: Path, sharp_backbone: Callable[[str], Backbone]
) -> None:
    bb = sharp_backbone("llama")
    pm = PromptedModel(bb)
    task = BoundTask(spec(), pm, num_tokens=0)
    samples = load_samples(str(write(tmp_path / "d.jsonl", 8)), spec().data_config(), spec().verbalizer)
    ctx = build_context(task, choose_demos(samples, 4, seed=0, balanced=True))
    assert ctx.text.count("\n\n") == 4 and ctx.text.endswith(("Answer: yes\n\n", "Answer: no\n\n"))
    prefix = context_prefix(pm, ctx)
    assert prefix.kv is not None and prefix.width == 1 + len(ctx.token_ids)  # the context's K/V, computed once
    enc, _, _ = task.encode_file(str(write(tmp_path / "e.jsonl", 5, offset=100)))
    with torch.no_grad():
        got = pm.label_scores(prefix, None, pm.collate([e.input_ids for e in enc]), task.label_ids)
        for i, e in enumerate(enc):
            ids = torch.tensor([pm.prefix_ids + ctx.token_ids + e.input_ids])
            logp = bb.model(input_ids=ids).logits[0, -1].float().log_softmax(-1)
            torch.testing.assert_close(got[i], logp[[v[0] for v in task.label_ids]], rtol=0, atol=1e-4)


def test_icl_evaluate_reports_the_context_and_refuses_shared_examples(
    tmp_path: Path, tiny_backbone: Callable[[str], Backbone]
) -> None:
    demos, evals = write(tmp_path / "d.jsonl", 8), write(tmp_path / "e.jsonl", 6, offset=100)
    m = icl_evaluate(tiny_backbone("llama"), spec(), str(evals), str(demos), 4, seed=3, balanced=True)
    assert m["n"] == 6 and m["k"] == 4 and m["context_tokens"] > 0 and len(m["context_sha256"]) == 64
    zero = icl_evaluate(tiny_backbone("llama"), spec(), str(evals), str(demos), 0)
    assert zero["k"] == 0 and zero["context_tokens"] == 0
    with pytest.raises(DataError, match="shares examples"):
        icl_evaluate(tiny_backbone("llama"), spec(), str(demos), str(demos), 2)


# ---- `softprompt eval --icl-demos` ----------------------------------------------------------------------------
def test_cli_icl_eval_scores_each_row_as_the_models_own_forward(
    tmp_path: Path, sharp_backbone: Callable[[str], Backbone], tiny_models_root: Path, capsys
) -> None:
    bb = sharp_backbone("llama")
    demos, evals = write(tmp_path / "d.jsonl", 8), write(tmp_path / "e.jsonl", 6, offset=100)
    (tmp_path / "instr.txt").write_text("Answer yes for a good film.")
    argv = ["eval", "--icl-demos", str(demos), "--k", "4", "--icl-balanced", "--icl-seed", "3", "--data",
            str(evals), "--model", str(tiny_models_root / "sharp-llama"), "--device", "cpu",
            "--template", r"Review: {text}\nAnswer:", "--labels", "a=yes,b=no",
            "--icl-instructions", str(tmp_path / "instr.txt")]  # fmt: skip
    capsys.readouterr()
    assert main(argv) == 0
    m = json.loads(capsys.readouterr().out)
    assert m["k"] == 4 and m["balanced"] and m["seed"] == 3 and m["n"] == 6
    # the context, rebuilt by hand: instructions, then the seeded balanced demonstrations with their label words
    samples = load_samples(str(demos), spec().data_config(), spec().verbalizer)
    shown = choose_demos(samples, 4, seed=3, balanced=True)
    text = "Answer yes for a good film.\n\n" + "".join(f"{s.text} {'yes' if s.label == 0 else 'no'}\n\n" for s in shown)
    assert m["context_sha256"] == hashlib.sha256(text.encode()).hexdigest()
    pm = PromptedModel(bb)
    words = [v[0] for v in BoundTask(spec(), pm, num_tokens=0).label_ids]
    right = 0
    with torch.no_grad():
        for line in evals.read_text().splitlines():
            r = json.loads(line)
            ids = (
                pm.prefix_ids
                + bb.tokenizer(text + f"Review: {r['text']}\nAnswer:", add_special_tokens=False)["input_ids"]
            )
            pred = int(bb.model(input_ids=torch.tensor([ids])).logits[0, -1][words].argmax())
            right += ["a", "b"][pred] == r["label"]
    assert m["accuracy"] == pytest.approx(right / 6)


def test_cli_icl_eval_bad_input_is_one_line_naming_the_flag(tmp_path: Path, tiny_models_root: Path, capsys) -> None:
    demos, evals = write(tmp_path / "d.jsonl", 8), write(tmp_path / "e.jsonl", 6, offset=100)
    model = str(tiny_models_root / "sharp-llama")
    base = ["eval", "--data", str(evals), "--device", "cpu", "--labels", "a=yes,b=no"]
    cases = [
        ([], "--prompt: a prompt file is required (or --icl-demos FILE for the ICL baseline)"),
        (["--icl-demos", str(demos)], "--icl-demos: --model is required"),
        (["--icl-demos", str(demos), "--model", model, "--prompt", "p.safetensors"], "drop --prompt"),
        (["--icl-demos", str(tmp_path / "no.jsonl"), "--model", model], "--icl-demos: file not found"),
        (["--icl-demos", str(demos), "--model", model, "--k", "9"],
         f"--k 9: the --icl-demos file {demos} has only 8 labelled examples"),
    ]  # fmt: skip
    for extra, want in cases:
        capsys.readouterr()
        rc = main([*base, *extra])
        err = capsys.readouterr().err.strip().splitlines()
        assert rc == 2 and len(err) == 1 and want in err[0], err


# ---- self-study ------------------------------------------------------------------------------------------
def test_self_study_is_seeded_follows_the_template_and_feeds_the_distill_loss(
    tmp_path: Path, sharp_backbone: Callable[[str], Backbone]
) -> None:
    bb = sharp_backbone("llama")
    pm = PromptedModel(bb)
    two = TaskSpec.from_config(DataConfig(template="Premise: {a}\nClaim: {b}\nAnswer:", labels="a=yes,b=no"))
    ctx = text_context(pm, "Premise: a good film\nClaim: it is good\nAnswer: yes\n\n")
    before = torch.random.get_rng_state()
    a = self_study(pm, ctx, two, 5, seed=1, max_new_tokens=6)
    assert torch.equal(torch.random.get_rng_state(), before)  # the caller's RNG is left alone
    assert a == self_study(pm, ctx, two, 5, seed=1, max_new_tokens=6)
    assert a != self_study(pm, ctx, two, 5, seed=2, max_new_tokens=6)
    for t in a:  # every field sampled, the literals in place
        assert t.startswith("Premise: ") and t.endswith("\nAnswer:") and t.count("\n") == 2 and "\nClaim: " in t
    # what the model writes is what the distillation objective trains on: [BOS][context][prefix of the row]
    # continues as the model's own sampling from the same state would
    task = BoundTask(two, pm, num_tokens=0)
    rows, _ = task.encode_texts(a)
    assert [r.input_ids for r in rows] == [pm.encode_input(t) for t in a] and all(r.label is None for r in rows)
    with pytest.raises(DataError, match="--self-study"):
        self_study(pm, text_context(pm, ""), two, 2)


def test_self_study_leaves_a_literals_trailing_space_to_the_model(sharp_backbone: Callable[[str], Backbone]) -> None:
    """A template literal that ends in a space ("Review: {text}") is tokenized without it: the model writes the
    space as its next word's leading space, as after "Review:" in the demonstrations (a BPE tokenizer makes a bare
    space a token of its own there); each row keeps the template's text."""

    class Spy:  # the tokenizer, recording what self_study tokenizes
        def __init__(self, tok) -> None:
            self.tok, self.texts = tok, []

        def __call__(self, text, **kw):
            self.texts.append(text)
            return self.tok(text, **kw)

        def __getattr__(self, name):
            return getattr(self.tok, name)

    pm = PromptedModel(sharp_backbone("llama"))
    spec = TaskSpec.from_config(DataConfig(template="Review: {text}\nAnswer:", labels="a=yes,b=no"))
    ctx = text_context(pm, "Review: a good film\nAnswer: yes\n\n")
    spy = Spy(pm.tok)
    pm.tok = spy  # type: ignore[assignment]
    out = self_study(pm, ctx, spec, 3, seed=0, max_new_tokens=4)
    assert spy.texts and set(spy.texts) == {"Review:"}
    assert all(t.startswith("Review: ") and not t.startswith("Review:  ") and t.endswith("\nAnswer:") for t in out)
