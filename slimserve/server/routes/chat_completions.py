"""`POST /v1/chat/completions`: messages through the model's chat template, choices as messages (or tool
calls), streamed as chunks or whole."""

from __future__ import annotations

import time
import uuid
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Request, Response
from fastapi.responses import StreamingResponse

from slimserve.server import completions as flow
from slimserve.server.openapi import STREAM_RESPONSE, error_responses
from slimserve.server.prompts import chat_prompt_ids
from slimserve.server.protocol import (
    ChatChoice,
    ChatChunkChoice,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    DeltaMessage,
    ResponseMessage,
)
from slimserve.server.routes.dispatch import Dispatcher, dispatcher
from slimserve.server.serving_engine import GenerationEvent
from slimserve.server.tool_calls import ToolCallPlan, ToolCallStream, template_call_format

router = APIRouter(prefix="/v1")


@router.post(
    "/chat/completions",
    response_model=ChatCompletionResponse,
    responses=STREAM_RESPONSE | error_responses(400, 404, 429, 503),
)
async def chat_completions(
    body: ChatCompletionRequest,
    request: Request,
    response: Response,
    server: Annotated[Dispatcher, Depends(dispatcher)],
) -> ChatCompletionResponse | StreamingResponse:
    request.state.model = body.model
    flow.log_extra_fields(body)
    param = "max_completion_tokens" if body.max_completion_tokens is not None else "max_tokens"
    top = (body.top_logprobs or 0) if body.logprobs else None
    constraint = flow.request_constraint(body)

    sent = await server.dispatch(
        request,
        body.model,
        body.slimserve,
        lambda engine: [chat_prompt_ids(engine, body.messages, body.tools)],
        body.requested_max_tokens(),
        param,
        flow.submitter(body, top, constraint),
        constrained=constraint is not None,
    )
    engine, prompt, handles = sent.engine, sent.prompts[0], sent.handles
    tokenizer = engine.tokenizer
    plan = tool_plan(body, tokenizer)

    if body.stream:
        chunk_id, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        calls = [ToolCallStream(plan) for _ in handles] if plan is not None else None

        def make_chunk(index: int, event: GenerationEvent | None) -> ChatCompletionChunk:
            if event is None:
                opening = DeltaMessage(role="assistant", content=None if calls else "")
                choice = ChatChunkChoice(index=index, delta=opening)
            else:
                delta = DeltaMessage(content=event.text or None)
                finish = flow.openai_finish(event.finish_reason)
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
            usage = flow.token_usage([len(prompt)], completion_tokens)
            return ChatCompletionChunk(id=chunk_id, created=created, model=engine.name, choices=[], usage=usage)

        return server.stream(sent, make_chunk, final_usage, body.stream_options)

    results = await server.collect(request, response, sent)
    choices = []
    for i, r in enumerate(results):
        message, finish = ResponseMessage(content=r.text), flow.openai_finish(r.finish_reason)
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


def tool_plan(body: ChatCompletionRequest, tokenizer: Any) -> ToolCallPlan | None:
    """How the output becomes tool calls: under `required` or a named function, and under `auto` where the
    chat template defines a call format (`tool_calls`)."""
    if body.tools and body.tool_choice in (None, "auto") and template_call_format(tokenizer) is not None:
        return ToolCallPlan(forced=None, auto=True)
    if body.tool_choice == "required":
        return ToolCallPlan(forced=None)
    forced = body.forced_tool()
    return ToolCallPlan(forced=forced.function.name) if forced is not None else None
