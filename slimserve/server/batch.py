"""A running batch of sequences that share one left-padded KV cache.

Sequences join after their own prefill (no padding inside a prefill, so no fully-masked query rows)
and leave the moment they finish; the batch is re-padded on the left to the longest cache. This is
continuous batching at token granularity on top of transformers' `DynamicCache`. Rows can also be split
off into a batch of their own and merged back (the engine steps urgent rows apart, see `engine`).
"""

from __future__ import annotations

from typing import Any

import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

from slimserve.server.kv_cache import GrowingKVLayer, growing_cache


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
