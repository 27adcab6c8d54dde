"""softprompt.prefix: the forward path's data — left padding, stacking prompts into one Prefix, one prompt back out
of a stack, and the heads that score the pooled output (each checked against a hand-built expectation)."""

from __future__ import annotations

import pytest
import torch

from softprompt.prefix import (
    LinearHead,
    PerPromptHeads,
    Prefix,
    SimilarityHead,
    VerbalizerHead,
    left_pad,
    scores_by_head,
)


def _prefix(width: int, seed: int, *, kv: bool = True, layers: int = 2, deep: bool = False) -> Prefix:
    g = torch.Generator().manual_seed(seed)
    pairs = None
    if kv:
        pairs = [
            (torch.randn(1, 2, width, 4, generator=g), torch.randn(1, 2, width, 4, generator=g)) for _ in range(layers)
        ]
    return Prefix(torch.randn(1, width, 3, generator=g), torch.ones(1, width, dtype=torch.long),
                  torch.zeros(1, width, dtype=torch.long), torch.tensor([width]), pairs, deep)  # fmt: skip


def test_left_pad_pads_on_the_left_of_the_named_dimension_and_never_copies_a_wide_enough_tensor() -> None:
    t = torch.arange(6.0).view(1, 2, 3)  # pad dim -2 (the slots of (G, P, d))
    p = left_pad(t, 4, 2, value=-1)
    assert p.shape == (1, 4, 3)
    assert p[0, :2].eq(-1).all() and torch.equal(p[0, 2:], t[0])
    assert left_pad(t, 2, 2) is t  # nothing to pad: the very tensor, no copy
    m = left_pad(torch.ones(2, 3, dtype=torch.long), 5, 1)
    assert m.tolist() == [[0, 0, 1, 1, 1], [0, 0, 1, 1, 1]]


def test_stack_left_pads_every_part_and_only_gives_each_prompt_back_exactly() -> None:
    a, b, c = _prefix(2, 0), _prefix(5, 1), _prefix(3, 2)
    s = Prefix.stack([a, b, c])
    assert s.width == 5 and s.lengths.tolist() == [2, 5, 3]
    assert s.mask.tolist() == [[0, 0, 0, 1, 1], [1] * 5, [0, 0, 1, 1, 1]]
    assert s.embeds[0, :3].eq(0).all() and torch.equal(s.embeds[0, 3:], a.embeds[0])
    assert s.kv is not None and len(s.kv) == 2 and s.kv[1][0].shape == (3, 2, 5, 4)
    assert torch.equal(s.kv[1][1][2, :, 2:], c.kv[1][1][0])  # type: ignore[index]
    for g, part in enumerate((a, b, c)):
        back = s.only(g)
        assert torch.equal(back.embeds, part.embeds) and torch.equal(back.mask, part.mask)
        assert back.kv is not None and part.kv is not None
        assert all(torch.equal(x, y) for (x, _), (y, _) in zip(back.kv, part.kv, strict=True))
    assert s.nbytes() == sum(p.nbytes() for p in (a, b, c)) + (3 + 2) * 3 * 4 + 2 * 2 * (3 + 2) * 2 * 4 * 4


def test_stack_keeps_kv_only_when_every_part_has_it_and_refuses_to_drop_a_deep_prompt() -> None:
    s = Prefix.stack([_prefix(2, 0), _prefix(3, 1, kv=False)])
    assert s.kv is None and s.width == 3  # mixed: the concatenation path, which every prompt supports
    with pytest.raises(ValueError, match="deep prompt"):
        Prefix.stack([_prefix(2, 0, deep=True), _prefix(3, 1, kv=False)])


def test_per_prompt_heads_score_each_row_with_its_prompts_head() -> None:
    torch.manual_seed(0)
    heads = [LinearHead(4, 3), LinearHead(4, 3)]
    pooled = torch.randn(5, 4)
    rows = torch.tensor([1, 0, 1, 1, 0])
    out = PerPromptHeads(heads)(pooled, rows)
    for i, k in enumerate(rows.tolist()):
        torch.testing.assert_close(out[i], heads[k](pooled[i : i + 1])[0])
    torch.testing.assert_close(PerPromptHeads(heads)(pooled, None), heads[0](pooled))


def test_scores_by_head_equals_each_row_alone_and_keeps_the_row_order() -> None:
    torch.manual_seed(1)
    h2, h4 = LinearHead(4, 2), LinearHead(4, 4)
    pooled = torch.randn(4, 4)
    order = [h4, h2, h4, h2]
    out = scores_by_head(pooled, order)
    assert [s.shape[0] for s in out] == [4, 2, 4, 2]
    for i, h in enumerate(order):
        torch.testing.assert_close(out[i], h(pooled[i : i + 1])[0].float())


def test_verbalizer_and_similarity_heads_are_their_hand_computed_formulas() -> None:
    torch.manual_seed(2)
    w = torch.randn(10, 4)  # a stand-in output layer: vocabulary 10
    pooled = torch.randn(3, 4)
    v = VerbalizerHead(lambda h: h @ w.T, [7, 2])
    torch.testing.assert_close(v(pooled), (pooled @ w.T)[:, [7, 2]])
    assert v.num_labels == 2 and not list(v.parameters())
    labels = torch.randn(3, 4)
    s = SimilarityHead(labels, scale=5.0)
    cos = torch.nn.functional.cosine_similarity(pooled[:, None], labels[None], dim=-1)  # (N, L)
    torch.testing.assert_close(s(pooled), 5.0 * cos)
