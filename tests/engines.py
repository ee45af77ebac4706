"""Engines over a tiny real model for the engine tests: started, or stepped by the test itself."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch

from slimserve.models import LoadedVariant, load_variant
from slimserve.server.compute import ComputeThread
from slimserve.server.engine import TransformersEngine
from slimserve.server.metrics import ServerMetrics
from slimserve.server.scheduler import PREFILL_TOKENS
from slimserve.server.serving_engine import GenerationEvent, RequestHandle


def started_engine(variant_dir: Path, **kwargs: int) -> TransformersEngine:
    """A tiny variant's engine, loaded and stepping on the shared compute thread."""
    engine = TransformersEngine(
        lambda: load_variant(variant_dir, dtype="fp32"), name="tiny", metrics=ServerMetrics(), **kwargs
    )
    engine.start()
    assert engine.wait_ready(60)
    return engine


def hand_stepped(variant_dir: Path) -> tuple[TransformersEngine, LoadedVariant]:
    """A ready engine whose turns the test takes itself (its compute thread is never started)."""
    loaded = load_variant(variant_dir, dtype="fp32")
    compute = ComputeThread(name="compute-never-started")
    engine = TransformersEngine(lambda: loaded, name="tiny", metrics=ServerMetrics(), compute=compute)
    engine.adopt(loaded)
    return engine, loaded


def two_chunk_prompt(loaded: LoadedVariant) -> list[int]:
    """A prompt the engine prefills in two chunks."""
    vocab = int(loaded.model.config.vocab_size)
    return [5 + (7 * i) % (vocab - 5) for i in range(2 * PREFILL_TOKENS - 10)]


async def run(handle: RequestHandle) -> tuple[list[int], list[GenerationEvent]]:
    """The tokens a handle delivered, and its events."""
    events = [e async for e in handle.events()]
    return [t for e in events for t in e.token_ids], events


def reference_greedy(loaded: LoadedVariant, prompt: list[int], max_new: int) -> list[int]:
    """transformers' own greedy `generate`: what batched decoding must reproduce."""
    out = loaded.model.generate(
        torch.tensor([prompt]), max_new_tokens=max_new, min_new_tokens=max_new, do_sample=False, eos_token_id=None
    )
    return [int(t) for t in out[0, len(prompt) :]]


def engines_recording_forwards(
    variant_dir: Path, names: tuple[str, ...]
) -> tuple[dict[str, TransformersEngine], list[str]]:
    """Started engines on one compute thread of their own, and the list their forwards append their names to,
    in the order the compute thread ran them."""
    compute = ComputeThread(name=f"compute-{'-'.join(names)}")
    forwards: list[str] = []

    def loader(name: str) -> Callable[[], LoadedVariant]:
        def load() -> LoadedVariant:
            loaded = load_variant(variant_dir, dtype="fp32")
            loaded.model.register_forward_hook(lambda *_: forwards.append(name))
            return loaded

        return load

    engines = {n: TransformersEngine(loader(n), name=n, metrics=ServerMetrics(), compute=compute) for n in names}
    for engine in engines.values():
        engine.start()
        assert engine.wait_ready(60)
    forwards.clear()  # the load-time warm-ups' forwards: the tests order served requests' turns
    return engines, forwards
