"""The pure parts of softprompt.serve, without HTTP or a model: collate/unbatch, task names, the Prometheus text
format, per-row decoding state (stop strings, streaming deltas, sampling), and the decode-batch bookkeeping."""

from __future__ import annotations

import pytest
import torch
from transformers import DynamicCache

from softprompt.prompted import Prefix
from softprompt.serve import Item, collate, unbatch, validate_name
from softprompt.serve.errors import Unprocessable
from softprompt.serve.generation import DecodeBatch, GenParams, GenRow
from softprompt.serve.metrics import Metrics
from softprompt.serve.pipeline import stack_prefixes


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


@pytest.mark.parametrize("name", ["sentiment", "a", "task-0001", "qa.v2", "A_b-c.d", "x" * 64])
def test_valid_task_names(name: str) -> None:
    assert validate_name(name) == name


@pytest.mark.parametrize("name", ["", ".hidden", "..", "a..b", "a/b", "a\\b", "../x", "x" * 65, "a b", "-x",
                                  "t.safetensors", "caf\u00e9", "a\x00"])  # fmt: skip
def test_invalid_task_names(name: str) -> None:
    with pytest.raises(Unprocessable):
        validate_name(name)


def test_prometheus_text_format() -> None:
    m = Metrics()
    m.counter("req_total", "Requests.")
    m.histogram("lat_seconds", "Latency.", [0.1, 1.0])
    m.gauge("depth", "Queue depth.", lambda: 3)
    m.inc("req_total", {"task": 'a"b\\c\nd', "code": "200"})
    m.inc("req_total", {"task": 'a"b\\c\nd', "code": "200"}, 2)
    for v in (0.05, 0.1, 0.5, 5.0):
        m.observe("lat_seconds", v, {"task": "x"})
    text = m.render()
    assert "# TYPE req_total counter" in text and "# TYPE lat_seconds histogram" in text
    assert 'req_total{code="200",task="a\\"b\\\\c\\nd"} 3' in text
    assert 'lat_seconds_bucket{task="x",le="0.1"} 2' in text  # le: upper bound inclusive
    assert 'lat_seconds_bucket{task="x",le="1"} 3' in text
    assert 'lat_seconds_bucket{task="x",le="+Inf"} 4' in text
    assert 'lat_seconds_count{task="x"} 4' in text and 'lat_seconds_sum{task="x"} 5.65' in text
    assert "depth 3" in text and text.endswith("\n")
    assert m.value("lat_seconds", {"task": "x"}) == 4


def _decode(ids: list[int]) -> str:
    return " ".join(f"w{i}" for i in ids)


def test_gen_row_stop_strings_deltas_and_finish() -> None:
    row = GenRow(None, GenParams(max_new_tokens=10, stop=("w3",)), frozenset({99}), pad_id=0)
    deltas = [row.advance(t, _decode) for t in (1, 2, 3)]
    assert row.finish == "stop" and row.output == "w1 w2"
    assert "".join(d for d in deltas if d) == "w1 w2"  # text that could start a stop string is held back
    row = GenRow(None, GenParams(max_new_tokens=2), frozenset({99}), pad_id=0)
    assert row.advance(5, _decode) == "w5" and row.finish is None
    assert row.advance(6, _decode) == " w6" and row.finish == "length"
    row = GenRow(None, GenParams(max_new_tokens=5), frozenset({99}), pad_id=0)
    row.advance(0, _decode)  # pad ids are dropped from the text, as generate_ids does
    row.advance(99, _decode)
    assert row.finish == "stop" and row.output == "" and row.tokens == [0]


def test_gen_row_sampling_is_seeded_per_request() -> None:
    logits = torch.randn(50, generator=torch.Generator().manual_seed(0))

    def draw(seed: int, **kw: float) -> list[int]:
        row = GenRow(None, GenParams(temperature=1.0, seed=seed, **kw), frozenset(), pad_id=0)  # type: ignore[arg-type]
        return [row.choose(logits) for _ in range(20)]

    assert draw(1) == draw(1) != draw(2)
    assert set(draw(3, top_p=1e-9)) == {int(logits.argmax())}
    greedy = GenRow(None, GenParams(), frozenset(), pad_id=0)
    assert greedy.choose(logits) == int(logits.argmax())


def _state(lengths: list[int], fill: float) -> DecodeBatch:
    S = max(lengths)
    mask = torch.tensor([[0] * (S - n) + [1] * n for n in lengths])
    k = torch.full((len(lengths), 2, S, 4), fill) * mask[:, None, :, None]
    rows = [GenRow(i, GenParams(), frozenset(), 0) for i in range(len(lengths))]
    return DecodeBatch(DynamicCache(ddp_cache_data=[(k, -k)]), mask, torch.tensor(lengths), rows)


def test_decode_batch_merge_and_keep() -> None:
    a, b = _state([3, 2], 1.0), _state([5], 2.0)
    m = DecodeBatch.merge([a, None, b])
    assert m is not None and m.n == 3 and m.mask.shape == (3, 5)
    assert m.mask.tolist() == [[0, 0, 1, 1, 1], [0, 0, 0, 1, 1], [1, 1, 1, 1, 1]]
    assert m.layers()[0][0][:, 0, :, 0].tolist() == [[0, 0, 1, 1, 1], [0, 0, 0, 1, 1], [2, 2, 2, 2, 2]]
    assert m.pos.tolist() == [3, 2, 5] and [r.owner for r in m.rows] == [0, 1, 0]
    kept = m.keep([0, 1])  # the longest row left: the all-padding columns are trimmed
    assert kept is not None and kept.mask.tolist() == [[1, 1, 1], [0, 1, 1]]
    assert kept.layers()[0][1].shape == (2, 2, 3, 4)
    assert m.keep([]) is None and DecodeBatch.merge([None]) is None
