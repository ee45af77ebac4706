"""A running batch of sequences that share one left-padded KV cache.

Sequences join after their own prefill (no padding inside a prefill, so no fully-masked query rows)
and leave the moment they finish; the batch is re-padded on the left to the longest cache. This is
continuous batching at token granularity on top of transformers' `DynamicCache`. Rows can also be split
off into a batch of their own and merged back (the engine steps urgent rows apart, see `engine`).
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from typing import Any, Generic, TypeVar

import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

from slimserve.server.kv_cache import GrowingKVLayer, growing_cache

R = TypeVar("R", bound=Hashable)


class PaddedKVBatch:
    """KV cache rows plus the attention mask (B, T) that marks which cache columns are real."""

    def __init__(self) -> None:
        self.cache: DynamicCache | None = None
        self.mask = torch.zeros(0, 0, dtype=torch.long)

    @property
    def size(self) -> int:
        return int(self.mask.shape[0])

    @property
    def length(self) -> int:
        return int(self.mask.shape[1])

    def add(self, cache: DynamicCache) -> None:
        """Append one prefilled sequence (batch of 1, no padding) as the last row."""
        _check_positional(cache)
        joining = PaddedKVBatch()
        joining.cache, joining.mask = cache, torch.ones(1, cache.get_seq_length(), dtype=torch.long)
        self.merge(joining)

    def merge(self, other: PaddedKVBatch) -> None:
        """Append every row of `other` after this batch's rows (both re-padded to the longer); `other` is
        consumed: its tensors now belong to this batch."""
        if other.cache is None:
            return
        if self.cache is None:
            self.cache, self.mask = other.cache, other.mask
            return
        width = max(self.length, other.length)
        for mine, theirs in zip(_layers(self.cache), _layers(other.cache), strict=True):
            mine.keys = torch.cat([_pad_left(mine.keys, width), _pad_left(theirs.keys, width)])
            mine.values = torch.cat([_pad_left(mine.values, width), _pad_left(theirs.values, width)])
        self.mask = torch.cat([_pad_mask(self.mask, width), _pad_mask(other.mask, width)])

    def split(self, rows: list[int]) -> PaddedKVBatch:
        """Move `rows` (in this order) into a new batch, which is returned; this batch keeps the others."""
        split = PaddedKVBatch()
        if not rows:
            return split
        assert self.cache is not None
        index = torch.tensor(rows, dtype=torch.long)
        split.mask = self.mask[index]
        first_real = int(split.mask.any(dim=0).long().argmax())
        split.mask = split.mask[:, first_real:]
        split.cache = growing_cache()  # positional layers, appended by `update` (`_check_positional`)
        for layer_idx, layer in enumerate(_layers(self.cache)):
            split.cache.update(
                layer.keys[index, :, first_real:].contiguous(),
                layer.values[index, :, first_real:].contiguous(),
                layer_idx,
            )
        chosen = set(rows)
        self.keep([i for i in range(self.size) if i not in chosen])
        return split

    def step_inputs(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Extend the mask for one new token per row; return (attention_mask, position_ids)."""
        self.mask = torch.cat([self.mask, torch.ones(self.size, 1, dtype=torch.long)], dim=1)
        positions = self.mask.sum(dim=1, keepdim=True) - 1  # (B, 1)
        return self.mask, positions

    def keep(self, rows: list[int]) -> None:
        """Drop every row not in `rows`, then the columns that are padding in all remaining rows."""
        if not rows:
            self.cache, self.mask = None, torch.zeros(0, 0, dtype=torch.long)
            return
        assert self.cache is not None
        index = torch.tensor(rows, dtype=torch.long)
        self.mask = self.mask[index]
        first_real = int(self.mask.any(dim=0).long().argmax())
        self.mask = self.mask[:, first_real:]
        for layer in _layers(self.cache):
            layer.keys = layer.keys[index, :, first_real:]
            layer.values = layer.values[index, :, first_real:]


class SplitBatch(Generic[R]):
    """The running rows as two padded batches: the main one, and the urgent rows stepped apart from it while
    their deadlines need it (`Scheduler.schedule_decode` says which). Each list of rows is in the order of
    its batch's cache rows."""

    def __init__(self) -> None:
        self.main = PaddedKVBatch()
        self.main_rows: list[R] = []
        self.apart = PaddedKVBatch()
        self.apart_rows: list[R] = []

    @property
    def count(self) -> int:
        return len(self.main_rows) + len(self.apart_rows)

    def rows(self) -> list[R]:
        """Every row of both batches (a snapshot: another thread may move rows meanwhile)."""
        return list(self.main_rows) + list(self.apart_rows)

    def pairs(self) -> list[tuple[PaddedKVBatch, list[R]]]:
        return [(self.main, self.main_rows), (self.apart, self.apart_rows)]

    def regroup(self, apart: Sequence[R] | None) -> tuple[PaddedKVBatch, list[R]]:
        """Move rows between the batches so that exactly `apart` are stepped apart (None: every row in the
        main batch again); the batch and rows to step this turn returned."""
        main, express = list(self.main_rows), list(self.apart_rows)
        if apart is None:
            if express:
                self.main.merge(self.apart)
                self.apart = PaddedKVBatch()
                self.main_rows, self.apart_rows = main + express, []
            return self.main, self.main_rows
        chosen = set(apart)
        leaving = [i for i, s in enumerate(express) if s not in chosen]
        if leaving:
            self.main.merge(self.apart.split(leaving))
            main += [express[i] for i in leaving]
            express = [s for s in express if s in chosen]
        joining = [i for i, s in enumerate(main) if s in chosen]
        if joining:
            self.apart.merge(self.main.split(joining))
            express += [main[i] for i in joining]
            main = [s for s in main if s not in chosen]
        self.main_rows, self.apart_rows = main, express
        return self.apart, self.apart_rows


def _layers(cache: DynamicCache) -> list[Any]:
    return list(cache.layers)


def _check_positional(cache: DynamicCache) -> None:
    """Left-padding a cache is only sound for layers that hold keys and values by position
    (`kv_cache.growing_cache` stores sliding windows whole for this reason)."""
    for layer in cache.layers:
        if type(layer) not in (DynamicLayer, GrowingKVLayer):
            raise NotImplementedError(
                f"continuous batching needs caches of keys and values by position, not {type(layer).__name__}"
            )


def _pad_left(states: Any, width: int) -> torch.Tensor:
    """(B, H, T, D) -> (B, H, width, D), zeros on the left (masked out, and finite so 0 * x stays 0)."""
    missing = width - states.shape[2]
    if missing == 0:
        return states
    return torch.nn.functional.pad(states, (0, 0, missing, 0))


def _pad_mask(mask: torch.Tensor, width: int) -> torch.Tensor:
    missing = width - mask.shape[1]
    return torch.nn.functional.pad(mask, (missing, 0)) if missing else mask
