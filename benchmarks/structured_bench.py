"""What structured outputs cost and what they buy, on the transformers engine: decode throughput with a JSON
Schema against unconstrained decoding at concurrency 1 and 8, the masking cost per token, and how many
outputs are valid against the schema with and without the constraint.

    python benchmarks/structured_bench.py [--variants NAME_OR_DIR ...] [--prompts 16] [--rounds 3] [--write FILE]

The engine runs in-process (no HTTP), as the server runs it. A first pass sends the prompts ("describe <city>
as JSON" with the schema in the prompt) free and constrained, at most MAX_TOKENS each, for the validity
columns, and records each constrained output's length. The timed rounds then compare like for like: each
free sequence generates exactly as many tokens as the constrained one of its prompt (`ignore_eos`,
`max_tokens` = that length), so both waves prefill the same prompts and step the same batch sizes for the
same number of steps, and only the constraint differs. (Free outputs run to MAX_TOKENS where constrained
ones close their object in a few dozen tokens: compared as they come, the constrained waves spend a larger
share of their time in prefill and in the tail of the wave at small batch, which is not the decoder's speed.)
Free and constrained waves alternate (two shared cores drift by tens of percent between minutes),
`concurrency` sequences at a time, sampled at the model's defaults with a seed per prompt; throughput is
completion tokens over the wall time of the waves, median over rounds. The masking cost is timed apart: each
constrained output's tokens are replayed through a fresh matcher and the mask of every step
(`structured.apply_masks`: fill the bitmask, apply it to a row of logits) is timed alone.
The target (issue 42): constrained throughput at least 90% of free at concurrency 1 and 8.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import time
from pathlib import Path

import torch
from pydantic import BaseModel, Field, ValidationError
from report import heading, publish

from slimserve.models import DEFAULT_VARIANT, VariantRegistry, load_variant
from slimserve.server.engine import TransformersEngine
from slimserve.server.metrics import ServerMetrics
from slimserve.server.sampling import SamplingParams
from slimserve.server.structured import Constraint, GrammarCache, TokenMask, apply_masks

CONCURRENCY = (1, 8)
MAX_TOKENS = 96
CITIES = [
    "Paris", "Tokyo", "Cairo", "Lima", "Oslo", "Nairobi", "Toronto", "Madrid", "Seoul", "Sydney",
    "Berlin", "Mumbai", "Quito", "Dublin", "Hanoi", "Rome", "Lagos", "Vienna", "Denver", "Lisbon",
]  # fmt: skip


class City(BaseModel):
    """Bounded, as in the integration tests: the grammar guarantees validity, the bounds an end."""

    name: str = Field(max_length=24)
    country: str = Field(max_length=24)
    population: int = Field(ge=0, le=100_000_000)


SCHEMA = City.model_json_schema() | {"additionalProperties": False}


def prompt_ids(tokenizer: object, city: str) -> list[int]:
    ask = f"Describe the city of {city} as JSON matching this schema: {json.dumps(SCHEMA)}. Answer with JSON only."
    text = tokenizer.apply_chat_template(  # type: ignore[attr-defined]
        [{"role": "user", "content": ask}], add_generation_prompt=True, tokenize=False
    )
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])  # type: ignore[operator]


def valid(text: str) -> bool:
    try:
        City.model_validate_json(text)
    except ValidationError:
        return False
    return True


async def wave(
    engine: TransformersEngine, prompts: list[list[int]], params: list[SamplingParams]
) -> tuple[int, float, list[str], list[list[int]]]:
    """Run the sequences together; (completion tokens, seconds, texts, token ids)."""
    began = time.perf_counter()
    handles = engine.submit_many(list(zip(prompts, params, strict=True)))
    texts, ids = [], []
    for handle in handles:
        text, tokens = "", []
        async for event in handle.events():
            text += event.text
            tokens += event.token_ids
        texts.append(text)
        ids.append(tokens)
    return sum(len(t) for t in ids), time.perf_counter() - began, texts, ids


def measure(ref: str, prompts_n: int, rounds: int) -> dict[str, float]:
    registry = VariantRegistry()
    path = registry.resolve(ref).path
    engine = TransformersEngine(lambda: load_variant(path), Path(ref).name, ServerMetrics(), max_batch_size=8)
    engine.start()
    if not engine.wait_ready(600):
        raise RuntimeError(f"{ref} did not load: {engine.error}")
    variant = engine.variant
    assert variant is not None
    defaults = engine.sampling_defaults
    cities = (CITIES * ((prompts_n + len(CITIES) - 1) // len(CITIES)))[:prompts_n]
    prompts = [prompt_ids(variant.tokenizer, c) for c in cities]
    constraint = Constraint.json_schema(SCHEMA, "response_format")

    def params(i: int, constrained: bool, tokens: int | None = None) -> SamplingParams:
        """`tokens`: exactly this many (a free sequence matching a constrained one's length)."""
        return SamplingParams(
            max_tokens=tokens or MAX_TOKENS,
            temperature=defaults.get("temperature", 1.0),
            top_p=defaults.get("top_p", 1.0),
            top_k=defaults.get("top_k", 0),
            seed=i,
            ignore_eos=tokens is not None and not constrained,
            constraint=constraint if constrained else None,
        )

    result: dict[str, float] = {}
    outputs: dict[bool, list[str]] = {False: [], True: []}
    replay: list[list[int]] = []

    async def run() -> None:
        as_written: dict[bool, int] = {}
        for constrained in (False, True):  # validity, and the lengths the free waves match
            as_written[constrained] = 0
            for start in range(0, len(prompts), CONCURRENCY[-1]):
                batch = list(range(start, min(start + CONCURRENCY[-1], len(prompts))))
                n, _, texts, ids = await wave(
                    engine, [prompts[i] for i in batch], [params(i, constrained) for i in batch]
                )
                outputs[constrained] += texts
                as_written[constrained] += n
                if constrained:
                    replay.extend(ids)
        lengths = [len(ids) for ids in replay]
        print(
            f"mean tokens per output as written: free {as_written[False] / len(prompts):.1f}, "
            f"JSON {as_written[True] / len(prompts):.1f}",
            file=sys.stderr,
        )
        for concurrency in CONCURRENCY:
            rates: dict[bool, list[float]] = {False: [], True: []}
            for r in range(rounds):
                for constrained in (False, True) if r % 2 == 0 else (True, False):
                    tokens, seconds = 0, 0.0
                    for start in range(0, len(prompts), concurrency):
                        batch = list(range(start, min(start + concurrency, len(prompts))))
                        n, s, _, _ = await wave(
                            engine, [prompts[i] for i in batch], [params(i, constrained, lengths[i]) for i in batch]
                        )
                        tokens, seconds = tokens + n, seconds + s
                    rates[constrained].append(tokens / seconds)
            free, bound = statistics.median(rates[False]), statistics.median(rates[True])
            result[f"free_c{concurrency}"], result[f"bound_c{concurrency}"] = free, bound

    asyncio.run(run())
    grammars = GrammarCache(variant.tokenizer, int(variant.model.config.vocab_size), variant.eos_token_ids)
    compiled = grammars.compile(constraint)
    logits = torch.randn(1, int(variant.model.config.vocab_size))  # (1, vocab)
    times: list[float] = []
    for ids in replay:
        mask = TokenMask(compiled.grammar)
        for token in ids:
            began = time.perf_counter()
            apply_masks(logits, [mask])
            times.append(time.perf_counter() - began)
            mask.accept(token)
    result["mask_ms"] = 1000 * statistics.median(times) if times else float("nan")
    result["valid_free"] = sum(map(valid, outputs[False])) / max(len(outputs[False]), 1)
    result["valid_bound"] = sum(map(valid, outputs[True])) / max(len(outputs[True]), 1)
    result["outputs"] = len(outputs[True])
    engine.shutdown()
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variants", nargs="*", help=f"names or directories (default: {DEFAULT_VARIANT})")
    parser.add_argument("--prompts", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--write", help="write the section into this markdown file")
    args = parser.parse_args()
    refs = args.variants or [DEFAULT_VARIANT]
    lines = heading("## Structured outputs: `python benchmarks/structured_bench.py`", "benchmarks/structured_bench.py")
    lines += [
        f"- {args.prompts} prompts, at most {MAX_TOKENS} tokens, the model's sampling defaults, seeded; free and "
        f"JSON-Schema-constrained (xgrammar) waves in alternation, median of {args.rounds} rounds; each free "
        "sequence generates as many tokens as the constrained one of its prompt (like for like)",
        "- mask ms: median time of one sequence's mask per step (bitmask fill + apply), replayed alone",
        "- target: constrained tok/s at least 90% of free at concurrency 1 and 8; 100% valid constrained",
        "",
        "| variant | tok/s c1 free | tok/s c1 JSON | ratio | tok/s c8 free | tok/s c8 JSON | ratio "
        "| mask ms/token | valid free | valid JSON |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for ref in refs:
        print(f"== {ref}", file=sys.stderr, flush=True)
        m = measure(ref, args.prompts, args.rounds)
        lines.append(
            f"| {Path(ref).name} | {m['free_c1']:.1f} | {m['bound_c1']:.1f} | {m['bound_c1'] / m['free_c1']:.0%} "
            f"| {m['free_c8']:.1f} | {m['bound_c8']:.1f} | {m['bound_c8'] / m['free_c8']:.0%} "
            f"| {m['mask_ms']:.2f} | {m['valid_free']:.0%} | {m['valid_bound']:.0%} of {m['outputs']:.0f} |"
        )
    publish("\n".join(lines), args.write, "structured-outputs")
    return 0


if __name__ == "__main__":
    sys.exit(main())
