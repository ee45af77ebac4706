"""The last step of every quantize and distill run: does the new variant still predict what its source does?

A transform that does not fit an architecture can finish without an error and write a model that predicts
nothing (SmoothQuant written for Llama's norms, applied to Gemma 3 270M: top-1 agreement 0%, perplexity
66,053 against 21.6). Before a variant is registered, it is loaded as the server loads it and compared
with its source on a few held-out windows; one whose top-1 agreement falls below its method family's floor
is refused, and nothing is registered.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from slimserve.compression.data import eval_text

GUARD_WINDOWS = 4
"""Held-out windows compared, spread evenly over the evaluation text."""
GUARD_WINDOW_TOKENS = 128
"""Tokens per window (fewer where the model's context is shorter)."""

AGREEMENT_FLOORS = {"8-bit": 0.5, "4-bit": 0.35, "distill": 0.2}
"""Lowest top-1 agreement with the source a variant may have, per method family. Correct methods clear
these with margin (their agreement is in docs/BENCHMARKS.md, "Quantization" and "The default recipe"); a
transform that breaks the model lands near 0% (Gemma 3 270M above).
The floors catch collapse, not regressions: `slimserve eval` measures those."""


class GuardError(ValueError):
    """A finished variant predicts too little of what its source predicts; it was not registered."""


@dataclass
class GuardReport:
    """The check's figures, recorded in the manifest's provenance as `guard`."""

    source: str
    windows: int
    tokens: int
    kl_to_source: float
    """Mean KL(source || variant) per token, in nats."""
    top1_agreement: float
    min_top1_agreement: float

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def method_family(method: str, bits: int) -> str:
    """`distill` for students (float, measured against their teacher), else `8-bit` or `4-bit` by `bits`."""
    if method.startswith("distill"):
        return "distill"
    return "8-bit" if bits >= 8 else "4-bit"


def guard_windows(tokenizer: Any, context: int) -> torch.Tensor:
    """`GUARD_WINDOWS` windows of held-out token ids (W, T), from evenly spaced places of `eval_text()`."""
    text = eval_text()
    length = min(GUARD_WINDOW_TOKENS, context)
    pieces = []
    for i in range(GUARD_WINDOWS):
        start = i * len(text) // GUARD_WINDOWS
        pieces.append(tokenizer(text[start : start + 16 * length], return_tensors="pt")["input_ids"][0])
    length = min(length, *(len(p) for p in pieces))
    return torch.stack([p[:length] for p in pieces])


GUARD_BATCH_LOGITS = 1 << 25
"""Logits (windows x tokens x vocabulary) computed at once: 128 MB in fp32. Tiny vocabularies run every window
in one batch; Gemma's 262k-token one runs them one by one."""


@torch.inference_mode()
def compare(variant: Any, source: Any, windows: torch.Tensor) -> tuple[float, float, int]:
    """KL(source || variant) per token, top-1 agreement and the tokens compared, over `windows` (W, T);
    non-finite logits agree with nothing."""
    vocab = int(getattr(source.config, "vocab_size", 1) or 1)
    step = max(1, GUARD_BATCH_LOGITS // (windows.shape[1] * vocab))
    kl_sum, agree = 0.0, 0
    for batch in windows.split(step):
        logq = torch.log_softmax(source(batch).logits.float(), dim=-1)  # (B, T, V)
        logits = variant(batch).logits.float()
        shared = min(logq.shape[-1], logits.shape[-1])
        logq, logits = logq[..., :shared], logits[..., :shared]
        finite = torch.isfinite(logits).all(dim=-1)  # (B, T)
        logp = torch.log_softmax(logits, dim=-1)
        kl = (logq.exp() * (logq - logp)).sum(dim=-1)
        kl_sum += float(torch.where(finite, kl, torch.full_like(kl, math.inf)).sum())
        agree += int(((logp.argmax(-1) == logq.argmax(-1)) & finite).sum())
    return kl_sum / windows.numel(), agree / windows.numel(), windows.numel()


def check_variant(candidate: Path, source: Path, method: str, bits: int) -> GuardReport:
    """Load `candidate` (a staged variant directory with its manifest) as the server would and compare it
    with `source`; raises `GuardError` when its agreement collapses below the family's floor."""
    from slimserve.models.loader import load_variant

    reference = load_variant(source, dtype="fp32")
    loaded = load_variant(candidate, dtype="fp32")
    context = int(getattr(reference.model.config, "max_position_embeddings", None) or GUARD_WINDOW_TOKENS)
    windows = guard_windows(reference.tokenizer, context)
    kl, agreement, tokens = compare(loaded.model, reference.model, windows)
    floor = AGREEMENT_FLOORS[method_family(method, bits)]
    report = GuardReport(reference.name, windows.shape[0], tokens, round(kl, 5), round(agreement, 4), floor)
    del reference, loaded
    if not agreement >= floor:
        architecture = ", ".join(getattr(_config(candidate), "architectures", None) or []) or "this model"
        raise GuardError(
            f"refused to register {candidate.name}: it agrees with its source {report.source} on {agreement:.1%} "
            f"of {tokens} held-out tokens (KL {kl:.3g} nats), below the {floor:.0%} floor for {method} on "
            f"{architecture}: it no longer predicts what its source does, so nothing was registered"
        )
    return report


def _config(directory: Path) -> Any:
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(directory)
