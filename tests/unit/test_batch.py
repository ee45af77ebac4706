"""The padded KV batch must give every row the logits it would get decoding alone, whether its cache is
transformers' own or the engine's growing fp32 cache (`kv_cache`), whose buffers here grow every few steps,
for every tiny architecture: sliding windows (stored whole, masked by distance) included."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from transformers import DynamicCache

import slimserve.server.kv_cache as kv_cache
from slimserve.models import LoadedVariant
from slimserve.server.batch import PaddedKVBatch
from tests.tiny import ARCHITECTURES, SLIDING_WINDOW, tiny_model

CacheFactory = Callable[[object], DynamicCache]


def _dynamic(config: object) -> DynamicCache:
    return DynamicCache(config=config)


def _positional(config: object) -> DynamicCache:
    """transformers' full-attention layers for every layer: what the padded batch takes as it is."""
    return DynamicCache()


@pytest.fixture(scope="module", params=ARCHITECTURES)
def model(request: pytest.FixtureRequest) -> torch.nn.Module:
    return tiny_model(400, arch=request.param)


@pytest.fixture(params=["dynamic", "growing"])
def new_cache(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> CacheFactory:
    if request.param == "dynamic":
        return _positional
    monkeypatch.setattr(kv_cache, "GROW_TOKENS", 2)  # room for two more tokens: steps outgrow it often
    return kv_cache.growing_cache


def _prefill(
    model: torch.nn.Module, ids: list[int], new_cache: CacheFactory = _dynamic
) -> tuple[DynamicCache, torch.Tensor]:
    cache = new_cache(model.config)
    out = model(input_ids=torch.tensor([ids]), past_key_values=cache, use_cache=True)
    return cache, out.logits[0, -1]


def _alone(model: torch.nn.Module, ids: list[int], steps: list[int]) -> list[torch.Tensor]:
    """Reference: logits after each appended token, one sequence, no padding."""
    cache, logits = _prefill(model, ids)
    outs = [logits]
    for token in steps:
        out = model(input_ids=torch.tensor([[token]]), past_key_values=cache, use_cache=True)
        outs.append(out.logits[0, -1])
    return outs


@torch.inference_mode()
def test_rows_of_different_lengths_joining_late_match_solo_decoding(
    model: torch.nn.Module, new_cache: CacheFactory
) -> None:
    prompts = [list(range(5, 6 + SLIDING_WINDOW)), [20, 21], [30, 31, 32, 33]]
    steps = [[40, 41, 42, 43, 44], [50, 51, 52, 53, 54], [60, 61, 62]]
    expected = [_alone(model, p, s) for p, s in zip(prompts, steps, strict=True)]

    batch = PaddedKVBatch()
    cache, _ = _prefill(model, prompts[0], new_cache)
    batch.add(cache)
    got: list[list[torch.Tensor]] = [[], [], []]
    rows = [0]
    cursor = {0: 0}
    for step in range(5):
        if step == 1:  # a short prompt joins a longer running sequence
            cache, _ = _prefill(model, prompts[1], new_cache)
            batch.add(cache)
            rows.append(1)
            cursor[1] = 0
        if step == 2:  # and a longer one joins, forcing the batch to re-pad
            cache, _ = _prefill(model, prompts[2], new_cache)
            batch.add(cache)
            rows.append(2)
            cursor[2] = 0
        tokens = torch.tensor([[steps[r][cursor[r]]] for r in rows])
        mask, positions = batch.step_inputs()
        out = model(
            input_ids=tokens, attention_mask=mask, position_ids=positions, past_key_values=batch.cache, use_cache=True
        )
        for i, r in enumerate(rows):
            cursor[r] += 1
            got[r].append(out.logits[i, -1])
        if step == 2:  # the longest row leaves; the batch drops its now-useless padding columns
            width_before = batch.length
            batch.keep([1, 2])
            rows = [1, 2]
            assert batch.length < width_before

    for r in range(3):
        for k, logits in enumerate(got[r]):
            torch.testing.assert_close(logits, expected[r][k + 1], atol=1e-4, rtol=1e-4)


def test_keep_nothing_empties_the_batch(tiny_loaded: LoadedVariant) -> None:
    batch = PaddedKVBatch()
    with torch.inference_mode():
        cache, _ = _prefill(tiny_loaded.model, [1, 2, 3])
    batch.add(cache)
    batch.keep([])
    assert batch.size == 0 and batch.cache is None


@torch.inference_mode()
def test_rows_split_off_and_merged_back_match_solo_decoding(model: torch.nn.Module, new_cache: CacheFactory) -> None:
    """Stepping some rows apart (the engine's urgent rows) and merging them back keeps every row's logits."""
    prompts = [list(range(5, 6 + SLIDING_WINDOW)), [20, 21], [30, 31, 32, 33]]
    steps = [[40, 41, 42, 43, 44, 45], [50, 51, 52, 53], [60, 61, 62, 63, 64, 65]]
    expected = [_alone(model, p, s) for p, s in zip(prompts, steps, strict=True)]
    got: dict[int, list[torch.Tensor]] = {0: [], 1: [], 2: []}

    def step(batch: PaddedKVBatch, rows: list[int]) -> None:
        tokens = torch.tensor([[steps[r][len(got[r])]] for r in rows])
        mask, positions = batch.step_inputs()
        out = model(
            input_ids=tokens, attention_mask=mask, position_ids=positions, past_key_values=batch.cache, use_cache=True
        )
        for i, r in enumerate(rows):
            got[r].append(out.logits[i, -1])

    batch = PaddedKVBatch()
    for prompt in prompts:
        batch.add(_prefill(model, prompt, new_cache)[0])
    step(batch, [0, 1, 2])
    apart = batch.split([2, 0])  # rows 0 and 2 go ahead, in that order; row 1 waits
    assert (apart.size, batch.size) == (2, 1)
    step(apart, [2, 0])
    step(apart, [2, 0])
    batch.merge(apart)  # row 1 is two tokens behind the others, so the merged batch re-pads
    step(batch, [1, 2, 0])
    step(batch, [1, 2, 0])
    step(batch, [1, 2, 0])

    for r in range(3):
        assert got[r], f"row {r} never stepped"
        for k, logits in enumerate(got[r]):
            torch.testing.assert_close(logits, expected[r][k + 1], atol=1e-4, rtol=1e-4)
