"""softprompt.serve.generation, without HTTP or a model: per-row decoding state (stop strings, streaming deltas,
seeded sampling) and the decode batch's bookkeeping (merge, keep, trimming of all-padding columns)."""

from __future__ import annotations

import torch
from transformers import DynamicCache

from softprompt.serve.generation import DecodeBatch, GenParams, GenRow


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
