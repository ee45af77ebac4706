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
from slimserve.server.prompts import text_prompt_ids
from slimserve.server.protocol import CompletionChoice, CompletionRequest, CompletionResponse
from slimserve.server.routes.dispatch import Dispatcher, dispatcher
from slimserve.server.serving_engine import GenerationEvent

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

    sent = await server.dispatch(
        request,
        body.model,
        body.slimserve,
        lambda engine: [text_prompt_ids(engine, p) for p in body.prompts()],
        body.max_tokens,
        "max_tokens",
        flow.submitter(body, body.logprobs, constraint),
        constrained=constraint is not None,
    )
    engine, prompts, handles = sent.engine, sent.prompts, sent.handles
    tokenizer = engine.tokenizer
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
            usage = flow.token_usage([len(p) for p in prompts], completion_tokens)
            return CompletionResponse(id=chunk_id, created=created, model=engine.name, choices=[], usage=usage)

        return server.stream(sent, make_chunk, final_usage, body.stream_options)

    results = await server.collect(request, response, sent)
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
