"""softprompt.layers: a decoder run in parts with the model's own forward, against the model's own whole forward
(`output_hidden_states`, `last_hidden_state`) and against a prefix without the hidden slots."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from serve_support import lively_model_dir
from transformers import DynamicCache

from softprompt.layers import decoder_layers, forward_from, hidden_keys, replace_at, self_attention, stop_before
from softprompt.models import Backbone, load_backbone
from softprompt.prompted import PromptedModel


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("layers")


def backbone(kind: str, root: Path) -> Backbone:
    return load_backbone(str(lively_model_dir(kind, root)), progress=False)


def ids(pm: PromptedModel) -> torch.Tensor:
    return torch.tensor([pm.prefix_ids + pm.encode_input("hello world how are you")])


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_stop_before_and_forward_from_are_the_whole_forward_in_two_parts(kind: str, root: Path) -> None:
    bb = backbone(kind, root)
    pm = PromptedModel(bb)
    base = bb.model.base_model
    x = pm.embed(ids(pm))  # (1, T, d)
    pos = torch.arange(x.shape[1])[None]
    with torch.no_grad():
        whole = base(inputs_embeds=x, position_ids=pos, output_hidden_states=True)
        seen: list[torch.Tensor] = []
        with stop_before(base, 1, seen):
            base(inputs_embeds=x, position_ids=pos)
        torch.testing.assert_close(seen[0], whole.hidden_states[1])  # what enters layer 1
        cache = pm.build_prefix([None], kv=True).kv  # a cache with every layer (the mask reads layer 0's length)
        assert cache is not None
        # entering at layer 1 with the states of the tokens after the lead one, behind the lead token's cache
        rest = forward_from(base, 1, seen[0][:, 1:], position_ids=pos[:, 1:],
                            cache=DynamicCache(ddp_cache_data=cache), use_cache=True)  # fmt: skip
    torch.testing.assert_close(rest.last_hidden_state, whole.last_hidden_state[:, 1:], atol=1e-5, rtol=1e-5)


def test_replace_at_swaps_a_layers_input(root: Path) -> None:
    bb = backbone("llama", root)
    pm = PromptedModel(bb)
    base = bb.model.base_model
    x = pm.embed(ids(pm))
    new = torch.randn(2, x.shape[-1], generator=torch.Generator().manual_seed(0))
    seen: list[torch.Tensor] = []
    with torch.no_grad(), replace_at(base, 1, 2, new):
        with stop_before(base, 1, seen):  # registered after replace_at: sees layer 1's input after the swap
            base(inputs_embeds=x)
        swapped = base(inputs_embeds=x, output_hidden_states=True).hidden_states
    with torch.no_grad():
        plain = base(inputs_embeds=x, output_hidden_states=True).hidden_states
    torch.testing.assert_close(seen[0][0, 2:4], new)  # positions 2, 3 replaced
    torch.testing.assert_close(seen[0][:, :2], plain[1][:, :2])  # the others as computed
    torch.testing.assert_close(seen[0][:, 4:], plain[1][:, 4:])
    assert not torch.allclose(swapped[2], plain[2])  # what layer 1 puts out changed


def test_hidden_keys_equal_a_prefix_without_the_slots(root: Path) -> None:
    """Two extra prefix slots hidden from every layer: the same hidden states as the prefix without them (the slots'
    positions are kept, so the reference puts the input at the same positions)."""
    bb = backbone("llama", root)
    pm = PromptedModel(bb)
    base = bb.model.base_model
    extra = pm.embed(torch.tensor([7, 8]))
    wide = pm.build_prefix([extra], kv=True)  # [lead][2 slots]
    narrow = pm.build_prefix([None], kv=True)  # [lead]
    b = pm.collate([pm.encode_input("hello world how are you")])
    n = len(decoder_layers(base)[1])
    starts = torch.tensor([[0, n, n]])  # the two slots start above the last layer: hidden everywhere
    with torch.no_grad(), hidden_keys(base, starts):
        got = pm.run_decoder(wide, None, b.ids, b.mask, keep_cache=False).hidden
    assert narrow.kv is not None
    pos = torch.arange(3, 3 + b.ids.shape[1])[None]  # the input after the (hidden) slots, as in `wide`
    with torch.no_grad():
        ref = base(inputs_embeds=pm.embed(b.ids), position_ids=pos, cache=DynamicCache(ddp_cache_data=narrow.kv),
                   use_cache=True).last_hidden_state  # fmt: skip
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)
    with torch.no_grad():  # not hidden: the slots change the result
        seen = pm.run_decoder(wide, None, b.ids, b.mask, keep_cache=False).hidden
    assert (seen - ref).abs().max() > 1e-3
    assert type(self_attention(decoder_layers(base)[1][0])).__name__ == "LlamaAttention"
