"""The FastAPI application: OpenAI routes, health, metrics, auth, one error shape."""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any

from fastapi import APIRouter, Depends, FastAPI, Request, Response
from fastapi.responses import JSONResponse, StreamingResponse

from slimserve import __version__
from slimserve.server import completions as flow
from slimserve.server.engine import EngineState, GenerationEvent, TransformersEngine
from slimserve.server.errors import APIError, install_error_handlers
from slimserve.server.metrics import ServerMetrics
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
    ModelCard,
    ModelList,
    ResponseMessage,
    UsageInfo,
)
from slimserve.server.sampling import SamplingParams

log = logging.getLogger(__name__)


class EngineSet:
    """The engines this server runs, by model id; the first is the default."""

    def __init__(self, engines: list[TransformersEngine]) -> None:
        self.by_name = {e.name: e for e in engines}

    def get(self, model: str) -> TransformersEngine:
        engine = self.by_name.get(model)
        if engine is None:
            raise APIError(
                404,
                f"The model '{model}' does not exist. Available models: {', '.join(self.by_name)}",
                param="model",
                code="model_not_found",
            )
        if engine.state is not EngineState.READY:
            detail = f": {engine.error}" if engine.error else ""
            raise APIError(503, f"model '{model}' is {engine.state.value}{detail}", code="model_not_ready")
        return engine


def create_app(
    engines: list[TransformersEngine],
    metrics: ServerMetrics,
    api_key: str | None = None,
    default_max_tokens: int | None = 1024,
) -> FastAPI:
    """Build the app around engines that the caller created (they are started and stopped with the app).

    `default_max_tokens` caps requests that give no max_tokens (None: the whole remaining context)."""
    engine_set = EngineSet(engines)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        for engine in engines:
            engine.start()
        yield
        for engine in engines:
            engine.shutdown()

    app = FastAPI(title="slimserve", version=__version__, lifespan=lifespan)
    install_error_handlers(app)

    async def require_key(request: Request) -> None:
        if api_key is None:
            return
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or token.strip() != api_key:
            raise APIError(
                401, "Incorrect or missing API key: send 'Authorization: Bearer <key>'.", code="invalid_api_key"
            )

    v1 = APIRouter(prefix="/v1", dependencies=[Depends(require_key)])

    @app.middleware("http")
    async def count_requests(request: Request, call_next: Callable[[Request], Awaitable[Response]]) -> Response:
        response = await call_next(request)
        if request.url.path.startswith("/v1/") and request.method == "POST":
            model = getattr(request.state, "model", "unknown")
            metrics.requests.labels(model, request.url.path, str(response.status_code)).inc()
        return response

    @app.get("/health")
    async def health() -> JSONResponse:
        states = {e.name: e.state.value for e in engines}
        ready = all(e.state is EngineState.READY for e in engines)
        body: dict[str, Any] = {"status": "ok" if ready else "unavailable", "models": states}
        errors = {e.name: e.error for e in engines if e.error}
        if errors:
            body["errors"] = errors
        return JSONResponse(body, status_code=200 if ready else 503)

    @app.get("/metrics")
    async def prometheus() -> Response:
        return Response(metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")

    def card(engine: TransformersEngine) -> ModelCard:
        manifest = engine.manifest
        summary: dict[str, Any] = {"state": engine.state.value}
        if manifest is not None:
            summary |= {k: getattr(manifest, k) for k in ("family", "method", "bits", "parameters", "size_bytes")}
            summary["metrics"] = manifest.metrics
        return ModelCard(
            id=engine.name,
            root=str(engine.variant.path) if engine.variant else None,
            parent=manifest.base_model if manifest and manifest.base_model != engine.name else None,
            max_model_len=engine.context_length if engine.state is EngineState.READY else None,
            slimserve=summary,
        )

    @v1.get("/models")
    async def list_models() -> ModelList:
        return ModelList(data=[card(e) for e in engines])

    @v1.get("/models/{model_id:path}")
    async def get_model(model_id: str) -> ModelCard:
        engine = engine_set.by_name.get(model_id)
        if engine is None:
            raise APIError(404, f"The model '{model_id}' does not exist.", param="model", code="model_not_found")
        return card(engine)

    @v1.post("/chat/completions", response_model=None)
    async def chat_completions(
        body: ChatCompletionRequest,
        request: Request,
    ) -> ChatCompletionResponse | StreamingResponse:
        request.state.model = body.model
        _log_extra_fields(body)
        engine = engine_set.get(body.model)
        prompt = flow.chat_prompt_ids(engine, body.messages)
        param = "max_completion_tokens" if body.max_completion_tokens is not None else "max_tokens"
        max_tokens = flow.resolve_max_tokens(
            engine, len(prompt), body.requested_max_tokens(), param, default_max_tokens
        )
        top = (body.top_logprobs or 0) if body.logprobs else None
        handles = flow.submit_all(
            engine, [prompt], _params_factory(body, max_tokens, top, engine.sampling_defaults), body.n
        )
        tokenizer = engine.tokenizer

        if body.stream:
            chunk_id, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())

            def make_chunk(index: int, event: GenerationEvent | None) -> ChatCompletionChunk:
                if event is None:
                    choice = ChatChunkChoice(index=index, delta=DeltaMessage(role="assistant", content=""))
                else:
                    choice = ChatChunkChoice(
                        index=index,
                        delta=DeltaMessage(content=event.text or None),
                        logprobs=flow.chat_logprobs(tokenizer, event.logprobs) if top is not None else None,
                        finish_reason=_openai_finish(event.finish_reason),
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
            return _sse_response(flow.stream_events(handles, make_chunk, final_usage if include_usage else None))

        results = await flow.collect(request, handles)
        choices = [
            ChatChoice(
                index=i,
                message=ResponseMessage(content=r.text),
                logprobs=flow.chat_logprobs(tokenizer, r.logprobs) if top is not None else None,
                finish_reason=_openai_finish(r.finish_reason),
            )
            for i, r in enumerate(results)
        ]
        return ChatCompletionResponse(model=engine.name, choices=choices, usage=flow.usage([len(prompt)], results))

    @v1.post("/completions", response_model=None)
    async def completions(body: CompletionRequest, request: Request) -> CompletionResponse | StreamingResponse:
        request.state.model = body.model
        _log_extra_fields(body)
        if body.suffix:
            raise APIError(400, "suffix is not supported by this server", param="suffix")
        engine = engine_set.get(body.model)
        prompts = [flow.text_prompt_ids(engine, p) for p in body.prompts()]
        longest = max(len(p) for p in prompts)
        max_tokens = flow.resolve_max_tokens(engine, longest, body.max_tokens, "max_tokens", default_max_tokens)
        tokenizer = engine.tokenizer
        echoes = [tokenizer.decode(p, skip_special_tokens=True) if body.echo else "" for p in prompts]
        handles = flow.submit_all(
            engine, prompts, _params_factory(body, max_tokens, body.logprobs, engine.sampling_defaults), body.n
        )

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
            return _sse_response(flow.stream_events(handles, make_chunk, final_usage if include_usage else None))

        results = await flow.collect(request, handles)
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
        )

    return make


def _openai_finish(reason: str | None) -> str | None:
    """OpenAI knows `stop` and `length`; an aborted sequence reports `stop`."""
    return "stop" if reason == "abort" else reason


def _sse_response(events: AsyncIterator[str]) -> StreamingResponse:
    return StreamingResponse(
        events, media_type="text/event-stream", headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
    )


def _log_extra_fields(body: Any) -> None:
    extra = sorted((body.model_extra or {}).keys())
    if extra:
        log.info("ignoring unsupported request fields: %s", ", ".join(extra))
