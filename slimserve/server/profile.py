"""What a variant's work costs: time to first token against prompt length, time per decode step against
batch size, and load time, from the manifest's figures corrected by what the engine measures.

Below both the engines (which feed it) and the router (which reads it): it imports neither.
"""

from __future__ import annotations

import bisect
import functools
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

from slimserve.models.manifest import VariantManifest

VLLM_PROFILE_KEY = "cost_profile_vllm"
"""Manifest metric holding what a variant's steps cost in vLLM's engine (`slimserve profile --backend vllm`):
its own summary figures and tables, apart from the transformers engine's."""
RUNTIMES = ("transformers", "vllm")
"""Engines a manifest can hold a cost profile for."""

Sharing = Literal["deadline", "round_robin", "own"]
"""How a variant's steps share the hardware: `deadline`, turns of slimserve's compute thread, earliest deadline
first (transformers engines on one host's cores); `round_robin`, turns the OS takes among processes that no
deadline orders (vLLM engines sharing cores); `own`, a device share of its own (vLLM on a GPU)."""


def combined_sharing(modes: Sequence[Sharing]) -> Sharing:
    """One mode for a family: the compute thread's turns if any engine takes them, else the OS's if any
    engine shares cores, else each its own share."""
    if "deadline" in modes:
        return "deadline"
    return "round_robin" if "round_robin" in modes else "own"


Points = tuple[tuple[int, float], ...]
"""Measured (x, milliseconds) pairs, x ascending: prompt tokens for a prefill, rows for a decode step."""


@functools.lru_cache(maxsize=4096)  # the router and the scheduler ask the same few points every turn
def interpolate(points: Points, x: float) -> float:
    """Piecewise-linear through `points`, extended beyond either end along the nearest segment."""
    if len(points) == 1:
        return points[0][1] * max(x, 1) / max(points[0][0], 1)
    xs = [p[0] for p in points]
    i = min(max(bisect.bisect_left(xs, x), 1), len(points) - 1)
    (x0, y0), (x1, y1) = points[i - 1], points[i]
    return y0 + (y1 - y0) * (x - x0) / (x1 - x0)


def _points(table: Mapping[str, float] | None) -> Points:
    """A manifest's {"x": ms} table as sorted points (JSON keys are strings)."""
    return tuple(sorted((int(x), float(ms)) for x, ms in (table or {}).items()))


OUTLIER_BOUND = 0.5
"""An observation further than this share of the prediction from it teaches the profile as if it were only this
far: a shared host's turns spike (a turn at twice its usual time while another tenant holds a core), and at
full weight one spike raises every plan of the next few hundred milliseconds by a fifth, enough for a row
that can still make its deadline to be judged past saving and stepped only in the background. The host's
ordinary variation teaches at full weight, and a lasting change of speed still moves the profile a tenth
per step (Huber's bounded influence, applied to the least-mean-squares update)."""


def _nlms(
    scale: float, tilt: float, f_scale: float, f_tilt: float, observed: float, rate: float
) -> tuple[float, float]:
    """One normalised-LMS step of y = scale * f_scale + tilt * f_tilt towards `observed` (stable for rate < 2),
    the error bounded to `OUTLIER_BOUND` of the prediction."""
    predicted = scale * f_scale + tilt * f_tilt
    # against the measured figure too: a tilt learned at one end can drive the other end's prediction to
    # zero or below, and a bound of nothing would stop it from ever learning back
    bound = OUTLIER_BOUND * max(predicted, f_scale)
    error = min(max(observed - predicted, -bound), bound)
    gain = rate / max(f_scale * f_scale + f_tilt * f_tilt, 1e-9)
    return scale + gain * f_scale * error, tilt + gain * f_tilt * error


@dataclass
class CostProfile:
    """Predicted time to first token and per decode step of one variant, corrected from live traffic: what
    its turns cost, which the engine that runs them and the router that places requests both read.

    The manifest's measurements are the shape: the tables `slimserve profile` records (prefill time at each
    measured prompt length, step time at each measured batch size, interpolated between them), or, from
    older manifests, lines (TTFT(L) = overhead + per_token * L; step(B) through the batch-1 and batch-8
    step times); traffic learns a scale (the machine is uniformly slower or
    faster than when the manifest was measured) and a tilt (one end is off, e.g. per-sequence overhead
    makes large batches slower than the batch-8 figure). Each observation moves the prediction
    `smoothing` of the way to it, an outlier only as far as one `OUTLIER_BOUND` off would.
    """

    prefill_overhead_ms: float
    prefill_per_token_ms: float
    step_b1_ms: float
    step_b8_ms: float
    load_ms: float
    smoothing: float = 0.2
    observations: int = 0
    step_scale: float = 1.0
    step_tilt: float = 0.0
    prefill_scale: float = 1.0
    prefill_tilt: float = 0.0
    prefill_points: Points = ()
    """Measured (prompt tokens, ms) of a whole prefill; empty: the overhead + per-token line."""
    step_points: Points = ()
    """Measured (rows, ms) of one decode step; empty: the line through the batch-1 and batch-8 figures."""

    @classmethod
    def from_manifest(cls, manifest: VariantManifest | None, runtime: str = "transformers") -> CostProfile:
        """Start from the manifest's figures measured on `runtime`'s engine (or conservative guesses from the
        size): the transformers engine's at the top level, vLLM's under `cost_profile_vllm`."""
        if runtime not in RUNTIMES:
            raise ValueError(f"runtime must be one of {', '.join(RUNTIMES)}, got {runtime!r}")
        metrics = manifest.metrics if manifest else {}
        if runtime == "vllm":
            metrics = metrics.get(VLLM_PROFILE_KEY) or {}
        size_mb = (manifest.size_bytes / 1e6) if manifest else 500.0
        b1 = float(metrics.get("decode_tok_s_b1") or max(5.0, 12000.0 / max(size_mb, 1.0)))
        b8 = float(metrics.get("decode_tok_s_b8") or 4 * b1)
        ttft_128 = float(metrics.get("ttft_ms_128") or 1000.0 * 128 / (20 * b1))
        table = (metrics.get("cost_profile") or {}) if runtime == "transformers" else metrics
        return cls(
            prefill_overhead_ms=0.2 * ttft_128,
            prefill_per_token_ms=0.8 * ttft_128 / 128,
            step_b1_ms=1000.0 / b1,
            step_b8_ms=8000.0 / b8,
            load_ms=1000.0 * float(metrics.get("load_s") or size_mb / 100.0),
            prefill_points=_points(table.get("prefill_ms")),
            step_points=_points(table.get("step_ms")),
        )

    def _base_prefill_ms(self, prompt_tokens: int) -> float:
        if self.prefill_points:
            return interpolate(self.prefill_points, prompt_tokens)
        return self.prefill_overhead_ms + self.prefill_per_token_ms * prompt_tokens

    def _base_step_ms(self, batch: int) -> float:
        if self.step_points:
            return interpolate(self.step_points, max(1, batch))
        share = (max(1, batch) - 1) / 7  # 0 at batch 1, 1 at batch 8 (beyond: extrapolated)
        return self.step_b1_ms + share * (self.step_b8_ms - self.step_b1_ms)

    def _prefill_features(self, prompt_tokens: int) -> tuple[float, float]:
        # the tilt pivots at 128 tokens, so scale (the level) and tilt (the slope) are learned apart
        return self._base_prefill_ms(prompt_tokens), (prompt_tokens / 128 - 1) * self._base_prefill_ms(128)

    def _step_features(self, batch: int) -> tuple[float, float]:
        share = (max(1, batch) - 1) / 7
        # the tilt is zero at batch 1: an error seen at batch 1 rescales the whole line
        return self._base_step_ms(batch), share * self._base_step_ms(1)

    def ttft_ms(self, prompt_tokens: int) -> float:
        f_scale, f_tilt = self._prefill_features(prompt_tokens)
        return max(self.prefill_scale * f_scale + self.prefill_tilt * f_tilt, 0.1)

    def step_ms(self, batch: int) -> float:
        f_scale, f_tilt = self._step_features(batch)
        return max(self.step_scale * f_scale + self.step_tilt * f_tilt, 0.1)

    def manifest_ttft_ms(self, prompt_tokens: int) -> float:
        """TTFT by the manifest's line alone, before any correction from traffic."""
        return max(self._prefill_features(prompt_tokens)[0], 0.1)

    def manifest_step_ms(self, batch: int) -> float:
        """Step time by the manifest's figures alone, before any correction from traffic."""
        return max(self._step_features(batch)[0], 0.1)

    def observe_prefill(self, prompt_tokens: int, seconds: float) -> None:
        f_scale, f_tilt = self._prefill_features(prompt_tokens)
        self.prefill_scale, self.prefill_tilt = _nlms(
            self.prefill_scale, self.prefill_tilt, f_scale, f_tilt, 1000 * seconds, self.smoothing
        )
        self.observations += 1

    def observe_step(self, batch: int, seconds: float) -> None:
        f_scale, f_tilt = self._step_features(batch)
        self.step_scale, self.step_tilt = _nlms(
            self.step_scale, self.step_tilt, f_scale, f_tilt, 1000 * seconds, self.smoothing
        )
        self.observations += 1

    def observe_load(self, seconds: float) -> None:
        self.load_ms = 1000 * seconds
