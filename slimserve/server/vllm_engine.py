"""The GPU backend: each resident variant runs in vLLM's async engine, inside the slimserve process.

Chosen over `vllm serve` child processes behind the router because the router, pool, metrics and
OpenAI surface then stay one code path for both backends (an engine is an engine: `submit` returns the
same RequestHandle of GenerationEvents), there is no second HTTP hop on every token, and vLLM's v1
`AsyncLLM` already runs its engine core in its own process, so a crash or a long step does not block
the API event loop. vLLM is imported lazily: the CPU install never has it.

Sampling maps one to one onto vLLM's SamplingParams (temperature, top_p, top_k, penalties, seed,
stop strings, logprobs, logit_bias, ignore_eos, max_tokens); outputs are requested as deltas.
"""

from __future__ import annotations

import asyncio
import importlib.util
import itertools
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from slimserve.models.manifest import VariantManifest
from slimserve.server.engine import EngineBusyError, EngineNotReadyError, EngineState, GenerationEvent, RequestHandle
from slimserve.server.metrics import ServerMetrics
from slimserve.server.router import LatencyProfile
from slimserve.server.sampling import SamplingParams, TokenLogprob

log = logging.getLogger(__name__)

VLLM_FORMATS = ("transformers", "vllm")
"""Manifest runtimes that mean vLLM can load the directory (float safetensors, bitsandbytes, compressed-tensors)."""


def vllm_available() -> bool:
    """vLLM installed and a CUDA GPU visible (the `auto` backend's test)."""
    if importlib.util.find_spec("vllm") is None:
        return False
    import torch

    return bool(torch.cuda.is_available())


def servable_by_vllm(manifest: VariantManifest | None) -> str | None:
    """None when vLLM can load the variant; otherwise why not (for the server's message)."""
    if manifest is None:
        return None
    if "vllm" in manifest.runtimes:
        return None
    return (
        f"variant {manifest.name!r} ({manifest.method}) is stored in a form only {', '.join(manifest.runtimes)} "
        "can load; serve it with --backend transformers or re-quantize it without --embedding int8"
    )


def gpu_memory_fraction(memory_budget_mb: float | None, variants: int, gpu_total_mb: float) -> float:
    """Each resident variant's `gpu_memory_utilization`: an equal share of the server's memory budget."""
    if variants < 1:
        raise ValueError("at least one variant")
    budget = memory_budget_mb if memory_budget_mb is not None else 0.9 * gpu_total_mb
    return max(0.05, min(0.95, budget / variants / gpu_total_mb))


def vllm_sampling_kwargs(params: SamplingParams) -> dict[str, Any]:
    """Keyword arguments of vllm.SamplingParams for one sequence (seeded per sequence like the CPU backend)."""
    kwargs: dict[str, Any] = {
        "n": 1,
        "max_tokens": params.max_tokens,
        "temperature": params.temperature,
        "top_p": params.top_p,
        "top_k": params.top_k if params.top_k > 0 else -1,
        "presence_penalty": params.presence_penalty,
        "frequency_penalty": params.frequency_penalty,
        "seed": params.seed,
        "stop": list(params.stop) or None,
        "ignore_eos": params.ignore_eos,
        "logprobs": params.logprobs,
        "skip_special_tokens": True,
    }
    if params.logit_bias:
        kwargs["logit_bias"] = {int(k): float(v) for k, v in params.logit_bias.items()}
    return kwargs


@dataclass
class DeltaConverter:
    """vLLM RequestOutput deltas -> slimserve GenerationEvents (text, token ids, logprobs, finish)."""

    top_n: int = 0
    """Alternatives wanted per token (vLLM may add the sampled token beyond its top-k)."""
    completion_tokens: int = 0

    def convert(self, output: Any) -> GenerationEvent:
        completion = output.outputs[0]
        token_ids = list(completion.token_ids)
        self.completion_tokens += len(token_ids)
        logprobs: list[TokenLogprob] = []
        for token, options in zip(token_ids, completion.logprobs or [], strict=False):
            chosen = options.get(token)
            top = sorted(((t, o.logprob) for t, o in options.items()), key=lambda pair: -pair[1])
            logprobs.append(
                TokenLogprob(
                    token_id=token,
                    logprob=float(chosen.logprob) if chosen is not None else float("-inf"),
                    top=[(int(t), float(lp)) for t, lp in top[: self.top_n]],
                )
            )
        finish = completion.finish_reason if output.finished else None
        return GenerationEvent(
            text=completion.text,
            token_ids=token_ids,
            logprobs=logprobs,
            finish_reason=finish,
            completion_tokens=self.completion_tokens,
        )


class VLLMEngine:
    """One variant in vLLM's AsyncLLM; the same surface as TransformersEngine for the pool and the app."""

    def __init__(
        self,
        path: Path,
        name: str,
        metrics: ServerMetrics,
        manifest: VariantManifest | None,
        gpu_memory_utilization: float,
        max_batch_size: int = 256,
        max_waiting: int = 1024,
        dtype: str = "auto",
    ) -> None:
        self.path = Path(path)
        self.name = name
        self.metrics = metrics
        self.manifest = manifest
        self.gpu_memory_utilization = gpu_memory_utilization
        self.max_batch_size = max_batch_size
        self.max_waiting = max_waiting
        self.dtype = dtype
        self.state = EngineState.LOADING
        self.error: str | None = None
        self.variant: Any = None
        self.profile: LatencyProfile | None = None
        self._engine: Any = None
        self._tokenizer: Any = None
        self._context_length = 0
        self._defaults: dict[str, Any] = {}
        self._ids = itertools.count()
        self._active = 0
        self._ready = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    # ---- lifecycle -------------------------------------------------------------------------------

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._load())

    async def _load(self) -> None:
        try:
            from transformers import AutoTokenizer, GenerationConfig
            from vllm import AsyncEngineArgs
            from vllm.v1.engine.async_llm import AsyncLLM

            args = AsyncEngineArgs(
                model=str(self.path),
                served_model_name=[self.name],
                gpu_memory_utilization=self.gpu_memory_utilization,
                max_num_seqs=self.max_batch_size,
                dtype=self.dtype,
            )
            began = time.perf_counter()
            self._engine = await asyncio.to_thread(AsyncLLM.from_engine_args, args)
            self._tokenizer = AutoTokenizer.from_pretrained(self.path)
            model_config = await self._engine.get_model_config()
            self._context_length = int(model_config.max_model_len)
            self._defaults = _sampling_defaults(GenerationConfig.from_pretrained(self.path))
            if self.profile is not None:
                self.profile.observe_load(time.perf_counter() - began)
            self.state = EngineState.READY
            log.info("%s ready on vLLM (%.0f%% of GPU memory)", self.name, 100 * self.gpu_memory_utilization)
        except Exception as exc:
            log.exception("vLLM failed to load %s", self.name)
            self.error = f"{type(exc).__name__}: {exc}"
            self.state = EngineState.FAILED
        finally:
            self._ready.set()

    def wait_ready(self, timeout: float | None = None) -> bool:
        """Blocking wait (called from a worker thread by the pool)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while self.state is EngineState.LOADING and (deadline is None or time.monotonic() < deadline):
            time.sleep(0.05)
        return self.state is EngineState.READY

    def fresh(self) -> VLLMEngine:
        return VLLMEngine(
            self.path,
            self.name,
            self.metrics,
            self.manifest,
            self.gpu_memory_utilization,
            self.max_batch_size,
            self.max_waiting,
            self.dtype,
        )

    def shutdown(self, timeout: float = 10.0) -> None:
        self.state = EngineState.STOPPED
        if self._engine is not None:
            self._engine.shutdown()
            self._engine = None

    # ---- what the app reads ----------------------------------------------------------------------

    @property
    def tokenizer(self) -> Any:
        self._require_ready()
        return self._tokenizer

    @property
    def context_length(self) -> int:
        self._require_ready()
        return self._context_length

    @property
    def sampling_defaults(self) -> dict[str, Any]:
        return self._defaults

    @property
    def running(self) -> int:
        return min(self._active, self.max_batch_size)

    @property
    def waiting(self) -> int:
        return max(0, self._active - self.max_batch_size)

    shares_compute = False

    def deadlines(self) -> list[tuple[float | None, int]]:
        """Not tracked: on a GPU each variant has its own share of the device, so routing one request
        does not slow another variant's sequences (the router only uses this with shared compute)."""
        return []

    def _require_ready(self) -> None:
        if self.state is not EngineState.READY:
            reason = f": {self.error}" if self.error else ""
            raise EngineNotReadyError(f"model {self.name!r} is {self.state.value}{reason}")

    def submit_many(
        self, sequences: Sequence[tuple[list[int], SamplingParams]], deadline: float | None = None
    ) -> list[RequestHandle]:
        """Start a request's sequences, all or none (vLLM schedules them; the check here is only the cap)."""
        self._require_ready()
        if self._active + len(sequences) > self.max_batch_size + self.max_waiting:
            raise EngineBusyError(f"{self._active} sequences are already in flight on {self.name}")
        handles: list[RequestHandle] = []
        try:
            for prompt_ids, params in sequences:
                handles.append(self.submit(prompt_ids, params, deadline))
        except Exception:
            for handle in handles:
                handle.cancel()
            raise
        return handles

    def submit(self, prompt_ids: list[int], params: SamplingParams, deadline: float | None = None) -> RequestHandle:
        """Start one sequence in vLLM; its events arrive on the handle like the CPU engine's. vLLM schedules
        by its own policy (each variant has its own device share); the deadline is only kept on the handle."""
        self._require_ready()
        if self._active >= self.max_batch_size + self.max_waiting:
            raise EngineBusyError(f"{self._active} sequences are already in flight on {self.name}")
        from vllm import SamplingParams as VllmSamplingParams
        from vllm.inputs import TokensPrompt
        from vllm.sampling_params import RequestOutputKind

        handle = RequestHandle(f"{self.name}-{next(self._ids)}", prompt_ids, asyncio.get_running_loop(), deadline)
        sampling = VllmSamplingParams(**vllm_sampling_kwargs(params), output_kind=RequestOutputKind.DELTA)
        self._active += 1
        prompt = TokensPrompt(prompt_token_ids=prompt_ids)
        converter = DeltaConverter(top_n=params.logprobs or 0)
        asyncio.get_running_loop().create_task(self._stream(handle, prompt, sampling, converter))
        return handle

    async def _stream(self, handle: RequestHandle, prompt: Any, sampling: Any, converter: DeltaConverter) -> None:
        submitted = last = time.perf_counter()
        try:
            async for output in self._engine.generate(prompt, sampling, handle.request_id):
                if handle.cancelled.is_set():
                    await self._engine.abort(handle.request_id)
                    handle.queue.put_nowait(GenerationEvent("", [], [], "abort", converter.completion_tokens))
                    return
                event = converter.convert(output)
                now = time.perf_counter()
                if event.token_ids:
                    if converter.completion_tokens == len(event.token_ids):
                        self.metrics.ttft.labels(self.name).observe(now - submitted)
                        if self.profile is not None:
                            self.profile.observe_prefill(len(handle.prompt_ids), now - submitted)
                    else:
                        self.metrics.tpot.labels(self.name).observe((now - last) / len(event.token_ids))
                        if self.profile is not None:
                            self.profile.observe_step(self.running, (now - last) / len(event.token_ids))
                    last = now
                handle.queue.put_nowait(event)
                if event.finish_reason is not None:
                    self.metrics.prompt_tokens.labels(self.name).inc(len(handle.prompt_ids))
                    self.metrics.completion_tokens.labels(self.name).inc(converter.completion_tokens)
                    return
        except Exception as exc:  # an engine error ends this sequence, not the server
            log.exception("vLLM generation failed")
            handle.queue.put_nowait(GenerationEvent("", [], [], "error", converter.completion_tokens, str(exc)))
        finally:
            self._active -= 1


def _sampling_defaults(generation_config: Any) -> dict[str, Any]:
    """The same rule as the CPU loader: explicit temperature/top_p/top_k; do_sample=false is greedy."""
    explicit = generation_config.to_diff_dict()
    if explicit.get("do_sample") is False:
        return {"temperature": 0.0}
    return {key: explicit[key] for key in ("temperature", "top_p", "top_k") if explicit.get(key) is not None}
