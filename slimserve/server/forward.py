"""The model's forwards as the transformers engine runs them: a chunk of a prompt into a growing cache, a
decode step of a padded batch, and the load-time warm-up made of both. `slimserve profile` times the same
two forwards (`profiling`), so what it measures is what the engine runs.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from transformers import DynamicCache

from slimserve.models.loader import LoadedVariant
from slimserve.server.batch import PaddedKVBatch
from slimserve.server.kv_cache import growing_cache
from slimserve.server.scheduler import PREFILL_TOKENS

WARMUP_BATCHES = (1, 2, 4, 8, 16)
"""Batch sizes a variant's decode steps run at once when it loads (those up to its `max_batch_size`, and that)."""

WARMUP_STEPS = 2
"""Decode steps at each warm-up batch size: the first forward at a shape pays one-off costs (allocation,
kernel choice, lazy initialisation) that the first requests would otherwise pay and the profile learn."""


def prefill_forward(model: Any, cache: DynamicCache, chunk: list[int]) -> torch.Tensor:
    """One chunk of a prompt into `cache`, after the tokens it holds (positions follow from its length); the
    last position's logits. The engine's and `slimserve profile`'s prefill."""
    input_ids = torch.tensor([chunk], dtype=torch.long)  # (1, T)
    out = model(input_ids=input_ids, past_key_values=cache, use_cache=True, logits_to_keep=1)
    return out.logits[:, -1].float()  # (1, vocab)


def step_forward(model: Any, batch: PaddedKVBatch, input_ids: torch.Tensor) -> torch.Tensor:
    """One decode step of every row of `batch`, `input_ids` (B, 1) its next tokens; the logits (B, vocab).
    The engine's and `slimserve profile`'s decode step."""
    mask, positions = batch.step_inputs()
    out = model(
        input_ids=input_ids, attention_mask=mask, position_ids=positions, past_key_values=batch.cache, use_cache=True
    )
    return out.logits[:, -1].float()  # (B, vocab)


def warm_up_pieces(variant: LoadedVariant, max_batch_size: int) -> list[Callable[[LoadedVariant], None]]:
    """The warm-up a variant runs before it serves, as vLLM's profiling run does: a prefill of a whole
    chunk, then `WARMUP_STEPS` decode steps at each batch size it will see (up to `max_batch_size`), largest
    first (rows of different lengths, padded as in serving). Untimed: the profile learns from served
    requests only, so cold-start time never enters it. Without it the first requests would pay those costs,
    and the profile would learn the cold steps as the variant's speed.

    On the compute thread, a piece per turn, so the cores are not shared with a second torch thread
    and another variant's urgent steps can take turns between the pieces."""
    config = variant.model.config
    vocab = int(config.vocab_size)
    prompt = [i % vocab for i in range(1, PREFILL_TOKENS + 1)]
    sizes = sorted({b for b in WARMUP_BATCHES if b < max_batch_size} | {max_batch_size}, reverse=True)
    batch = PaddedKVBatch()

    def prefill(loaded: LoadedVariant) -> None:
        prefill_forward(loaded.model, growing_cache(config), prompt)

    def rows(loaded: LoadedVariant) -> None:
        for row in range(sizes[0]):
            cache = growing_cache(config)
            prefill_forward(loaded.model, cache, prompt[: 4 + row % 8])
            batch.add(cache)

    def steps(size: int) -> Callable[[LoadedVariant], None]:
        def run(loaded: LoadedVariant) -> None:
            if batch.size > size:
                batch.keep(list(range(size)))
            tokens = torch.ones((size, 1), dtype=torch.long)  # (B, 1)
            for _ in range(WARMUP_STEPS):
                step_forward(loaded.model, batch, tokens)

        return run

    return [prefill, rows, *(steps(size) for size in sizes)]
