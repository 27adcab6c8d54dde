"""softprompt.serve.pipeline, stage by stage and without HTTP: decode request (kind checks, inputs, generation
settings) -> collate -> predict -> unbatch -> encode response; and the rule that the forward path has one home:
no module outside prompted.py / prefix.py / arch.py concatenates attention masks, computes position ids or
expands prompt keys/values."""

from __future__ import annotations

import math
import re
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from serve_support import load, make_prompt
from tiny import tiny_model_dir

from softprompt.prefix import Prefix
from softprompt.serve import pipeline as pl
from softprompt.serve.errors import BadRequest, TooLarge, Unprocessable
from softprompt.serve.pipeline import Item, collate, stack_prefixes, unbatch
from softprompt.serve.registry import Registry

PACKAGE = Path(__file__).resolve().parent.parent / "softprompt"
FORWARD_HOMES = {"prompted.py", "prefix.py", "arch.py"}
FORWARD_PATTERNS = {
    "attention-mask concatenation": re.compile(r"torch\.cat\(\s*\[.*mask.*\]\s*,\s*(?:dim\s*=\s*)?-?1\s*\)"),
    "mask extension by padding": re.compile(r"F\.pad\(\s*[\w.]*mask[\w.\[\]]*\s*,\s*\(\s*0\s*,\s*1\s*\)"),
    "position ids from a mask": re.compile(r"(?:mask|attn)\w*(?:\[[^\]]*\])?\.cumsum\("),
    "position ids from prefix lengths": re.compile(r"lengths\[[^\]]*\]\[:, None\]\s*\+"),
    "prompt K/V expansion": re.compile(r"\b(?:k|v|keys|values)\w*\.expand\("),
}


def test_forward_path_lives_only_in_prompted() -> None:
    hits = []
    for path in sorted(PACKAGE.rglob("*.py")):
        if path.name in FORWARD_HOMES:
            continue
        for n, line in enumerate(path.read_text().splitlines(), 1):
            for what, pattern in FORWARD_PATTERNS.items():
                if pattern.search(line):
                    hits.append(f"{path.relative_to(PACKAGE)}:{n}: {what}: {line.strip()}")
    assert not hits, "\n".join(hits)
    # the patterns do find the forward path where it lives
    prompted = (PACKAGE / "prompted.py").read_text()
    for what in ("attention-mask concatenation", "position ids from a mask", "prompt K/V expansion"):
        assert FORWARD_PATTERNS[what].search(prompted), what


# ---- decode request ---------------------------------------------------------------------------------------
def entry(**kw: Any) -> Any:
    base = {"name": "qa", "kind": "generate", "prefix_len": 5, "labels": None}
    return SimpleNamespace(**{**base, **kw})


def test_check_kind_names_the_other_endpoint() -> None:
    e = entry()
    assert pl.check_kind(e, "generate", "task") is e
    with pytest.raises(BadRequest, match=r"'qa' is a generate task: use /v1/generate"):
        pl.check_kind(e, "classify", "task")
    with pytest.raises(BadRequest, match=r"is a classify task: use /v1/classify"):
        pl.check_kind(entry(kind="classify"), "generate", "model")
    with pytest.raises(BadRequest, match="encoder: it cannot generate"):
        pl.check_kind(e, "generate", "task", family="encoder")


def test_gen_params_checks_limits_and_stop_strings() -> None:
    kw: dict[str, Any] = {"max_new_tokens": 64, "position_limit": 40}
    p = pl.gen_params(entry(), 10, 8, 0.0, 1.0, "\n", 3, "max_new_tokens", **kw)
    assert (p.max_new_tokens, p.stop, p.seed, p.greedy) == (8, ("\n",), 3, True)
    with pytest.raises(Unprocessable, match="at most 64") as e:
        pl.gen_params(entry(), 10, 65, 0.0, 1.0, None, None, "max_tokens", **kw)
    assert e.value.param == "max_tokens"
    with pytest.raises(TooLarge, match=r"prompt \(5\) \+ input \(30\) \+ max_new_tokens \(8\)"):
        pl.gen_params(entry(), 30, 8, 0.0, 1.0, None, None, "max_new_tokens", **kw)
    for stop in ("", ["x"] * 17, "y" * 1001, "\ud800"):
        with pytest.raises(Unprocessable) as e:
            pl.gen_params(entry(), 1, 1, 0.0, 1.0, stop, None, "max_new_tokens", **kw)
        assert e.value.param == "stop"
    with pytest.raises(Unprocessable) as e:
        pl.gen_params(entry(), 1, 1, 0.0, 1.0, None, 2**64, "max_new_tokens", **kw)
    assert e.value.param == "seed"


def test_encode_inputs_names_each_input() -> None:
    seen = []

    class Reg:
        def encode(self, e: Any, x: Any, param: str) -> list[int]:
            seen.append(param)
            return [len(x)]

    assert pl.encode_inputs(Reg(), entry(), ["ab", "c"], "inputs") == [[2], [1]]  # type: ignore[arg-type]
    assert pl.encode_inputs(Reg(), entry(), ["abc"], "input", single=True) == [[3]]  # type: ignore[arg-type]
    assert seen == ["inputs.0", "inputs.1", "input"]


# ---- collate -> predict -> unbatch, on a model ------------------------------------------------------------
@pytest.fixture(scope="module")
def reg(tmp_path_factory: pytest.TempPathFactory) -> Registry:
    root = tmp_path_factory.mktemp("pipe")
    d = tiny_model_dir("llama", root / "tiny")
    bb = load(d)
    prompts = root / "prompts"
    prompts.mkdir()
    make_prompt(prompts / "a.safetensors", bb, d, tokens=3, seed=1)
    make_prompt(
        prompts / "b.safetensors", bb, d, tokens=5, seed=2, labels=["x", "y", "z"], words=["no", "very yes", "z"]
    )
    make_prompt(prompts / "c.safetensors", bb, d, tokens=2, seed=3, head="linear", linear_head=True)
    return Registry(bb, prompts)


def test_collate_predict_unbatch_equal_each_row_alone(reg: Registry) -> None:
    a, b, c = (reg.get(n) for n in "abc")
    rows = [(a, [5, 6, 7]), (b, [8]), (c, [9, 10]), (a, [11]), (b, [12, 13, 14, 15])]
    batch, prow, prefix = pl.collate_rows(reg, rows)
    assert prow.tolist() == [0, 1, 2, 0, 1] and prefix.mask.shape[0] == 3  # one prefix per distinct prompt
    assert batch.mask.tolist()[1] == [0, 0, 0, 1]  # decoder rows left-padded
    entries = [e for e, _ in rows]
    scores = pl.predict(reg.pm, prefix, prow, batch, entries)
    assert [len(s) for s in scores] == [2, 3, 2, 2, 3]
    for (e, ids), got in zip(rows, scores, strict=True):  # each row alone, through label_scores with its own head
        one = reg.pm.collate([ids])
        with torch.no_grad():
            want = reg.pm.label_scores(reg.prefix(e), None, one, e.label_ids, head=e.head)[0]
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    results = pl.to_results(entries, scores)
    assert results[1]["probabilities"].keys() == {"x", "y", "z"}
    assert math.isclose(sum(results[1]["probabilities"].values()), 1.0, rel_tol=1e-6)
    for got, want in zip(pl.classify_rows(reg, rows, max_batch_size=2), results, strict=True):  # chunked: the same
        assert got["label"] == want["label"] and got["probabilities"] == pytest.approx(want["probabilities"])
    assert pl.unbatch(results, [2, 3])[1] == results[2:]


def test_to_results_refuses_non_finite_scores() -> None:
    e = entry(name="s", labels=["neg", "pos"])
    (r,) = pl.to_results([e], [torch.tensor([0.0, 2.0])])
    assert r["label"] == "pos" and r["probabilities"]["pos"] > 0.8
    with pytest.raises(FloatingPointError, match="task 's': the model gave non-finite scores"):
        pl.to_results([e], [torch.tensor([float("nan"), 0.0])])


# ---- encode response --------------------------------------------------------------------------------------
def test_encode_responses() -> None:
    res = {"text": "Paris", "finish_reason": "stop", "input_tokens": 4, "output_tokens": 2, "tokens": [1, 2]}
    assert pl.generate_response("qa", res) == {
        "task": "qa", "output": "Paris", "finish_reason": "stop", "usage": {"input_tokens": 4, "output_tokens": 2}
    }  # fmt: skip
    assert pl.generate_event("qa", {"delta": "Pa"}) == {"task": "qa", "delta": "Pa"}
    assert pl.generate_event("qa", {"done": True, **res})["output"] == "Paris"
    chunk = pl.completion_chunk("cmpl-1", 7, "qa", {"delta": "Pa"})
    assert chunk == {"id": "cmpl-1", "object": "text_completion", "created": 7, "model": "qa",
                     "choices": [{"text": "Pa", "index": 0, "logprobs": None, "finish_reason": None}]}  # fmt: skip
    last = pl.completion_chunk("cmpl-1", 7, "qa", {"done": True, **res})
    assert last["usage"] == {"prompt_tokens": 4, "completion_tokens": 2, "total_tokens": 6}
    out = pl.generate_completion("cmpl-1", 7, "qa", [res, res])
    assert [c["index"] for c in out["choices"]] == [0, 1] and out["usage"]["total_tokens"] == 12
    cls = pl.classify_completion("cmpl-2", 7, "s", [[1, 2], [3]], [{"label": "pos"}, {"label": "neg"}])
    assert [c["text"] for c in cls["choices"]] == ["pos", "neg"] and cls["usage"]["completion_tokens"] == 2
    assert pl.classify_response("s", []) == {"task": "s", "results": []}


def test_ensemble_results_mean_and_vote() -> None:
    labels = ["neg", "pos"]
    members = [
        [{"probabilities": {"neg": 0.9, "pos": 0.1}}],
        [{"probabilities": {"neg": 0.4, "pos": 0.6}}],
        [{"probabilities": {"neg": 0.45, "pos": 0.55}}],
    ]
    (mean,) = pl.ensemble_results(labels, members, "mean")
    assert mean["label"] == "neg" and mean["probabilities"]["neg"] == pytest.approx((0.9 + 0.4 + 0.45) / 3)
    (vote,) = pl.ensemble_results(labels, members, "vote")
    assert vote["label"] == "pos" and vote["probabilities"]["pos"] == pytest.approx(2 / 3, abs=1e-5)


def test_scheduler_kv_cache_setting_reaches_the_decoder(reg: Registry) -> None:
    """`--no-kv-cache` (or a benchmark switching it on a running scheduler) applies to generation too."""
    from softprompt.serve import Scheduler

    s = Scheduler(reg, kv_cache=False)
    assert not s.kv_cache and not s.decoder.kv_cache
    s.kv_cache = True
    assert s.decoder.kv_cache


# collate / unbatch / stack_prefixes: the pure stages, on hand-made items and prefixes


def test_collate_left_pads_and_indexes_tasks_in_first_seen_order() -> None:
    items = [Item("b", [5, 6, 7]), Item("a", [1]), Item("b", [8, 9]), Item("c", [2, 3, 4, 5])]
    batch, rows, tasks = collate(items, pad_id=0, left=True)
    assert tasks == ["b", "a", "c"]
    assert rows.tolist() == [0, 1, 0, 2]
    assert batch.ids.tolist() == [[0, 5, 6, 7], [0, 0, 0, 1], [0, 0, 8, 9], [2, 3, 4, 5]]
    assert batch.mask.tolist() == [[0, 1, 1, 1], [0, 0, 0, 1], [0, 0, 1, 1], [1, 1, 1, 1]]


def test_collate_right_pads_for_encoders_and_is_pure() -> None:
    items = [Item(1, [5, 6, 7]), Item(2, [1])]
    before = [list(i.input_ids) for i in items]
    batch, rows, tasks = collate(items, pad_id=9, left=False)
    assert batch.ids.tolist() == [[5, 6, 7], [1, 9, 9]] and batch.mask.tolist() == [[1, 1, 1], [1, 0, 0]]
    assert rows.tolist() == [0, 1] and tasks == [1, 2]
    assert [list(i.input_ids) for i in items] == before
    again, _, _ = collate(items, pad_id=9, left=False)
    assert torch.equal(again.ids, batch.ids)
    with pytest.raises(ValueError):
        collate([], pad_id=0, left=True)


def test_unbatch_splits_rows_back_per_request() -> None:
    assert unbatch(list("abcdef"), [2, 1, 3]) == [["a", "b"], ["c"], ["d", "e", "f"]]
    assert unbatch([], []) == []
    with pytest.raises(ValueError):
        unbatch([1, 2], [3])


def _prefix(width: int, fill: float, layers: int = 2) -> Prefix:
    kv = [(torch.full((1, 2, width, 4), fill), torch.full((1, 2, width, 4), -fill)) for _ in range(layers)]
    return Prefix(torch.full((1, width, 3), fill), torch.ones(1, width, dtype=torch.long),
                  torch.zeros(1, width, dtype=torch.long), torch.tensor([width]), kv)  # fmt: skip


def test_stack_prefixes_left_pads_per_task_caches() -> None:
    a, b = _prefix(2, 1.0), _prefix(4, 2.0)
    assert stack_prefixes([a]) is a  # one task: its own prefix, broadcast without a copy
    s = stack_prefixes([a, b])
    assert s.mask.tolist() == [[0, 0, 1, 1], [1, 1, 1, 1]] and s.lengths.tolist() == [2, 4]
    assert s.kv is not None and s.kv[0][0].shape == (2, 2, 4, 4)
    assert s.kv[0][0][0, 0, :, 0].tolist() == [0, 0, 1, 1]
    assert s.nbytes() == a.nbytes() + b.nbytes() + 2 * 3 * 4 + 2 * 2 * (2 * 2 * 4) * 4  # plus the padding
