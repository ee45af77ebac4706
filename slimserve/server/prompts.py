"""A request's prompts as token ids: chat messages through the tokenizer's own template, text or token-id
prompts checked against the model's vocabulary; and each request's prompts tokenized once per tokenizer
(`PromptCache`), however many engines it is weighed on.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import weakref
from collections.abc import Callable, Iterable
from typing import Any

from slimserve.server.errors import APIError
from slimserve.server.protocol import ChatMessage, Tool
from slimserve.server.serving_engine import ServingEngine

_TOKENIZER_KEYS: weakref.WeakKeyDictionary[Any, str] = weakref.WeakKeyDictionary()
"""`tokenizer_key` of each tokenizer object seen (computed once: it reads the whole vocabulary)."""


def tokenizer_key(tokenizer: Any) -> str:
    """What decides how a tokenizer turns a request into ids: its class, its whole definition (vocabulary,
    merges, normalizer, pre- and post-processor: a fast tokenizer's JSON; a slow one's vocabulary), its
    special tokens and its chat template. Two variants of a family load equal tokenizers from different
    directories; their keys are equal."""
    with contextlib.suppress(TypeError):  # an object that takes no weak reference is keyed afresh each time
        if tokenizer in _TOKENIZER_KEYS:
            return _TOKENIZER_KEYS[tokenizer]
    backend = getattr(tokenizer, "backend_tokenizer", None)
    definition = backend.to_str() if backend is not None else json.dumps(sorted(tokenizer.get_vocab().items()))
    special = json.dumps(getattr(tokenizer, "special_tokens_map", {}), sort_keys=True, default=str)
    template = str(getattr(tokenizer, "chat_template", None))
    digest = hashlib.sha256()
    for part in (type(tokenizer).__qualname__, definition, special, template):
        digest.update(part.encode())
        digest.update(b"\0")
    key = digest.hexdigest()
    with contextlib.suppress(TypeError):
        _TOKENIZER_KEYS[tokenizer] = key
    return key


class PromptCache:
    """One request's prompts, built (`build`: rendered and tokenized) once per kind of engine: an engine whose
    tokenizer is alike (`tokenizer_key`) and whose model has the same vocabulary size (token-id prompts are
    checked against it) takes the ids already built, another builds its own."""

    def __init__(self, build: Callable[[ServingEngine], list[list[int]]]) -> None:
        self._build = build
        self._built: dict[tuple[str, int], list[list[int]]] = {}

    def prompts(self, engine: ServingEngine) -> list[list[int]]:
        key = (tokenizer_key(engine.tokenizer), _vocab_size(engine))
        if key not in self._built:
            self._built[key] = self._build(engine)
        return self._built[key]


def _vocab_size(engine: ServingEngine) -> int:
    return int(engine.variant.model.config.vocab_size) if engine.variant else 0


def chat_prompt_ids(engine: ServingEngine, messages: list[ChatMessage], tools: list[Tool] | None = None) -> list[int]:
    """Render messages (and tools, for a template that takes them; others ignore them) with the tokenizer's
    own chat template, then tokenize."""
    tokenizer = engine.tokenizer
    if not getattr(tokenizer, "chat_template", None):
        raise APIError(400, f"model {engine.name!r} has no chat template; use /v1/completions", code="no_template")
    try:
        rendered = [_template_message(m) for m in messages]
        functions = [t.model_dump(exclude_none=True) for t in tools] if tools else None
        text = tokenizer.apply_chat_template(rendered, tools=functions, add_generation_prompt=True, tokenize=False)
    except ValueError as exc:
        raise APIError(400, str(exc), param="messages", code="unsupported") from exc
    except Exception as exc:  # a template that raises (e.g. jinja's raise_exception) is a bad request
        raise APIError(
            400, f"chat template rejected the messages: {exc}", param="messages", code="invalid_value"
        ) from exc
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def _template_message(message: ChatMessage) -> dict[str, Any]:
    """A message as chat templates read it: `developer` is `system`; a call's arguments are a mapping (as
    vLLM passes them: templates iterate or `tojson` them), not OpenAI's JSON text."""
    rendered: dict[str, Any] = {"role": "system" if message.role == "developer" else message.role}
    rendered["content"] = message.text()
    if message.tool_call_id is not None:
        rendered["tool_call_id"] = message.tool_call_id
    if message.tool_calls:
        calls = []
        for call in message.tool_calls:
            function = dict(call.get("function") or {})
            arguments = function.get("arguments")
            if isinstance(arguments, str):
                with contextlib.suppress(ValueError):
                    function["arguments"] = json.loads(arguments)
            calls.append({**call, "function": function})
        rendered["tool_calls"] = calls
    return rendered


def text_prompt_ids(engine: ServingEngine, prompt: str | list[int]) -> list[int]:
    if isinstance(prompt, str):
        ids = list(engine.tokenizer(prompt)["input_ids"])
    else:
        check_vocabulary(engine, prompt, "prompt")
        ids = list(prompt)
    if not ids:
        raise APIError(400, "prompt is empty after tokenization", param="prompt", code="invalid_value")
    return ids


def check_vocabulary(engine: ServingEngine, token_ids: Iterable[int], param: str) -> None:
    """Token ids a request names (prompt ids, logit_bias keys) must be the model's: a 400 naming the field."""
    vocab = _vocab_size(engine)
    bad = [t for t in token_ids if not 0 <= t < vocab]
    if bad:
        message = f"{param}: token ids out of range [0, {vocab}): {bad[:5]}"
        raise APIError(400, message, param=param, code="invalid_value")
