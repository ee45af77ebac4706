"""The engine's turns on a tiny real model: rows due sooner step ahead or apart, prompts are prefilled in
chunks between which a request due sooner can go, and the turn trace records it all."""

from __future__ import annotations

import asyncio
import itertools
import json
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from slimserve.models import LoadedVariant, load_variant
from slimserve.server.compute import ComputeThread
from slimserve.server.engine import TransformersEngine
from slimserve.server.metrics import ServerMetrics
from slimserve.server.profile import CostProfile
from slimserve.server.sampling import SamplingParams
from slimserve.server.scheduler import PREFILL_TOKENS, prefill_chunks, prompt_chunk
from slimserve.server.serving_engine import (
    RequestHandle,
)
from tests.engines import (
    engines_recording_forwards,
    hand_stepped,
    reference_greedy,
    run,
    started_engine,
    two_chunk_prompt,
)


def test_a_sequence_due_sooner_steps_ahead_of_one_with_time_to_spare(tiny_variant_dir: Path) -> None:
    """Earliest deadline first: once a tight request arrives, its steps run back to back and the loose
    request (a minute of budget) waits, then finishes; round-robin would alternate them."""
    engines, forwards = engines_recording_forwards(tiny_variant_dir, ("loose", "tight"))

    async def scenario() -> tuple[int, int]:
        loop_params = SamplingParams(max_tokens=60, temperature=0, ignore_eos=True)
        loose = engines["loose"].submit([5, 6, 7], loop_params)
        loose.deadline = time.perf_counter() + 60
        events = loose.events()
        for _ in range(3):  # the loose request is under way
            await anext(events)
        tight = engines["tight"].submit([8, 9], SamplingParams(max_tokens=12, temperature=0, ignore_eos=True))
        tight.deadline = time.perf_counter() + 5
        tight_tokens, _ = await run(tight)
        rest = [t for e in [e async for e in events] for t in e.token_ids]
        return len(tight_tokens), 3 + len(rest)

    try:
        assert asyncio.run(scenario()) == (12, 60)
        first, last = forwards.index("tight"), len(forwards) - 1 - forwards[::-1].index("tight")
        between = forwards[first : last + 1]
        assert between.count("tight") == 12  # its prefill and 11 decode steps
        assert between.count("loose") <= 1  # at most a step already chosen when it arrived
    finally:
        for engine in engines.values():
            engine.shutdown()


def test_a_loose_request_is_prefilled_after_a_tight_one_is_done_not_in_its_way(tiny_variant_dir: Path) -> None:
    """A waiting request takes its turn by its deadline like a running one: a request with a minute of
    budget arriving on another engine while a tight one runs is not prefilled until the tight one is done
    (a prefill ahead of everything would cut into the tight request's few spare milliseconds); one without
    a budget still starts at once."""
    engines, forwards = engines_recording_forwards(tiny_variant_dir, ("tight", "loose", "unbudgeted"))
    params = SamplingParams(max_tokens=40, temperature=0, ignore_eos=True)

    async def scenario(late: str, late_deadline: float | None) -> None:
        tight = engines["tight"].submit([8, 9], params, deadline=time.perf_counter() + 5)
        events = tight.events()
        for _ in range(3):  # the tight request is under way
            await anext(events)
        other = engines[late].submit([5, 6, 7], params, deadline=late_deadline)
        await asyncio.gather(run(other), _drain(events))

    try:
        asyncio.run(scenario("loose", time.perf_counter() + 60))
        last_tight = len(forwards) - 1 - forwards[::-1].index("tight")
        assert forwards.count("tight") == 40 and forwards[: last_tight + 1].count("loose") == 0
        forwards.clear()
        asyncio.run(scenario("unbudgeted", None))
        last_tight = len(forwards) - 1 - forwards[::-1].index("tight")
        assert forwards[: last_tight + 1].count("unbudgeted") >= 1  # best effort: prefilled at once, then round-robin
    finally:
        for engine in engines.values():
            engine.shutdown()


async def _drain(events: AsyncIterator[Any]) -> None:
    async for _ in events:
        pass


def test_a_rejected_request_leaves_no_waiting_count(tiny_variant_dir: Path) -> None:
    """Parameters the sampler rejects fail the submit and nothing else: a stale waiting count would make the
    compute thread see a prefill to run forever."""
    engine = started_engine(tiny_variant_dir)

    async def scenario() -> list[int]:
        with pytest.raises(ValueError, match="outside the vocabulary"):
            engine.submit([5, 6], SamplingParams(max_tokens=4, logit_bias={10**9: 1.0}))
        assert engine.waiting == 0 and engine.pending() is None
        handle = engine.submit([5, 6], SamplingParams(max_tokens=4, temperature=0, ignore_eos=True))
        return (await run(handle))[0]

    try:
        assert len(asyncio.run(scenario())) == 4
    finally:
        engine.shutdown()


def test_a_tight_request_joining_a_busy_batch_steps_apart_until_it_is_done(
    tiny_variant_dir: Path, tiny_loaded: LoadedVariant
) -> None:
    """Preemption inside one engine: a request whose budget the whole batch's steps would miss, but its own
    steps alone can meet, is stepped apart while the rest of the batch waits; then the batch goes on as one.
    Every request still gets the tokens it gets alone."""
    engine, _ = hand_stepped(tiny_variant_dir)
    # predicted steps: 100 ms for one row, 400 for four; `smoothing=0` keeps them (the tiny model's real
    # steps take a millisecond)
    engine.profile = CostProfile(10.0, 1.0, step_b1_ms=100.0, step_b8_ms=800.0, load_ms=0.0, smoothing=0.0)
    loose_prompts = [[5, 6, 7], [20, 21, 22, 23], [30, 31]]
    tight_prompt = [40, 41, 42, 43, 44]
    params = SamplingParams(max_tokens=20, temperature=0, ignore_eos=True)
    tight_params = SamplingParams(max_tokens=10, temperature=0, ignore_eos=True)

    async def scenario() -> tuple[list[list[int]], list[int], list[tuple[int, ...]]]:
        loose = [engine.submit(p, params, deadline=time.perf_counter() + 600) for p in loose_prompts]
        for _ in range(4):
            engine.step()
        # 10 tokens: 1 s alone, 5 s at the batch of four's 400 ms x SAFETY; the budget is 3 s
        tight = engine.submit(tight_prompt, tight_params, deadline=time.perf_counter() + 3)
        progress = []  # per turn: tokens each request has streamed so far
        while engine.running or engine.waiting:
            engine.step()
            await asyncio.sleep(0)  # deliver the turn's events
            progress.append(tuple(h.queue.qsize() for h in [*loose, tight]))
        loose_tokens = [(await run(h))[0] for h in loose]
        return loose_tokens, (await run(tight))[0], progress

    loose_tokens, tight_tokens, progress = asyncio.run(scenario())
    assert loose_tokens == [reference_greedy(tiny_loaded, p, 20) for p in loose_prompts]
    assert tight_tokens == reference_greedy(tiny_loaded, tight_prompt, 10)
    tight_done = progress.index(next(p for p in progress if p[3] == 10))  # the turn it got its last token
    assert tight_done == 8  # its prefill and first step in one turn, then eight more, back to back
    # in some of those turns it stepped alone while the loose requests waited (the batch would have missed)
    apart = [b for a, b in itertools.pairwise(progress[: tight_done + 1]) if b[:3] == a[:3] and b[3] > a[3]]
    assert apart
    assert progress[-1][:3] == (20, 20, 20)  # then they went on and finished


def test_the_batch_goes_on_by_itself_once_the_rows_stepped_apart_are_done(tiny_variant_dir: Path) -> None:
    """On the compute thread: after a tight request stepped apart from a busy batch finishes, the rest of the
    batch finishes without another request arriving. The turn in which the apart rows all finished used to
    report no work (its list of stepped rows was empty by then), so the compute thread left the engine
    until the next wake: in a routing replay, loose requests on that engine waited for the next arrival
    and finished together with it, seconds past their budgets."""
    compute = ComputeThread(name="compute-apart")
    engine = TransformersEngine(
        lambda: load_variant(tiny_variant_dir, dtype="fp32"), name="tiny", metrics=ServerMetrics(), compute=compute
    )
    engine.start()
    assert engine.wait_ready(60)
    # predicted steps of 100 ms alone, 400 ms for four (the tiny model's real ones take about a millisecond)
    engine.profile = CostProfile(10.0, 1.0, step_b1_ms=100.0, step_b8_ms=800.0, load_ms=0.0, smoothing=0.0)
    params = SamplingParams(max_tokens=40, temperature=0, ignore_eos=True)

    async def scenario() -> list[int]:
        loose = [engine.submit(p, params, deadline=time.perf_counter() + 600) for p in ([5, 6, 7], [20, 21], [30])]
        events = loose[0].events()
        for _ in range(2):  # the batch is under way
            await anext(events)
        # 10 tokens: 1 s alone, 5 s at the batch of four's pace x SAFETY; the budget is 3 s: stepped apart
        tight = engine.submit(
            [40, 41, 42],
            SamplingParams(max_tokens=10, temperature=0, ignore_eos=True),
            deadline=time.perf_counter() + 3,
        )
        runs = await asyncio.wait_for(asyncio.gather(run(tight), *(run(h) for h in loose[1:])), 20)
        rest = [t for e in [e async for e in events] for t in e.token_ids]
        return [len(tokens) for tokens, _ in runs] + [2 + len(rest)]

    try:
        assert asyncio.run(scenario()) == [10, 40, 40, 40]
    finally:
        engine.shutdown()


def test_the_turn_trace_records_each_prefill_and_every_step_of_a_request(
    tiny_variant_dir: Path, tmp_path: Path
) -> None:
    """`--trace-turns`: one line per turn, naming the sequence the engine returned for the request."""
    compute = ComputeThread(name="compute-traced")
    trace = tmp_path / "turns.jsonl"
    compute.trace_turns(trace)
    engine = TransformersEngine(
        lambda: load_variant(tiny_variant_dir, dtype="fp32"), name="tiny", metrics=ServerMetrics(), compute=compute
    )
    engine.start()
    assert engine.wait_ready(60)

    async def main() -> RequestHandle:
        params = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)
        handle = engine.submit([5, 6, 7, 8], params, deadline=time.perf_counter() + 30)
        await run(handle)
        return handle

    try:
        began = time.perf_counter()
        handle = asyncio.run(main())
    finally:
        engine.shutdown()
        compute.trace_turns(None)
    turns = [json.loads(line) for line in trace.read_text().splitlines()]
    assert {t["engine"] for t in turns} == {"tiny"}
    assert [t["warm_up"] for t in turns if "warm_up" in t] == [7, 6, 5, 4, 3, 2, 1]  # prefill, rows, 5 batch sizes
    turns = [t for t in turns if "warm_up" not in t]
    prefills = [p for t in turns for p in t["prefills"]]
    assert [(p["id"], p["prompt"], p["max"]) for p in prefills] == [(handle.request_id, 4, 6)]
    assert 0 < prefills[0]["left_s"] <= 30
    # the prefill gives the first token, each decode step one more
    assert sum(handle.request_id in t.get("rows", []) for t in turns) == 5
    assert all(began <= t["at"] and t["s"] >= 0 for t in turns)


def test_prefill_chunks_split_a_long_prompt_evenly() -> None:
    assert prefill_chunks(10) == [10]
    assert prefill_chunks(PREFILL_TOKENS) == [PREFILL_TOKENS]
    assert prefill_chunks(PREFILL_TOKENS + 1) == [65, 64]
    assert prefill_chunks(300, per_turn=128) == [100, 100, 100]
    prompt = list(range(300))
    pieces, done = [], 0
    while chunk := prompt_chunk(prompt, done):
        pieces.append(chunk)
        done += len(chunk)
    assert [len(p) for p in pieces] == prefill_chunks(300)
    assert [t for p in pieces for t in p] == prompt


def test_a_long_prompt_is_prefilled_a_chunk_per_turn_while_the_batch_goes_on(
    tiny_variant_dir: Path, tiny_loaded: LoadedVariant
) -> None:
    """A prompt longer than `PREFILL_TOKENS` takes one chunk per turn, and the running batch still steps in
    each of those turns; the chunked prompt's tokens are the ones whole-prompt generation gives."""
    engine, loaded = hand_stepped(tiny_variant_dir)
    long_prompt = two_chunk_prompt(loaded)
    short_prompt = [30, 31, 32]
    params = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)

    async def scenario() -> tuple[list[int], list[int], list[dict[str, Any]], list[tuple[int, int]]]:
        short = engine.submit(short_prompt, params, deadline=time.perf_counter() + 600)
        engine.step()  # the short prompt's prefill and its first decode step
        long = engine.submit(long_prompt, params, deadline=time.perf_counter() + 600)
        turns, progress = [], []
        for _ in range(2):
            engine.step()
            await asyncio.sleep(0)  # deliver the turn's events
            turns.append(dict(engine.last_turn()))
            progress.append((short.queue.qsize(), long.queue.qsize()))
            assert engine.running == 2 and engine.waiting == 0
        while engine.running:
            engine.step()
        return (await run(short))[0], (await run(long))[0], turns, progress

    short_tokens, long_tokens, turns, progress = asyncio.run(scenario())
    chunks = [[(p["tokens"], p["last"]) for p in t["prefills"]] for t in turns]
    assert chunks == [[(PREFILL_TOKENS - 5, False)], [(PREFILL_TOKENS - 5, True)]]
    assert all(t["rows"] for t in turns)  # the short request stepped in both turns
    assert progress == [(3, 0), (4, 2)]  # once its prompt is in: its first token, and a step with the batch
    assert short_tokens == reference_greedy(tiny_loaded, short_prompt, 8)
    assert long_tokens == reference_greedy(tiny_loaded, long_prompt, 8)


def test_a_request_due_sooner_is_prefilled_between_the_chunks_of_a_long_prompt(
    tiny_variant_dir: Path, tiny_loaded: LoadedVariant
) -> None:
    """Earliest deadline first within an engine's prefills: a one-chunk prompt due before a long prompt under
    way takes the next turn's prefill, and the long prompt's next chunk the turn after; one due later
    waits for the long prompt. Both still generate what whole-prompt generation gives."""
    engine, loaded = hand_stepped(tiny_variant_dir)
    long_prompt = two_chunk_prompt(loaded)
    short_prompt = [30, 31, 32]
    params = SamplingParams(max_tokens=4, temperature=0, ignore_eos=True)

    async def scenario(short_due_in_s: float) -> tuple[list[tuple[str, bool]], list[tuple[str, bool]]]:
        long = engine.submit(long_prompt, params, deadline=time.perf_counter() + 300)
        engine.step()  # the long prompt's first chunk
        short = engine.submit(short_prompt, params, deadline=time.perf_counter() + short_due_in_s)
        prefills = []
        for _ in range(2):
            engine.step()
            prefills += [(p["id"], p["last"]) for p in engine.last_turn()["prefills"]]
        while engine.running or engine.waiting:
            engine.step()
        assert (await run(long))[0] == reference_greedy(tiny_loaded, long_prompt, 4)
        assert (await run(short))[0] == reference_greedy(tiny_loaded, short_prompt, 4)
        return prefills, [(short.request_id, True), (long.request_id, True)]

    prefills, short_then_long = asyncio.run(scenario(30))
    assert prefills == short_then_long
    prefills, short_then_long = asyncio.run(scenario(600))
    assert prefills == short_then_long[::-1]


def test_rows_due_before_an_urgent_row_step_apart_with_it(tiny_variant_dir: Path) -> None:
    """Earliest deadline first inside a batch: a loose request that the batch's pace makes urgent steps apart
    together with a request due sooner that is not urgent yet, rather than ahead of it; a request without a
    budget waits. In a routing run the one due sooner waited, fell past saving and missed its budget."""
    engine, _ = hand_stepped(tiny_variant_dir)
    # predicted steps: 20 ms for one row, 60 for three; `smoothing=0` keeps them
    engine.profile = CostProfile(10.0, 1.0, step_b1_ms=20.0, step_b8_ms=160.0, load_ms=0.0, smoothing=0.0)

    def params(tokens: int) -> SamplingParams:
        return SamplingParams(max_tokens=tokens, temperature=0, ignore_eos=True)

    async def scenario() -> tuple[list[str], list[str], bool]:
        # 100 tokens: 7.5 s at the batch of three's pace with SAFETY, 2 s alone; due in 6 s: urgent
        loose = engine.submit([5, 6, 7], params(100), deadline=time.perf_counter() + 6)
        # 10 tokens: 0.75 s at the batch's pace with SAFETY; due in 3 s: not urgent, but due first
        sooner = engine.submit([8, 9], params(10), deadline=time.perf_counter() + 3)
        unbudgeted = engine.submit([10, 11, 12], params(100))
        while engine.waiting:
            engine.step()
        engine.step()
        turn = engine.last_turn()
        for handle in (loose, sooner, unbudgeted):
            handle.cancel()
        engine.step()
        return turn["rows"], [loose.request_id, sooner.request_id], turn["apart"]

    rows, due_first, apart = asyncio.run(scenario())
    assert sorted(rows) == sorted(due_first) and apart
