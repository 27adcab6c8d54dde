"""softprompt.icl: k demonstrations in context, their K/V computed once, each row exactly the model's own forward
of [BOS] context input."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from softprompt.config import DataConfig
from softprompt.data import DataError, load_samples
from softprompt.icl import build_context, choose_demos, context_prefix, icl_evaluate
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
