"""What every endpoint shares: the pool, the router and the metrics (`Dispatcher`, kept on `app.state`), and
the path of a generation request from its model name to submitted sequences (`Dispatcher.dispatch`): the
variant chosen (exactly named, or by the router), its prompts tokenized once per tokenizer (`PromptCache`),
its sequences queued, its routing headers and its outcome recorded."""

from __future__ import annotations

import time
from collections.abc import AsyncGenerator, Callable
from contextlib import aclosing
from dataclasses import dataclass
from typing import Any

from fastapi import Request, Response
from fastapi.responses import StreamingResponse

from slimserve.server import completions as flow
from slimserve.server.errors import APIError
from slimserve.server.metrics import ServerMetrics
from slimserve.server.pool import VariantPool
from slimserve.server.prompts import PromptCache
from slimserve.server.protocol import StreamOptions
from slimserve.server.router import Budget, BudgetError, Decision, Router, parse_budget
from slimserve.server.serving_engine import EngineNotReadyError, GenerationEvent, RequestHandle, ServingEngine
from slimserve.server.shutdown import SHUTTING_DOWN, Drain

Submit = Callable[[ServingEngine, list[list[int]], int, float | None], list[RequestHandle]]
"""Queue a request's sequences on the chosen engine: (engine, prompts, max_tokens, deadline) -> handles."""


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


@dataclass
class Dispatcher:
    """The server's shared state, as the endpoints read it (`app.state.dispatcher`).

    `default_max_tokens` caps requests that give no max_tokens (None: the whole remaining context);
    `server_budget` applies to routed requests that carry no budget of their own."""

    pool: VariantPool
    router: Router
    metrics: ServerMetrics
    drain: Drain
    server_budget: Budget
    default_max_tokens: int | None

    async def dispatch(
        self,
        request: Request,
        model: str,
        extension: dict[str, Any] | None,
        build_prompts: Callable[[ServingEngine], list[list[int]]],
        requested_max: int | None,
        max_param: str,
        submit: Submit,
        constrained: bool = False,
    ) -> Dispatch:
        """Choose the variant (exactly named, or by the router), then submit; a full queue falls through to
        the router's next choice before the client sees 429. A `constrained` request (structured output)
        costs its engine's masking per token on top of the profiles' figures: the probed engine's measured
        overhead (the variants of a family share a tokenizer, so one figure serves them all; the vLLM
        backend reports none, its masking is inside the steps it times).

        The prompts are tokenized once: the router counts them on a resident variant (the probe), and the
        chosen engine takes the same ids when its tokenizer is alike (`PromptCache`)."""
        arrived = time.perf_counter()
        pool, router = self.pool, self.router
        if self.drain.draining:
            raise APIError(503, f"{SHUTTING_DOWN}: not accepting requests", code="server_shutting_down")
        entries, routed = pool.targets(model)
        decision: Decision | None = None
        budget: Budget | None = None
        order = entries
        prompt_cache = PromptCache(build_prompts)
        if routed:
            try:
                headers = {k.lower(): v for k, v in request.headers.items()}
                budget = parse_budget(headers, extension, self.server_budget)
                probe = next((e for e in entries if e.resident), entries[0])
                probe_engine = await pool.acquire(probe)
                pool.release(probe)
                prompt_tokens = max(len(p) for p in prompt_cache.prompts(probe_engine))
                expected = requested_max or self.default_max_tokens or 256
                extra_ms = expected * getattr(probe_engine, "mask_ms_per_token", 0.0) if constrained else 0.0
                order, decision = router.choose(list(entries), budget, prompt_tokens, expected, extra_ms)
            except BudgetError as exc:
                raise APIError(400, str(exc), param=exc.param) from exc
        last_error: APIError | None = None
        for position, entry in enumerate(order):
            engine = await pool.acquire(entry)
            try:
                prompts = prompt_cache.prompts(engine)
                max_tokens = flow.resolve_max_tokens(
                    engine, max(len(p) for p in prompts), requested_max, max_param, self.default_max_tokens
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
                self.metrics.routed.labels(entry.name, met).inc()
            request.state.model = engine.name
            self.drain.track(handles)
            return Dispatch(engine, prompts, max_tokens, handles, decision, budget, arrived)
        assert last_error is not None
        raise last_error

    def record_outcome(self, sent: Dispatch) -> None:
        """Budget met or not (metrics); a routed request that ended on its own (EOS, a stop string or its
        length, streamed or not) also calibrates the router, per output token (`Router.observe`). One the
        client left or that failed says nothing about the prediction."""
        elapsed_ms = 1000 * (time.perf_counter() - sent.started)
        ended = all(h.finish_reason in ("stop", "length") for h in sent.handles)
        if sent.decision is not None and sent.handles and ended:
            self.router.observe(sent.decision, elapsed_ms, max(h.completion_tokens for h in sent.handles))
        if sent.budget is not None and sent.budget.latency_ms is not None:
            outcome = "within" if elapsed_ms <= sent.budget.latency_ms else "over"
            self.metrics.budget_outcome.labels(sent.engine.name, outcome).inc()

    def stream(
        self,
        sent: Dispatch,
        make_chunk: Callable[[int, GenerationEvent | None], Any],
        final_usage: Callable[[int], Any],
        options: StreamOptions | None,
    ) -> StreamingResponse:
        """The request's chunks as server-sent events (`completions.stream_events`), with the usage chunk if
        `options` ask for it and the routing headers; its outcome recorded once the stream ends."""
        include_usage = bool(options and options.include_usage)
        events = flow.stream_events(sent.handles, make_chunk, final_usage if include_usage else None)
        return flow.EventStreamResponse(self._tracked(sent, events), routing_headers(sent))

    async def collect(self, request: Request, response: Response, sent: Dispatch) -> list[flow.ChoiceResult]:
        """Every choice run to its end (`completions.collect`); its outcome recorded, the routing headers set."""
        headers = routing_headers(sent)  # the decision as made: what the router learns after does not change it
        results = await flow.collect(request, sent.handles)
        self.record_outcome(sent)
        response.headers.update(headers)
        return results

    async def _tracked(self, sent: Dispatch, events: AsyncGenerator[str]) -> AsyncGenerator[str]:
        try:
            async with aclosing(events):  # closed at once, not at collection: its `finally` cancels the handles
                async for item in events:
                    yield item
        finally:
            self.record_outcome(sent)


def dispatcher(request: Request) -> Dispatcher:
    """The app's `Dispatcher` (a FastAPI dependency)."""
    found: Dispatcher = request.app.state.dispatcher
    return found


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
