"""`POST /v1/completions` (OpenAI's legacy completions): text or token-id prompts, several at once, with
echo and text offsets in the logprobs."""

from __future__ import annotations

import time
import uuid
from typing import Annotated

from fastapi import APIRouter, Depends, Request, Response
from fastapi.responses import StreamingResponse

from slimserve.server import completions as flow
from slimserve.server.openapi import STREAM_RESPONSE, error_responses
from slimserve.server.prompts import check_vocabulary, text_prompt_ids
from slimserve.server.protocol import CompletionChoice, CompletionRequest, CompletionResponse, UsageInfo
from slimserve.server.routes.dispatch import Dispatcher, dispatcher, routing_headers
from slimserve.server.serving_engine import GenerationEvent, RequestHandle, ServingEngine

router = APIRouter(prefix="/v1")


@router.post(
    "/completions",
    response_model=CompletionResponse,
    responses=STREAM_RESPONSE | error_responses(400, 404, 429, 503),
)
async def completions(
    body: CompletionRequest,
    request: Request,
    response: Response,
    server: Annotated[Dispatcher, Depends(dispatcher)],
) -> CompletionResponse | StreamingResponse:
    request.state.model = body.model
    flow.log_extra_fields(body)
    constraint = flow.request_constraint(body)

    def submit(
        engine: ServingEngine, prompts: list[list[int]], max_tokens: int, deadline: float | None
    ) -> list[RequestHandle]:
        check_vocabulary(engine, body.token_bias(), "logit_bias")
        make = flow.params_factory(body, max_tokens, body.logprobs, engine.sampling_defaults, constraint)
        return flow.submit_all(engine, prompts, make, body.n, deadline)

    sent = await server.dispatch(
        request,
        body.model,
        body.slimserve,
        lambda engine: [text_prompt_ids(engine, p) for p in body.prompts()],
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
                    finish_reason=flow.openai_finish(event.finish_reason),
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
        return flow.sse_response(server.tracked(sent, events), headers)

    results = await flow.collect(request, handles)
    server.record_outcome(sent)
    response.headers.update(headers)
    choices = []
    for i, r in enumerate(results):
        echo = echoes[i // body.n]
        logprobs = flow.completion_logprobs(tokenizer, r.logprobs, len(echo)) if body.logprobs is not None else None
        choices.append(
            CompletionChoice(
                text=echo + r.text, index=i, logprobs=logprobs, finish_reason=flow.openai_finish(r.finish_reason)
            )
        )
    return CompletionResponse(model=engine.name, choices=choices, usage=flow.usage([len(p) for p in prompts], results))
