"""What both completion endpoints (`routes/chat_completions.py`, `routes/completions.py`) share: a validated
request's sampling parameters and constraint, its sequences submitted, watched and collected (or streamed
as SSE), and the OpenAI shapes of usage, logprobs and finish reasons.

Chat and legacy completions differ only in how the prompt is built (`prompts`) and how a choice is shaped.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
from collections.abc import AsyncGenerator, Callable
from contextlib import aclosing
from dataclasses import dataclass, field
from typing import Any

from fastapi import Request
from fastapi.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

from slimserve.server.errors import APIError
from slimserve.server.prompts import check_vocabulary
from slimserve.server.protocol import (
    ChatCompletionRequest,
    ChatLogprob,
    ChoiceLogprobs,
    CompletionLogprobs,
    CompletionRequest,
    TopLogprob,
    UsageInfo,
)
from slimserve.server.sampling import SamplingParams, TokenLogprob
from slimserve.server.serving_engine import (
    EngineBusyError,
    EngineNotReadyError,
    GenerationEvent,
    RequestHandle,
    ServingEngine,
)
from slimserve.server.structured import Constraint, SchemaError, check

log = logging.getLogger(__name__)


@dataclass
class ChoiceResult:
    """Everything one choice produced, accumulated from its events."""

    text: str = ""
    logprobs: list[TokenLogprob] = field(default_factory=list)
    finish_reason: str | None = None
    completion_tokens: int = 0
    error: str | None = None

    def add(self, event: GenerationEvent) -> None:
        self.text += event.text
        self.logprobs += event.logprobs
        self.completion_tokens = max(self.completion_tokens, event.completion_tokens)
        self.finish_reason = event.finish_reason or self.finish_reason
        self.error = event.error or self.error


def resolve_max_tokens(
    engine: ServingEngine, prompt_len: int, requested: int | None, param: str, default_cap: int | None
) -> int:
    """vLLM's rule, with a cap: an omitted max_tokens is what the context has left, at most `default_cap`
    (a small model that loops would otherwise hold a CPU for thousands of tokens); a requested value
    that does not fit is a 400 with both numbers."""
    context = engine.context_length
    if requested is None:
        if prompt_len >= context:
            raise APIError(
                400,
                f"This model's maximum context length is {context} tokens, but the prompt has "
                f"{prompt_len} tokens, leaving no room for a completion.",
                param="messages",
                code="context_length_exceeded",
            )
        left = context - prompt_len
        return left if default_cap is None else min(left, default_cap)
    if prompt_len + requested > context:
        raise APIError(
            400,
            f"This model's maximum context length is {context} tokens. However, you requested "
            f"{prompt_len + requested} tokens ({prompt_len} in the prompt, {requested} for the completion). "
            f"Please reduce the prompt or {param}.",
            param=param,
            code="context_length_exceeded",
        )
    return requested


def submit_all(
    engine: ServingEngine,
    prompts: list[list[int]],
    make_params: Callable[[int], SamplingParams],
    n: int,
    deadline: float | None = None,
) -> list[RequestHandle]:
    """Submit prompts x n sequences (choice index = prompt * n + j); all or none. `deadline`: when the
    request's latency budget ends (`time.perf_counter()`), if it has one.

    A request of more sequences than the engine ever holds (batch slots plus waiting places) is a 400 that
    says the limit: a 429 would have it retried forever. A full engine is a 429 whose Retry-After is the
    engine's estimate of when enough of what it holds will have finished."""
    capacity = engine.max_batch_size + engine.max_waiting
    count = len(prompts) * n
    if count > capacity:
        raise APIError(
            400,
            f"this request needs {count} sequences ({len(prompts)} prompts x n={n}), more than the "
            f"{capacity} this model serves at once ({engine.max_batch_size} running + {engine.max_waiting} "
            "waiting); send fewer prompts or a smaller n",
            param="n" if n > 1 else "prompt",
            code="request_too_large",
        )
    try:
        sequences = [(ids, make_params(p * n + j)) for p, ids in enumerate(prompts) for j in range(n)]
        return engine.submit_many(sequences, deadline)
    except EngineBusyError as exc:
        retry = max(1, math.ceil(exc.retry_after_s))
        raise APIError(
            429, f"server is busy: {exc}; retry after {retry} s", code="queue_full", headers={"Retry-After": str(retry)}
        ) from exc
    except EngineNotReadyError as exc:
        raise APIError(503, str(exc), code="model_not_ready") from exc
    except ValueError as exc:  # parameters the model cannot honour (the app checks logit_bias ids before)
        raise APIError(400, str(exc), param="logit_bias", code="invalid_value") from exc


async def merged_events(handles: list[RequestHandle]) -> AsyncGenerator[tuple[int, GenerationEvent]]:
    """Events of all choices as they come, tagged with the choice index."""
    merged: asyncio.Queue[tuple[int, GenerationEvent]] = asyncio.Queue()

    async def pump(index: int, handle: RequestHandle) -> None:
        async for event in handle.events():
            await merged.put((index, event))

    tasks = [asyncio.create_task(pump(i, h)) for i, h in enumerate(handles)]
    try:
        remaining = len(handles)
        while remaining:
            index, event = await merged.get()
            if event.finish_reason is not None:
                remaining -= 1
            yield index, event
    finally:
        for task in tasks:
            task.cancel()


async def client_gone(request: Request) -> None:
    """Return once the client has disconnected. The body has been read, so the next message the server
    sends is `http.disconnect`, at once when the connection drops."""
    while (await request.receive())["type"] != "http.disconnect":
        await asyncio.sleep(0.05)  # not a server that follows the ASGI spec: do not spin


async def collect(request: Request, handles: list[RequestHandle]) -> list[ChoiceResult]:
    """Run every choice to the end; stop them all the moment the client goes away."""
    results = [ChoiceResult() for _ in handles]

    async def gather() -> None:
        async for index, event in merged_events(handles):
            results[index].add(event)

    gathering = asyncio.create_task(gather())
    watching = asyncio.create_task(client_gone(request))
    try:
        await asyncio.wait([gathering, watching], return_when=asyncio.FIRST_COMPLETED)
        if not gathering.done():
            gathering.cancel()
            raise APIError(499, "client disconnected", code="client_disconnected")
        gathering.result()
    finally:
        watching.cancel()
        for h in handles:
            if not h.finished:
                h.cancel()
    for result in results:
        if result.finish_reason == "error":
            raise APIError(500, "generation failed", code="generation_error")
        if result.finish_reason == "abort" and result.error:  # ended by the server (shutdown), not the client
            raise APIError(503, f"generation stopped: {result.error}", code="server_shutting_down")
    return results


def usage(prompt_lens: list[int], results: list[ChoiceResult]) -> UsageInfo:
    return token_usage(prompt_lens, sum(r.completion_tokens for r in results))


def token_usage(prompt_lens: list[int], completion_tokens: int) -> UsageInfo:
    prompt = sum(prompt_lens)
    return UsageInfo(prompt_tokens=prompt, completion_tokens=completion_tokens, total_tokens=prompt + completion_tokens)


def token_text(tokenizer: Any, token_id: int) -> str:
    return str(tokenizer.decode([token_id]))


def chat_logprobs(tokenizer: Any, logprobs: list[TokenLogprob]) -> ChoiceLogprobs:
    content = []
    for lp in logprobs:
        text = token_text(tokenizer, lp.token_id)
        top = []
        for tid, value in lp.top:
            alt = token_text(tokenizer, tid)
            top.append(TopLogprob(token=alt, logprob=value, bytes=list(alt.encode())))
        content.append(ChatLogprob(token=text, logprob=lp.logprob, bytes=list(text.encode()), top_logprobs=top))
    return ChoiceLogprobs(content=content)


def completion_logprobs(tokenizer: Any, logprobs: list[TokenLogprob], offset: int) -> CompletionLogprobs:
    out = CompletionLogprobs()
    for lp in logprobs:
        text = token_text(tokenizer, lp.token_id)
        out.tokens.append(text)
        out.token_logprobs.append(lp.logprob)
        out.top_logprobs.append({token_text(tokenizer, t): v for t, v in lp.top} if lp.top else None)
        out.text_offset.append(offset)
        offset += len(text)
    return out


def sse(payload: Any) -> str:
    body = payload.model_dump_json() if hasattr(payload, "model_dump_json") else json.dumps(payload)
    return f"data: {body}\n\n"


async def stream_events(
    handles: list[RequestHandle],
    make_chunk: Callable[[int, GenerationEvent | None], Any],
    final_usage: Callable[[int], Any] | None,
) -> AsyncGenerator[str]:
    """SSE framing shared by both endpoints: chunks, an error chunk if generation fails, then [DONE].

    `make_chunk(index, None)` is the opening chunk of a choice (chat sends the role there).
    A client that disconnects cancels this generator, and with it every sequence of the request.
    """
    completion_tokens = 0
    try:
        for index in range(len(handles)):
            opening = make_chunk(index, None)
            if opening is not None:
                yield sse(opening)
        async with aclosing(merged_events(handles)) as events:
            async for index, event in events:
                if event.finish_reason == "error":
                    yield APIError(500, f"generation failed: {event.error}", code="generation_error").sse_chunk()
                    break
                if event.finish_reason == "abort" and event.error:  # ended by the server (shutdown), not the client
                    yield APIError(503, f"generation stopped: {event.error}", code="server_shutting_down").sse_chunk()
                    break
                if event.finish_reason is not None:
                    completion_tokens += event.completion_tokens
                if event.text or event.finish_reason is not None or event.logprobs:
                    yield sse(make_chunk(index, event))
            else:
                if final_usage is not None:
                    yield sse(final_usage(completion_tokens))
        yield "data: [DONE]\n\n"
    finally:
        for h in handles:
            if not h.finished:
                h.cancel()


def submitter(
    body: ChatCompletionRequest | CompletionRequest, top_logprobs: int | None, constraint: Constraint | None
) -> Callable[[ServingEngine, list[list[int]], int, float | None], list[RequestHandle]]:
    """How a request's sequences are queued on the engine chosen for it (`Dispatcher.dispatch`'s `submit`):
    its logit_bias ids checked against that model's vocabulary, that model's sampling defaults for the
    fields it leaves out, prompts x n sequences, all or none."""

    def submit(
        engine: ServingEngine, prompts: list[list[int]], max_tokens: int, deadline: float | None
    ) -> list[RequestHandle]:
        check_vocabulary(engine, body.token_bias(), "logit_bias")
        make = params_factory(body, max_tokens, top_logprobs, engine.sampling_defaults, constraint)
        return submit_all(engine, prompts, make, body.n, deadline)

    return submit


def params_factory(
    body: ChatCompletionRequest | CompletionRequest,
    max_tokens: int,
    top_logprobs: int | None,
    defaults: dict[str, Any],
    constraint: Constraint | None = None,
) -> Callable[[int], SamplingParams]:
    """Sampling parameters for choice i: with a seed, choice i uses seed + i so choices differ yet repeat.

    Fields the request leaves out take the model's own defaults (its generation_config.json), as vLLM does.
    """
    temperature = body.temperature if body.temperature is not None else defaults.get("temperature", 1.0)
    top_p = body.top_p if body.top_p is not None else defaults.get("top_p", 1.0)
    top_k = body.top_k if body.top_k is not None else defaults.get("top_k", 0)

    def make(index: int) -> SamplingParams:
        return SamplingParams(
            max_tokens=max_tokens,
            temperature=temperature,
            top_p=top_p,
            top_k=top_k,
            presence_penalty=body.presence_penalty,
            frequency_penalty=body.frequency_penalty,
            seed=None if body.seed is None else body.seed + index,
            stop=body.stop_list(),
            logprobs=top_logprobs,
            ignore_eos=body.ignore_eos,
            logit_bias=body.token_bias(),
            constraint=constraint,
        )

    return make


def request_constraint(body: ChatCompletionRequest | CompletionRequest) -> Constraint | None:
    """The JSON the output must be (a required tool call's, else the response format's), checked against the
    grammar library before routing: a schema it cannot compile is a 400 naming the field."""
    try:
        constraint = body.tool_constraint() if isinstance(body, ChatCompletionRequest) else None
        constraint = constraint or body.constraint()
        if constraint is not None:
            check(constraint)
    except SchemaError as exc:
        raise APIError(400, str(exc), param=exc.param, code="invalid_schema") from exc
    return constraint


def openai_finish(reason: str | None) -> str | None:
    """OpenAI knows `stop` and `length` (and `tool_calls`, set by the chat route); an aborted sequence
    reports `stop`."""
    return "stop" if reason == "abort" else reason


class EventStreamResponse(StreamingResponse):
    """Server-sent events from a generator that is closed however the response ends. Starlette leaves a
    generator waiting at a `yield` (a `send` that failed because the client left) to garbage collection, so
    its `finally`, which cancels the sequences, would run only when collected."""

    def __init__(self, events: AsyncGenerator[str], headers: dict[str, str]) -> None:
        super().__init__(
            events,
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no", **headers},
        )
        self.events = events

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            await self.events.aclose()


def log_extra_fields(body: Any) -> None:
    """Fields the server ignores (they do not change the output), at debug level and truncated: the names
    are the client's, and a client must not be able to fill the log."""
    extra = sorted((body.model_extra or {}).keys())
    if extra:
        log.debug("ignoring request fields: %s", ", ".join(repr(name[:40]) for name in extra[:10]))
