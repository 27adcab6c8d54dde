"""Pure batching for the server: requests of many tasks -> one padded batch with a prompt index per row, and back.

`collate` and `unbatch` are pure functions (no model, no I/O) so the batching rules are unit-tested on their own.
The model side (class scores of a batch whose rows belong to different tasks, each with its own verbalizer or head)
is PromptedModel.row_scores, the one forward path; softprompt.serve.pipeline calls it.

Row layout follows softprompt.prompted exactly: decoder-only inputs are left-padded, encoder inputs right-padded,
and each row sits behind its own task's prefix (`rows[i]` indexes the stacked Prefix), so a row's scores equal
what `softprompt predict` computes for that input and prompt alone (up to float rounding of the padded matmuls).
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from softprompt.data import pad_left, pad_right
from softprompt.prompted import Batch, Prefix


@dataclass(frozen=True)
class Item:
    """One row to run: the task it belongs to (any hashable key) and its encoded input ids."""

    task: Hashable
    input_ids: list[int]


def collate(items: Sequence[Item], *, pad_id: int, left: bool) -> tuple[Batch, torch.Tensor, list[Hashable]]:
    """Pad the rows of a mixed-task batch (pure: no model call).

    Returns the Batch (left-padded for decoder-only models, right-padded otherwise), `rows` (N,) the index of each
    row's task in `tasks`, and `tasks`: the distinct task keys in first-seen order. The caller stacks one Prefix per
    entry of `tasks` (`Prefix.stack`), so `rows` indexes that stacked prefix.
    """
    if not items:
        raise ValueError("collate: no items")
    tasks: list[Hashable] = []
    index: dict[Hashable, int] = {}
    rows = []
    for it in items:
        if it.task not in index:
            index[it.task] = len(tasks)
            tasks.append(it.task)
        rows.append(index[it.task])
    seqs = [list(it.input_ids) for it in items]
    ids, mask = (pad_left if left else pad_right)(seqs, pad_id)
    return Batch(ids, mask), torch.tensor(rows, dtype=torch.long), tasks


def unbatch(values: Sequence[Any], sizes: Sequence[int]) -> list[list[Any]]:
    """Split per-row results back into per-request lists (`sizes[r]` rows for request r, in order)."""
    if sum(sizes) != len(values):
        raise ValueError(f"unbatch: {len(values)} values for requests of {sum(sizes)} rows")
    out, at = [], 0
    for n in sizes:
        out.append(list(values[at : at + n]))
        at += n
    return out


def stack_prefixes(parts: Sequence[Prefix]) -> Prefix:
    """One Prefix for the distinct tasks of a batch; a single task keeps its own (G=1: K/V broadcast, no copy)."""
    return parts[0] if len(parts) == 1 else Prefix.stack(list(parts))


def select(batch: Batch, idx: torch.Tensor) -> Batch:
    return Batch(batch.ids[idx], batch.mask[idx])
