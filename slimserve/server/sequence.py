"""What the transformers engine keeps of each sequence it holds (`EngineSequence`: its handle, sampler,
detokenizer and tokens so far; the scheduler reads it as a `scheduler.Job`), and of the one prompt it is
prefilling chunk by chunk (`PartialPrefill`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from transformers import DynamicCache

from slimserve.server.detokenize import IncrementalDetokenizer
from slimserve.server.sampling import Sampler, SamplingParams, TokenLogprob
from slimserve.server.serving_engine import GenerationEvent, RequestHandle


@dataclass(eq=False)  # identity: a sequence is found in (and removed from) the queue as itself
class EngineSequence:
    """One sequence as the transformers engine holds it, from its queue to its last token."""

    handle: RequestHandle
    params: SamplingParams
    sampler: Sampler
    detokenizer: IncrementalDetokenizer
    submitted_at: float
    generated: list[int] = field(default_factory=list)
    last_token_at: float | None = None
    done: bool = False
    accounted: bool = False
    """Its end was counted (tokens, and its place among the admitted), which happens once."""

    def take(self, token: int, logprob: TokenLogprob | None, eos: set[int]) -> GenerationEvent:
        """Append a sampled token and say what its client gets: the text it completes, and the finish reason
        if it ends the sequence (EOS unless ignored, a stop string, or `max_tokens`)."""
        self.generated.append(token)
        finish: str | None = None
        if token in eos and not self.params.ignore_eos:
            text, finish = self.detokenizer.flush(), "stop"
        else:
            delta = self.detokenizer.add(token)
            text = delta.text
            if delta.stopped:
                finish = "stop"
            elif len(self.generated) >= self.params.max_tokens:
                text, finish = text + self.detokenizer.flush(), "length"
        if finish is not None:
            self.done = True
        logprobs = [logprob] if logprob is not None else []
        return GenerationEvent(text, [token], logprobs, finish, completion_tokens=len(self.generated))

    @property
    def steps_left(self) -> int:
        return self.params.max_tokens - len(self.generated)

    # the scheduler's view of it (`scheduler.Job`)
    @property
    def deadline(self) -> float | None:
        return self.handle.deadline

    @property
    def prompt_tokens(self) -> int:
        return len(self.handle.prompt_ids)

    @property
    def max_tokens(self) -> int:
        return self.params.max_tokens

    @property
    def cancelled(self) -> bool:
        return self.handle.cancelled.is_set()


@dataclass(eq=False)
class PartialPrefill:
    """A sequence whose prompt is partly in its cache (`PREFILL_TOKENS` per turn)."""

    seq: EngineSequence
    cache: DynamicCache
    done: int = 0
    """Prompt tokens already in the cache."""
    seconds: float = 0.0
    """Compute time of its chunks so far (the prefill as the profile learns it, without others' turns)."""
    left_s: float | None = None
    """Seconds to its deadline when its first chunk began (the turn trace)."""
