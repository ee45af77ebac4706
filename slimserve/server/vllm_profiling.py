"""`slimserve profile VARIANT --backend vllm`: what a variant's engine steps cost in vLLM's own engine on this
host, recorded in its manifest beside (never over) the transformers engine's figures.

The engine is built from the engine arguments the vLLM backend serves with (`VLLMEngine.engine_args`: the
priority scheduler, the same batch limit and KV cache), as an in-process `LLMEngine`, so that one
`step()` is one engine-core step and its wall time is that step's cost (the server's engine core runs the
same steps in a process of its own). Requests are greedy with `ignore_eos`, and every timed prompt is
distinct, so the prefix cache never answers for the model.

- prefill by prompt length: one request of that many tokens wanting one token, timed from its admission to
  its token (the step, or steps where the prompt exceeds `max_num_batched_tokens`, that prefill it);
- decode step by rows: `rows` requests with 128-token prompts, all prefilled first, then the gaps between
  consecutive steps that give every row a token;
- one-row steps by context length, as the transformers profile (recorded, not yet read).

The figures go under `metrics.cost_profile_vllm` with vLLM's token budget per step
(`max_num_batched_tokens`), which the simulator's vLLM engine chunks prompts by; `CostProfile.from_manifest(
manifest, runtime="vllm")` reads them.
"""

from __future__ import annotations

import itertools
import statistics
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from slimserve.server.profiling import PROFILE_PROMPT, Measured, ProfileConfig, measure_points
from slimserve.server.vllm_placement import spawn_environment


@contextmanager
def _engine(engine_args: Any, environment: dict[str, str | None]) -> Iterator[Any]:
    """vLLM's LLMEngine with its engine core in this process (one `step()`: one scheduled batch)."""
    from vllm.v1.engine.llm_engine import LLMEngine

    with spawn_environment({**environment, "VLLM_ENABLE_V1_MULTIPROCESSING": "0"}):
        engine = LLMEngine.from_engine_args(engine_args, enable_multiprocessing=False)
    try:
        yield engine
    finally:
        shutdown = getattr(engine.engine_core, "shutdown", None)
        if shutdown is not None:
            shutdown()


class _Prompts:
    """Distinct token prompts: each starts at a fresh offset, so no two share a cached prefix block."""

    def __init__(self, vocab: int) -> None:
        self.vocab = vocab
        self.counter = itertools.count(1)

    def __call__(self, length: int) -> dict[str, list[int]]:
        start = next(self.counter) * 7919
        return {"prompt_token_ids": [(start + 7 * i) % (self.vocab - 1) + 1 for i in range(length)]}


def _run(engine: Any, prompts: list[dict[str, list[int]]], max_tokens: int) -> list[float]:
    """Serve `prompts` together to `max_tokens` tokens each; the clock times (perf_counter seconds) of the
    steps after which every request had one more token, the first being when the last prompt finished
    prefill, preceded by the time the requests were added."""
    from vllm import SamplingParams

    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
    began = time.perf_counter()
    ids = [f"profile-{began}-{i}" for i in range(len(prompts))]  # outputs carry these (vLLM adds a suffix inside)
    for request_id, prompt in zip(ids, prompts, strict=True):
        engine.add_request(request_id, prompt, params)
    counts = dict.fromkeys(ids, 0)
    marks, reached = [began], 0
    while engine.has_unfinished_requests():
        outputs = engine.step()
        now = time.perf_counter()
        for output in outputs:
            if output.request_id in counts:
                counts[output.request_id] = len(output.outputs[0].token_ids)
        while reached < max_tokens and min(counts.values()) > reached:
            reached += 1
            marks.append(now)
    return marks


def measure_vllm(
    engine: Any, config: ProfileConfig, load_s: float, progress: Callable[[str], None] = print
) -> Measured:
    """Prefill time against prompt length, step time against rows (at a 128-token context) and against
    context (one row), each the median over `config.rounds` interleaved rounds of a median of
    `config.repeats` timings after an untimed warm-up (`profiling.measure_points`)."""
    context = int(engine.model_config.max_model_len)
    budget = int(engine.vllm_config.scheduler_config.max_num_batched_tokens)
    room = context - config.repeats - 3
    if room < PROFILE_PROMPT:
        raise ValueError(f"a context of {context} tokens is too short to profile")
    prompts = _Prompts(int(engine.model_config.get_vocab_size()))
    steps = config.repeats + 2  # the first gap after the prefill is an untimed warm-up

    def prefill_ms(length: int) -> float:
        runs = [_run(engine, [prompts(length)], 1) for _ in range(config.repeats + 1)][1:]
        return 1000 * statistics.median([marks[1] - marks[0] for marks in runs])

    def step_ms(rows: int, length: int) -> float:
        marks = _run(engine, [prompts(length) for _ in range(rows)], steps + 1)
        return 1000 * statistics.median([b - a for a, b in itertools.pairwise(marks[2:])])

    found = Measured(load_s=load_s, runtime="vllm", max_num_batched_tokens=budget)
    measure_points(config, found, context, room, prefill_ms, step_ms, progress)
    progress(f"vLLM's token budget per step (max_num_batched_tokens): {budget}")
    return found


def profile_vllm(
    engine_args: Any,
    environment: dict[str, str | None],
    path: Path,
    config: ProfileConfig,
    write: bool = True,
    progress: Callable[[str], None] = print,
) -> Measured:
    """Build vLLM's engine from the backend's `engine_args` (its placement `environment` set while it
    starts), measure it, and (by default) record the figures in the manifest at `path`."""
    progress(f"starting vLLM's engine on {path} (the first start compiles for a minute or so)")
    began = time.perf_counter()
    with _engine(engine_args, environment) as engine:
        load_s = time.perf_counter() - began
        progress(f"started in {load_s:.2f} s")
        found = measure_vllm(engine, config, load_s, progress)
    if write:
        found.record(path, progress)
    return found
