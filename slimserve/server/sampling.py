"""Per-sequence sampling: OpenAI penalties, temperature, top-k/top-p, seeded draws and logprobs.

Each sequence in a batch has its own parameters and its own `torch.Generator`, so what else shares the
batch never shifts a seeded request's draws. Its logits still carry the batch's rounding (bf16 matmuls
round a row's last bits differently at another batch size), so as in vLLM a seeded request repeats
exactly under the same load, an idle server for instance, not under any load.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from slimserve.server.structured import Constraint, TokenMask, apply_masks

MAX_TOP_LOGPROBS = 20


@dataclass
class SamplingParams:
    """What one sequence asks of the sampler. Ranges are checked by the wire protocol."""

    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    """0 disables top-k (an extension to the OpenAI API, as in vLLM)."""
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    logprobs: int | None = None
    """None: no logprobs; k >= 0: the sampled token's logprob plus the k most likely alternatives."""
    ignore_eos: bool = False
    logit_bias: dict[int, float] = field(default_factory=dict)
    """Added to the logits of these token ids before sampling (OpenAI's `logit_bias`)."""
    constraint: Constraint | None = None
    """JSON the output must be (structured outputs, a required tool call); None: free text."""

    def __post_init__(self) -> None:
        if self.max_tokens < 1:
            raise ValueError(f"max_tokens must be at least 1, got {self.max_tokens}")
        bad = [t for t in self.logit_bias if t < 0]
        if bad:
            raise ValueError(f"logit_bias token ids must be non-negative, got {bad}")
        if self.logprobs is not None and not 0 <= self.logprobs <= MAX_TOP_LOGPROBS:
            raise ValueError(f"top logprobs must be within [0, {MAX_TOP_LOGPROBS}], got {self.logprobs}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


@dataclass
class TokenLogprob:
    """A sampled token's logprob under the model, and the most likely alternatives at that step."""

    token_id: int
    logprob: float
    top: list[tuple[int, float]]


class Sampler:
    """Draws the next token for one sequence; keeps the counts the penalties need."""

    def __init__(self, params: SamplingParams, vocab_size: int, mask: TokenMask | None = None) -> None:
        self.params = params
        self.mask = mask
        """The sequence's grammar (`params.constraint` compiled): tokens it forbids are never drawn."""
        self.generator = torch.Generator()
        self.generator.manual_seed(params.seed if params.seed is not None else random.getrandbits(63))
        self._counts: torch.Tensor | None = None
        if params.presence_penalty or params.frequency_penalty:
            self._counts = torch.zeros(vocab_size, dtype=torch.float32)
        too_big = [t for t in params.logit_bias if t >= vocab_size]
        if too_big:
            raise ValueError(f"logit_bias names token ids outside the vocabulary of {vocab_size}: {too_big}")
        self._bias_ids = torch.tensor(list(params.logit_bias), dtype=torch.long)
        self._bias_values = torch.tensor(list(params.logit_bias.values()), dtype=torch.float32)

    def observe(self, token_id: int) -> None:
        """Record a generated token (penalties apply to generated tokens only, as in OpenAI's API)."""
        if self._counts is not None and token_id < self._counts.numel():
            self._counts[token_id] += 1

    def sample(self, logits: torch.Tensor) -> tuple[int, TokenLogprob | None]:
        """Pick the next token from one row of logits, shape (vocab,), float32 (a grammar's mask may write
        to it: the row is the caller's to discard)."""
        return sample_rows([self], logits.unsqueeze(0))[0]

    def draw(self, scores: torch.Tensor, logprobs: torch.Tensor | None = None) -> tuple[int, TokenLogprob | None]:
        """Pick the next token from one row (vocab,) already masked by the grammar (`sample_rows`);
        `logprobs` are the model's own where the mask changed the row (else they come from `scores`)."""
        params = self.params
        raw = scores
        if self._bias_ids.numel():
            scores = scores.index_add(0, self._bias_ids, self._bias_values)
        if self._counts is not None:
            penalty = self._counts * params.frequency_penalty + (self._counts > 0) * params.presence_penalty
            scores = scores - penalty[: scores.numel()]
        if params.greedy:
            token = int(torch.argmax(scores))
        else:
            scores = scores / params.temperature
            if params.top_k and params.top_k < scores.numel():
                kth = torch.topk(scores, params.top_k).values[-1]
                scores = scores.masked_fill(scores < kth, float("-inf"))
            if params.top_p < 1.0:
                scores = _top_p_filter(scores, params.top_p)
            probs = torch.softmax(scores, dim=-1)
            token = int(torch.multinomial(probs, 1, generator=self.generator))
        self.observe(token)
        if self.mask is not None:
            self.mask.accept(token)
        if params.logprobs is None:
            return token, None
        return token, token_logprob(raw if logprobs is None else logprobs, token, params.logprobs)


def sample_rows(samplers: Sequence[Sampler], logits: torch.Tensor) -> list[tuple[int, TokenLogprob | None]]:
    """One token per row of `logits` (B, vocab), float32, row i for `samplers[i]`: the grammars of the
    constrained rows mask them together, in place (`apply_masks`); a constrained row that reports logprobs
    keeps the model's own, taken before its mask."""
    masks = [s.mask for s in samplers]
    own = {  # log-softmax is idempotent: `token_logprob` normalising these again changes nothing
        i: torch.log_softmax(logits[i], dim=-1)
        for i, s in enumerate(samplers)
        if s.params.logprobs is not None and s.mask is not None and not s.mask.complete
    }
    apply_masks(logits, masks)
    return [s.draw(logits[i], own.get(i)) for i, s in enumerate(samplers)]


def token_logprob(logits: torch.Tensor, token: int, top: int) -> TokenLogprob:
    """Logprobs of the raw model distribution (before penalties and temperature), as vLLM reports them."""
    logprobs = torch.log_softmax(logits.float(), dim=-1)  # (vocab,)
    alternatives: list[tuple[int, float]] = []
    if top:
        values, indices = torch.topk(logprobs, top)
        alternatives = [(int(i), float(v)) for i, v in zip(indices, values, strict=True)]
    return TokenLogprob(token_id=token, logprob=float(logprobs[token]), top=alternatives)


def _top_p_filter(scores: torch.Tensor, top_p: float) -> torch.Tensor:
    """Keep the smallest set of tokens whose probability mass reaches `top_p` (always at least one)."""
    sorted_scores, order = torch.sort(scores, descending=True)
    cumulative = torch.softmax(sorted_scores, dim=-1).cumsum(dim=-1)
    remove = cumulative > top_p
    remove[1:] = remove[:-1].clone()  # keep the token that crosses the threshold
    remove[0] = False
    filtered = sorted_scores.masked_fill(remove, float("-inf"))
    return torch.empty_like(scores).scatter_(0, order, filtered)
