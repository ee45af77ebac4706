"""The transformers engine on a tiny real model: batched greedy decoding matches `generate`, finish reasons,
cancelling, a full queue, loading and failing, engines sharing one compute thread, the load-time warm-up."""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import threading
from pathlib import Path
from typing import Any

import pytest

from slimserve.models import LoadedVariant, load_variant
from slimserve.server.compute import ComputeThread
from slimserve.server.engine import TransformersEngine
from slimserve.server.forward import WARMUP_STEPS
from slimserve.server.metrics import ServerMetrics
from slimserve.server.profile import CostProfile
from slimserve.server.sampling import SamplingParams
from slimserve.server.scheduler import PREFILL_TOKENS
from slimserve.server.serving_engine import (
    EngineBusyError,
    EngineNotReadyError,
    EngineState,
    GenerationEvent,
)
from tests.engines import reference_greedy, run, started_engine
from tests.tiny import ARCHITECTURES, SLIDING_WINDOW, make_tiny_variant


def test_concurrent_greedy_requests_match_solo_generate(tiny_variant_dir: Path, tiny_loaded: LoadedVariant) -> None:
    prompts = [[5, 6, 7, 8, 9, 10], [20, 21], [30, 31, 32, 33, 34, 35, 36, 37, 38], [40]]
    expected = [reference_greedy(tiny_loaded, p, 12) for p in prompts]
    engine = started_engine(tiny_variant_dir)

    _assert_greedy_together(engine, prompts, 12, expected)


def _assert_greedy_together(
    engine: TransformersEngine, prompts: list[list[int]], max_tokens: int, expected: list[list[int]]
) -> None:
    """Submit every prompt at once, greedy for `max_tokens`, and compare with `expected`; then shut down."""

    async def main() -> list[list[int]]:
        params = SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True)
        handles = [engine.submit(p, params) for p in prompts]
        return [tokens for tokens, _ in await asyncio.gather(*(run(h) for h in handles))]

    try:
        assert asyncio.run(main()) == expected
    finally:
        engine.shutdown()


def test_finish_reasons_and_counts(tiny_variant_dir: Path) -> None:
    engine = started_engine(tiny_variant_dir)

    async def main() -> list[GenerationEvent]:
        handle = engine.submit([5, 6, 7], SamplingParams(max_tokens=5, temperature=0, ignore_eos=True))
        _, events = await run(handle)
        return events

    try:
        events = asyncio.run(main())
    finally:
        engine.shutdown()
    assert [e.finish_reason for e in events] == [None] * 4 + ["length"]
    assert events[-1].completion_tokens == 5


def test_cancel_stops_generation_early(tiny_variant_dir: Path) -> None:
    engine = started_engine(tiny_variant_dir)

    async def main() -> list[GenerationEvent]:
        handle = engine.submit([5, 6, 7], SamplingParams(max_tokens=200, temperature=0, ignore_eos=True))
        events = []
        async for event in handle.events():
            events.append(event)
            if len(events) == 3:
                handle.cancel()
        return events

    try:
        events = asyncio.run(main())
    finally:
        engine.shutdown()
    assert events[-1].finish_reason == "abort"
    assert events[-1].completion_tokens < 200


def test_full_queue_raises_busy_and_a_request_that_does_not_fit_queues_none_of_its_sequences(
    tiny_variant_dir: Path,
) -> None:
    engine = started_engine(tiny_variant_dir, max_batch_size=1, max_waiting=2)

    async def main() -> None:
        long = SamplingParams(max_tokens=200, temperature=0, ignore_eos=True)
        running = engine.submit([5, 6], long)
        await running.queue.get()  # its first token is out: it holds the only batch slot
        waiting = [engine.submit([7, 8], long)]  # no batch slot: waits
        with pytest.raises(EngineBusyError, match="adds 2"):
            engine.submit_many([([9, 10], long), ([9, 10], long)])  # one would fit, not both
        assert engine.waiting == 1
        waiting.append(engine.submit([9, 10], long))  # the one that fits
        with pytest.raises(EngineBusyError):
            engine.submit([11, 12], long)
        running.cancel()
        for handle in waiting:
            handle.cancel()

    try:
        asyncio.run(main())
    finally:
        engine.shutdown()


def test_not_ready_until_loaded_and_failed_load_is_reported(tiny_variant_dir: Path) -> None:
    release = threading.Event()

    def slow_load() -> LoadedVariant:
        release.wait(30)
        raise FileNotFoundError("weights vanished")

    engine = TransformersEngine(slow_load, name="slow", metrics=ServerMetrics())
    engine.start()

    async def submit() -> None:
        engine.submit([1], SamplingParams(max_tokens=1))

    assert engine.state is EngineState.LOADING
    with pytest.raises(EngineNotReadyError, match="loading"):
        asyncio.run(submit())
    release.set()
    assert not engine.wait_ready(30)
    assert engine.state is EngineState.FAILED
    assert engine.error is not None and "weights vanished" in engine.error
    engine.shutdown()


def test_engines_take_turns_on_one_compute_thread_and_stop_independently(
    tiny_variant_dir: Path, tiny_loaded: LoadedVariant
) -> None:
    """Two variants' forwards all run on the one compute thread; stopping one leaves the other serving."""
    compute = ComputeThread(name="compute-under-test")
    forward_threads: set[str] = set()

    def load() -> LoadedVariant:
        loaded = load_variant(tiny_variant_dir, dtype="fp32")
        loaded.model.register_forward_hook(lambda *_: forward_threads.add(threading.current_thread().name))
        return loaded

    engines = [TransformersEngine(load, name=n, metrics=ServerMetrics(), compute=compute) for n in ("a", "b")]
    for engine in engines:
        engine.start()
        assert engine.wait_ready(60)
    prompt = [5, 6, 7, 8]
    expected = reference_greedy(tiny_loaded, prompt, 10)

    async def both() -> list[list[int]]:
        params = SamplingParams(max_tokens=10, temperature=0, ignore_eos=True)
        handles = [engine.submit(prompt, params) for engine in engines]
        return [tokens for tokens, _ in await asyncio.gather(*(run(h) for h in handles))]

    try:
        assert asyncio.run(both()) == [expected, expected]
        assert forward_threads == {"compute-under-test"}
        engines[0].shutdown()
        assert compute.engines == ["b"]

        async def one() -> list[int]:
            handle = engines[1].submit(prompt, SamplingParams(max_tokens=10, temperature=0, ignore_eos=True))
            return (await run(handle))[0]

        assert asyncio.run(one()) == expected
    finally:
        for engine in engines:
            engine.shutdown()


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_any_architecture_batched_greedy_matches_generate_past_its_window(arch: str, tmp_path: Path) -> None:
    """Sliding-window and mixed local/global models (Mistral, Gemma 3), biases (Qwen2), fused checkpoints
    (Phi-3): rows of one batch, prompts longer than the window and one prefilled in two chunks, decode what
    transformers' `generate` decodes for each alone."""
    variant_dir = make_tiny_variant(tmp_path / arch, name=f"tiny-{arch}", arch=arch)
    loaded = load_variant(variant_dir, dtype="fp32")
    vocab = int(loaded.model.config.vocab_size)
    lengths = (3 * SLIDING_WINDOW, 2, SLIDING_WINDOW + 3, PREFILL_TOKENS + 20)
    prompts = [[5 + (11 * i + n) % (vocab - 5) for i in range(n)] for n in lengths]
    expected = [reference_greedy(loaded, p, 2 * SLIDING_WINDOW) for p in prompts]
    engine = started_engine(variant_dir)

    _assert_greedy_together(engine, prompts, 2 * SLIDING_WINDOW, expected)


def test_a_model_the_batch_cannot_hold_fails_at_load_naming_why(tiny_loaded: LoadedVariant) -> None:
    """A model with state-space (conv) layers is refused when it loads, not at its first token."""
    from transformers import Lfm2Config, Lfm2ForCausalLM

    config = Lfm2Config(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=1, layer_types=["conv", "full_attention"], architectures=["Lfm2ForCausalLM"],
    )  # fmt: skip
    hybrid = dataclasses.replace(tiny_loaded, model=Lfm2ForCausalLM(config))
    engine = TransformersEngine(lambda: hybrid, name="hybrid", metrics=ServerMetrics())
    engine.start()
    assert not engine.wait_ready(60)
    assert engine.state is EngineState.FAILED
    assert engine.error is not None and "Lfm2ForCausalLM" in engine.error and "conv" in engine.error
    engine.shutdown()


def test_a_forward_that_raises_ends_every_request_with_the_error_and_fails_the_variant(
    tiny_variant_dir: Path,
) -> None:
    """Nothing hangs: the running rows and the queued request all end with the error, and the engine says
    FAILED with the reason, so later requests are refused rather than queued forever."""
    loaded = load_variant(tiny_variant_dir, dtype="fp32")
    forward = loaded.model.forward
    calls = itertools.count()

    def failing_forward(*args: Any, **kwargs: Any) -> Any:
        if next(calls) == 4:  # two prefills and a few decode steps in
            raise RuntimeError("device lost")
        return forward(*args, **kwargs)

    engine = TransformersEngine(lambda: loaded, name="tiny", metrics=ServerMetrics(), max_batch_size=2)
    engine.start()
    assert engine.wait_ready(60)
    loaded.model.forward = failing_forward  # after the load-time warm-up, whose forwards are not counted

    async def main() -> list[GenerationEvent]:
        params = SamplingParams(max_tokens=50, temperature=0, ignore_eos=True)
        handles = [engine.submit(p, params) for p in ([5, 6, 7], [8, 9], [10, 11, 12])]
        results = await asyncio.wait_for(asyncio.gather(*(run(h) for h in handles)), timeout=30)
        return [events[-1] for _, events in results]

    try:
        last = asyncio.run(main())
        assert [e.finish_reason for e in last] == ["error"] * 3
        assert all(e.error is not None and "device lost" in e.error for e in last)
        assert engine.state is EngineState.FAILED and engine.error is not None and "device lost" in engine.error

        async def submit_again() -> None:
            engine.submit([1], SamplingParams(max_tokens=1))

        with pytest.raises(EngineNotReadyError, match="device lost"):
            asyncio.run(submit_again())
    finally:
        engine.shutdown()


def test_a_variant_warms_up_at_every_batch_size_before_it_serves_and_the_profile_learns_none_of_it(
    tiny_variant_dir: Path,
) -> None:
    """Cold first forwards (allocation, kernel choice) would make the first requests slow and teach the
    profile that slowness: they run, untimed, before the engine reports READY."""
    shapes: list[tuple[int, int]] = []

    def load() -> LoadedVariant:
        loaded = load_variant(tiny_variant_dir, dtype="fp32")
        loaded.model.register_forward_hook(
            lambda _m, args, kwargs, _out: shapes.append(tuple(kwargs["input_ids"].shape)), with_kwargs=True
        )
        return loaded

    engine = TransformersEngine(load, name="tiny", metrics=ServerMetrics(), max_batch_size=6)
    engine.profile = CostProfile(1.0, 0.1, step_b1_ms=5.0, step_b8_ms=10.0, load_ms=0.0)
    engine.start()
    try:
        assert engine.wait_ready(60) and engine.state is EngineState.READY
        assert (1, PREFILL_TOKENS) in shapes  # a whole prefill chunk
        decode_batches = [rows for rows, tokens in shapes if tokens == 1]
        assert decode_batches == [b for b in (6, 4, 2, 1) for _ in range(WARMUP_STEPS)]
        assert engine.profile.observations == 0 and engine.profile.step_scale == 1.0  # no cold sample
        before = len(shapes)

        async def one() -> list[int]:
            return (await run(engine.submit([5, 6, 7], SamplingParams(max_tokens=3, temperature=0))))[0]

        assert len(asyncio.run(one())) >= 1
        assert engine.profile.observations >= 2 and len(shapes) > before  # served requests are learned from
    finally:
        engine.shutdown()
