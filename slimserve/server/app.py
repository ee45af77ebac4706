"""The FastAPI application: OpenAI routes, health, metrics, auth, one error shape."""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

from fastapi import APIRouter, FastAPI, Request, Response
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse

from slimserve import __version__
from slimserve.server import completions as flow
from slimserve.server import status
from slimserve.server.engine import EngineNotReadyError, GenerationEvent, RequestHandle, ServingEngine
from slimserve.server.errors import APIError, install_error_handlers
from slimserve.server.metrics import ServerMetrics
from slimserve.server.middleware import CountRequests, RequireKey
from slimserve.server.openapi import STREAM_RESPONSE, error_responses, install_openapi
from slimserve.server.pool import VariantPool
from slimserve.server.protocol import (
    ChatChoice,
    ChatChunkChoice,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    CompletionChoice,
    CompletionRequest,
    CompletionResponse,
    DeltaMessage,
    HealthResponse,
    ModelCard,
    ModelList,
    ResponseMessage,
    UsageInfo,
)
from slimserve.server.router import Budget, BudgetError, Decision, Router, parse_budget
from slimserve.server.sampling import SamplingParams
from slimserve.server.shutdown import ENGINE_STOP_S, SHUTTING_DOWN, Drain
from slimserve.server.structured import Constraint, SchemaError, check
from slimserve.server.tool_calls import ToolCallPlan, ToolCallStream, template_call_format

log = logging.getLogger(__name__)


@dataclass
class Dispatch:
    """Where a request went: the engine, its handles, and the router's decision (None: named exactly)."""

    engine: ServingEngine
    prompts: list[list[int]]
    max_tokens: int
    handles: list[RequestHandle]
    decision: Decision | None
    budget: Budget | None
    started: float


def create_app(
    engines: Sequence[ServingEngine],
    metrics: ServerMetrics,
    api_key: str | None = None,
    default_max_tokens: int | None = 1024,
    memory_budget_mb: float | None = None,
    default_budget: Budget | None = None,
    public_metrics: bool = False,
) -> FastAPI:
    """Build the app around engines that the caller created (the pool starts and stops them).

    `default_max_tokens` caps requests that give no max_tokens (None: the whole remaining context).
    Variants beyond `memory_budget_mb` stay on disk until a request needs them. `default_budget` applies
    to routed requests that carry no budget of their own. `api_key` guards every route but /health (the
    probes') and, with `public_metrics`, /metrics. `app.state.drain` ends open requests at shutdown."""
    pool = VariantPool(engines, metrics, memory_budget_mb)
    router = Router(shared_compute=any(e.shares_compute for e in engines))
    server_budget = default_budget or Budget()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        pool.start()
        yield
        pool.shutdown(ENGINE_STOP_S)

    app = FastAPI(title="slimserve", version=__version__, lifespan=lifespan)
    app.state.drain = drain = Drain()
    install_error_handlers(app)
    open_paths = {"/health", "/metrics"} if public_metrics else {"/health"}
    install_openapi(app, protected=api_key is not None, open_paths=open_paths)
    app.add_middleware(RequireKey, api_key=api_key, open_paths=open_paths)
    app.add_middleware(  # outermost: requests refused for their key are counted too
        CountRequests,
        metrics=metrics,
        served=lambda: pool.entries.keys(),
        endpoints=lambda: {getattr(r, "path", "") for r in app.routes},
    )
    v1 = APIRouter(prefix="/v1")

    @app.get(
        "/health",
        response_model=HealthResponse,
        responses={503: {"model": HealthResponse, "description": "Loading, or nothing can serve."}},
    )
    async def health() -> JSONResponse:
        body, code = status.health(pool, drain.draining)
        return JSONResponse(body.model_dump(exclude_none=True), status_code=code)

    @app.get("/metrics", response_class=PlainTextResponse)
    async def prometheus() -> Response:
        return Response(metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")

    @v1.get("/models")
    async def list_models() -> ModelList:
        return ModelList(data=status.cards(pool))

    @v1.get("/models/{model_id:path}", responses=error_responses(404))
    async def get_model(model_id: str) -> ModelCard:
        for found in status.cards(pool):
            if found.id == model_id:
                return found
        raise APIError(404, f"The model '{model_id}' does not exist.", param="model", code="model_not_found")

    @v1.post("/slimserve/variants/{name}/load", responses=error_responses(404, 503))
    async def load_variant(name: str) -> ModelCard:
        """Load a variant now (again, if it failed to load): its card once ready, else 503 with the reason."""
        entry = pool.entries.get(name)
        if entry is None:
            raise APIError(404, f"The model '{name}' is not a variant this server serves.", param="name")
        await pool.reload(entry)
        return status.card(pool, entry)

    @v1.get("/slimserve/router")
    async def router_state() -> dict[str, Any]:
        """Live profiles, residency and the router's last decisions."""
        return status.router_state(pool, router, server_budget)

    async def dispatch(
        request: Request,
        model: str,
        extension: dict[str, Any] | None,
        build_prompts: Callable[[ServingEngine], list[list[int]]],
        requested_max: int | None,
        max_param: str,
        submit: Callable[[ServingEngine, list[list[int]], int, float | None], list[RequestHandle]],
        constrained: bool = False,
    ) -> Dispatch:
        """Choose the variant (exactly named, or by the router), then submit; a full queue falls through to
        the router's next choice before the client sees 429. A `constrained` request (structured output)
        costs its engine's masking per token on top of the profiles' figures: the probed engine's measured
        overhead (the variants of a family share a tokenizer, so one figure serves them all; the vLLM
        backend reports none, its masking is inside the steps it times)."""
        arrived = time.perf_counter()
        if drain.draining:
            raise APIError(503, f"{SHUTTING_DOWN}: not accepting requests", code="server_shutting_down")
        entries, routed = pool.targets(model)
        decision: Decision | None = None
        budget: Budget | None = None
        order = entries
        if routed:
            try:
                budget = parse_budget({k.lower(): v for k, v in request.headers.items()}, extension, server_budget)
                probe = next((e for e in entries if e.resident), entries[0])
                probe_engine = await pool.acquire(probe)
                pool.release(probe)
                prompt_tokens = max(len(p) for p in build_prompts(probe_engine))
                expected = requested_max or default_max_tokens or 256
                extra_ms = expected * getattr(probe_engine, "mask_ms_per_token", 0.0) if constrained else 0.0
                order, decision = router.choose(list(entries), budget, prompt_tokens, expected, extra_ms)
            except BudgetError as exc:
                raise APIError(400, str(exc), param=exc.param) from exc
        last_error: APIError | None = None
        for position, entry in enumerate(order):
            engine = await pool.acquire(entry)
            try:
                prompts = build_prompts(engine)
                max_tokens = flow.resolve_max_tokens(
                    engine, max(len(p) for p in prompts), requested_max, max_param, default_max_tokens
                )
                # the router protects this deadline when it places later requests; the compute thread orders
                # turns by it. A request predicted to miss keeps its own: predictions overstate often enough
                # that many such requests still make their budgets
                deadline = arrived + budget.latency_ms / 1000 if budget and budget.latency_ms else None
                handles = submit(engine, prompts, max_tokens, deadline)
            except EngineNotReadyError as exc:  # stopped or evicted between acquire and submit
                raise APIError(503, str(exc), code="model_not_ready") from exc
            except APIError as exc:
                if exc.status == 429 and routed and position + 1 < len(order):
                    last_error = exc
                    continue
                raise
            finally:
                pool.release(entry)
            if decision is not None:
                if position > 0:  # what the router learns from this request is about the variant that served it
                    decision.reason += f"; {order[0].name} was full, shed to {entry.name}"
                    decision.variant = entry.name
                    decision.predicted_ms = decision.candidates.get(entry.name, decision.predicted_ms)
                met = "none" if decision.budget_met is None else ("met" if decision.budget_met else "missed")
                metrics.routed.labels(entry.name, met).inc()
            request.state.model = engine.name
            drain.track(handles)
            return Dispatch(engine, prompts, max_tokens, handles, decision, budget, arrived)
        assert last_error is not None
        raise last_error

    def routing_headers(sent: Dispatch) -> dict[str, str]:
        # the engine's ids of its sequences, as the compute thread's turn trace (`--trace-turns`) names them
        headers = {
            "X-Slimserve-Variant": sent.engine.name,
            "X-Slimserve-Sequences": ",".join(h.request_id for h in sent.handles),
        }
        if sent.decision is not None:
            met = sent.decision.budget_met
            headers["X-Slimserve-Budget"] = "none" if met is None else ("predicted-met" if met else "predicted-missed")
            headers["X-Slimserve-Predicted-Ms"] = f"{sent.decision.predicted_ms:.0f}"
            # which rule chose (the same text as in /v1/slimserve/router's decisions), so a client or a
            # benchmark can tell a shed or a fallback from the best fit without polling that endpoint
            headers["X-Slimserve-Route-Reason"] = sent.decision.reason
        return headers

    def record_outcome(sent: Dispatch) -> None:
        """Budget met or not (metrics); a routed request that ended on its own (EOS, a stop string or its
        length, streamed or not) also calibrates the router, per output token (`Router.observe`). One the
        client left or that failed says nothing about the prediction."""
        elapsed_ms = 1000 * (time.perf_counter() - sent.started)
        ended = all(h.finish_reason in ("stop", "length") for h in sent.handles)
        if sent.decision is not None and sent.handles and ended:
            router.observe(sent.decision, elapsed_ms, max(h.completion_tokens for h in sent.handles))
        if sent.budget is not None and sent.budget.latency_ms is not None:
            outcome = "within" if elapsed_ms <= sent.budget.latency_ms else "over"
            metrics.budget_outcome.labels(sent.engine.name, outcome).inc()

    async def tracked(sent: Dispatch, events: AsyncIterator[str]) -> AsyncIterator[str]:
        try:
            async for item in events:
                yield item
        finally:
            record_outcome(sent)

    @v1.post(
        "/chat/completions",
        response_model=ChatCompletionResponse,
        responses=STREAM_RESPONSE | error_responses(400, 404, 429, 503),
    )
    async def chat_completions(
        body: ChatCompletionRequest, request: Request, response: Response
    ) -> ChatCompletionResponse | StreamingResponse:
        request.state.model = body.model
        _log_extra_fields(body)
        param = "max_completion_tokens" if body.max_completion_tokens is not None else "max_tokens"
        top = (body.top_logprobs or 0) if body.logprobs else None
        constraint = _request_constraint(body)

        def submit(
            engine: ServingEngine, prompts: list[list[int]], max_tokens: int, deadline: float | None
        ) -> list[RequestHandle]:
            flow.check_vocabulary(engine, body.token_bias(), "logit_bias")
            make = _params_factory(body, max_tokens, top, engine.sampling_defaults, constraint)
            return flow.submit_all(engine, prompts, make, body.n, deadline)

        sent = await dispatch(
            request,
            body.model,
            body.slimserve,
            lambda engine: [flow.chat_prompt_ids(engine, body.messages, body.tools)],
            body.requested_max_tokens(),
            param,
            submit,
            constrained=constraint is not None,
        )
        engine, prompt, handles = sent.engine, sent.prompts[0], sent.handles
        tokenizer = engine.tokenizer
        headers = routing_headers(sent)
        plan = _tool_plan(body, tokenizer)

        if body.stream:
            chunk_id, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
            calls = [ToolCallStream(plan) for _ in handles] if plan is not None else None

            def make_chunk(index: int, event: GenerationEvent | None) -> ChatCompletionChunk:
                if event is None:
                    opening = DeltaMessage(role="assistant", content=None if calls else "")
                    choice = ChatChunkChoice(index=index, delta=opening)
                else:
                    delta = DeltaMessage(content=event.text or None)
                    finish = _openai_finish(event.finish_reason)
                    if calls is not None:
                        delta = calls[index].message(event.text, finish is not None)
                        finish = calls[index].finish_reason(finish)
                    choice = ChatChunkChoice(
                        index=index,
                        delta=delta,
                        logprobs=flow.chat_logprobs(tokenizer, event.logprobs) if top is not None else None,
                        finish_reason=finish,
                    )
                return ChatCompletionChunk(id=chunk_id, created=created, model=engine.name, choices=[choice])

            def final_usage(completion_tokens: int) -> ChatCompletionChunk:
                return ChatCompletionChunk(
                    id=chunk_id,
                    created=created,
                    model=engine.name,
                    choices=[],
                    usage=UsageInfo(
                        prompt_tokens=len(prompt),
                        completion_tokens=completion_tokens,
                        total_tokens=len(prompt) + completion_tokens,
                    ),
                )

            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            events = flow.stream_events(handles, make_chunk, final_usage if include_usage else None)
            return _sse_response(tracked(sent, events), headers)

        results = await flow.collect(request, handles)
        record_outcome(sent)
        response.headers.update(headers)
        choices = []
        for i, r in enumerate(results):
            message, finish = ResponseMessage(content=r.text), _openai_finish(r.finish_reason)
            tool_calls = plan.calls(r.text) if plan is not None else None
            if tool_calls and plan is not None:
                message = ResponseMessage(content=plan.content(r.text), tool_calls=tool_calls)
                finish = "tool_calls" if finish == "stop" else finish
            choices.append(
                ChatChoice(
                    index=i,
                    message=message,
                    logprobs=flow.chat_logprobs(tokenizer, r.logprobs) if top is not None else None,
                    finish_reason=finish,
                )
            )
        return ChatCompletionResponse(model=engine.name, choices=choices, usage=flow.usage([len(prompt)], results))

    @v1.post(
        "/completions",
        response_model=CompletionResponse,
        responses=STREAM_RESPONSE | error_responses(400, 404, 429, 503),
    )
    async def completions(
        body: CompletionRequest, request: Request, response: Response
    ) -> CompletionResponse | StreamingResponse:
        request.state.model = body.model
        _log_extra_fields(body)
        constraint = _request_constraint(body)

        def submit(
            engine: ServingEngine, prompts: list[list[int]], max_tokens: int, deadline: float | None
        ) -> list[RequestHandle]:
            flow.check_vocabulary(engine, body.token_bias(), "logit_bias")
            make = _params_factory(body, max_tokens, body.logprobs, engine.sampling_defaults, constraint)
            return flow.submit_all(engine, prompts, make, body.n, deadline)

        sent = await dispatch(
            request,
            body.model,
            body.slimserve,
            lambda engine: [flow.text_prompt_ids(engine, p) for p in body.prompts()],
            body.max_tokens,
            "max_tokens",
            submit,
            constrained=constraint is not None,
        )
        engine, prompts, handles = sent.engine, sent.prompts, sent.handles
        tokenizer = engine.tokenizer
        headers = routing_headers(sent)
        echoes = [tokenizer.decode(p, skip_special_tokens=True) if body.echo else "" for p in prompts]

        if body.stream:
            chunk_id, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())
            offsets = [len(echoes[i // body.n]) for i in range(len(handles))]

            def make_chunk(index: int, event: GenerationEvent | None) -> CompletionResponse | None:
                if event is None:
                    echo = echoes[index // body.n]
                    if not echo:
                        return None
                    choice = CompletionChoice(text=echo, index=index)
                else:
                    logprobs = None
                    if body.logprobs is not None:
                        logprobs = flow.completion_logprobs(tokenizer, event.logprobs, offsets[index])
                        offsets[index] += sum(len(t) for t in logprobs.tokens)
                    choice = CompletionChoice(
                        text=event.text,
                        index=index,
                        logprobs=logprobs,
                        finish_reason=_openai_finish(event.finish_reason),
                    )
                return CompletionResponse(id=chunk_id, created=created, model=engine.name, choices=[choice])

            def final_usage(completion_tokens: int) -> CompletionResponse:
                prompt_tokens = sum(len(p) for p in prompts)
                return CompletionResponse(
                    id=chunk_id,
                    created=created,
                    model=engine.name,
                    choices=[],
                    usage=UsageInfo(
                        prompt_tokens=prompt_tokens,
                        completion_tokens=completion_tokens,
                        total_tokens=prompt_tokens + completion_tokens,
                    ),
                )

            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            events = flow.stream_events(handles, make_chunk, final_usage if include_usage else None)
            return _sse_response(tracked(sent, events), headers)

        results = await flow.collect(request, handles)
        record_outcome(sent)
        response.headers.update(headers)
        choices = []
        for i, r in enumerate(results):
            echo = echoes[i // body.n]
            logprobs = flow.completion_logprobs(tokenizer, r.logprobs, len(echo)) if body.logprobs is not None else None
            choices.append(
                CompletionChoice(
                    text=echo + r.text, index=i, logprobs=logprobs, finish_reason=_openai_finish(r.finish_reason)
                )
            )
        return CompletionResponse(
            model=engine.name, choices=choices, usage=flow.usage([len(p) for p in prompts], results)
        )

    app.include_router(v1)
    return app


def _params_factory(
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


def _request_constraint(body: ChatCompletionRequest | CompletionRequest) -> Constraint | None:
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


def _tool_plan(body: ChatCompletionRequest, tokenizer: Any) -> ToolCallPlan | None:
    """How the output becomes tool calls: under `required` or a named function, and under `auto` where the
    chat template defines a call format (`tool_calls`)."""
    if body.tools and body.tool_choice in (None, "auto") and template_call_format(tokenizer) is not None:
        return ToolCallPlan(forced=None, auto=True)
    if body.tool_choice == "required":
        return ToolCallPlan(forced=None)
    forced = body.forced_tool()
    return ToolCallPlan(forced=forced.function.name) if forced is not None else None


def _openai_finish(reason: str | None) -> str | None:
    """OpenAI knows `stop` and `length` (and `tool_calls`, set by the chat route); an aborted sequence
    reports `stop`."""
    return "stop" if reason == "abort" else reason


def _sse_response(events: AsyncIterator[str], headers: dict[str, str]) -> StreamingResponse:
    return StreamingResponse(
        events,
        media_type="text/event-stream",
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no", **headers},
    )


def _log_extra_fields(body: Any) -> None:
    """Fields the server ignores (they do not change the output), at debug level and truncated: the names
    are the client's, and a client must not be able to fill the log."""
    extra = sorted((body.model_extra or {}).keys())
    if extra:
        log.debug("ignoring request fields: %s", ", ".join(repr(name[:40]) for name in extra[:10]))
