"""The KV cache of the CPU engine: fp32, in a buffer with room to grow.

Decode attention on the CPU runs in fp32 (`models.cpu_attention`), while the bf16 variants' projections
hand it bf16 keys and values. transformers' `DynamicLayer` stores them as they come and concatenates each
step's token onto the whole cache, so every decode step copies the cache twice per layer (by `cat`, then by
the attention's cast to fp32), and both copies grow with batch size x cached tokens. This layer casts each
token once, when it is cached, and writes it into spare room (`GROW_TOKENS` at a time); the side-by-side
timing is `benchmarks/tools/kv_cache_speed.py`.
The price: fp32 holds twice the bytes of bf16 (46 KB a token for SmolLM2-135M's 30 layers).
"""

from __future__ import annotations

from typing import Any

import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer, get_layer_types_and_kwargs

GROW_TOKENS = 128
"""Room added when the buffer is full: a step's token is written in place, and the whole cache is copied
once per this many steps (or when rows join or leave the batch)."""

STORAGE_DTYPE = torch.float32


class GrowingKVLayer(DynamicLayer):
    """A full-attention cache layer whose keys and values, (B, kv heads, T, D), are fp32 views of the first
    T positions of a buffer with spare room after them.

    `keys` and `values` can be assigned (the padded batch re-pads and drops rows that way): the layer takes
    the tensor, in fp32, as its buffer, and grows it at the next update."""

    def __init__(self, **kwargs: Any) -> None:
        self._key_buffer: torch.Tensor | None = None
        self._value_buffer: torch.Tensor | None = None
        # apart: the padded batch assigns keys, then values read from the old length
        self._key_length = self._value_length = 0
        super().__init__(**kwargs)

    @property
    def keys(self) -> torch.Tensor | None:
        return None if self._key_buffer is None else self._key_buffer[:, :, : self._key_length]

    @keys.setter
    def keys(self, states: torch.Tensor | None) -> None:
        self._key_buffer, self._key_length = self._adopt(states)

    @property
    def values(self) -> torch.Tensor | None:
        return None if self._value_buffer is None else self._value_buffer[:, :, : self._value_length]

    @values.setter
    def values(self, states: torch.Tensor | None) -> None:
        self._value_buffer, self._value_length = self._adopt(states)

    @staticmethod
    def _adopt(states: torch.Tensor | None) -> tuple[torch.Tensor | None, int]:
        if states is None or states.dim() != 4:  # None, or transformers' empty placeholder
            return None, 0
        return states.to(STORAGE_DTYPE), int(states.shape[2])

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.dtype, self.device = STORAGE_DTYPE, key_states.device
        self.is_initialized = True

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Write (B, kv heads, new, D) states after the cached ones; return the whole cache's views."""
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        if self._key_length != self._value_length:
            raise ValueError(f"the cache holds {self._key_length} key and {self._value_length} value positions")
        self._key_buffer = self._written(self._key_buffer, key_states, self._key_length)
        self._value_buffer = self._written(self._value_buffer, value_states, self._value_length)
        self._key_length = self._value_length = end = self._key_length + key_states.shape[2]
        return self._key_buffer[:, :, :end], self._value_buffer[:, :, :end]

    @staticmethod
    def _written(buffer: torch.Tensor | None, states: torch.Tensor, length: int) -> torch.Tensor:
        """`buffer` (or a larger copy of it: `GROW_TOKENS` of room) with `states` written after `length`."""
        end = length + states.shape[2]
        if buffer is None or end > buffer.shape[2]:
            batch, heads, _, dim = states.shape
            grown = torch.empty(batch, heads, end + GROW_TOKENS, dim, dtype=STORAGE_DTYPE, device=states.device)
            if buffer is not None:
                grown[:, :, :length] = buffer[:, :, :length]
            buffer = grown
        buffer[:, :, length:end] = states
        return buffer

    def get_seq_length(self) -> int:
        return self._key_length if self._key_buffer is not None else 0

    def reset(self) -> None:
        self._key_buffer = self._value_buffer = None
        self._key_length = self._value_length = 0
        self.is_initialized = False

    def crop(self, tokens_to_remove: int) -> None:
        if tokens_to_remove > 0:
            raise ValueError(f"crop takes a negative count of tokens to remove, got {tokens_to_remove}")
        self._key_length = self._value_length = max(0, self._key_length + tokens_to_remove)


class UnbatchableModelError(ValueError):
    """A model whose cache holds more than keys and values by position (state-space or linear-attention
    layers): left-padding its rows into one batch would not be sound."""


def growing_cache(config: Any = None) -> DynamicCache:
    """An empty cache of `GrowingKVLayer`s for a model of `config` (None: as many layers as first write to it).

    Sliding-window layers are stored whole, like full-attention ones: the model's sliding mask hides what lies
    outside each window (it counts cache columns, and a row's real tokens are contiguous at the right of a
    left-padded batch, so columns apart are positions apart). That costs the window's eviction (memory grows
    with the context, as for the global layers) and buys rows that can be padded, merged and split.
    Other layers (state-space, linear or chunked attention) are refused: `UnbatchableModelError`."""
    if config is None:
        cache = DynamicCache()
        cache.layer_class_to_replicate = GrowingKVLayer
        return cache
    layer_types, _ = get_layer_types_and_kwargs(config.get_text_config(decoder=True))
    other = sorted(set(layer_types) - POSITIONAL_LAYER_TYPES)
    if other:
        architecture = ",".join(getattr(config, "architectures", None) or [config.model_type])
        raise UnbatchableModelError(
            f"{architecture} cannot be served by slimserve's batched engine: it has {', '.join(other)} layers, "
            "whose cache or mask is not a matter of keys and values by position (serve it with --backend vllm)"
        )
    cache = DynamicCache(config=config)
    cache.layers = [GrowingKVLayer() for _ in cache.layers]
    return cache


POSITIONAL_LAYER_TYPES = {"full_attention", "sliding_attention"}
"""Layer types whose cache holds keys and values by position and whose mask depends only on distance:
chunked attention's chunks start at absolute positions, which left padding shifts."""
