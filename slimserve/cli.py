"""`slimserve <verb>`: each verb is one function over config objects, and its flags are generated from
those configs (`slimserve.configs`): a field's docstring is its `--help`, its default is declared once, in
the config class. Every verb takes `--config FILE.yaml` (a mapping of the same field names); `serve` also
reads `SLIMSERVE_<FIELD>` environment variables. Precedence: flags > --config file > environment > defaults.
"""

from __future__ import annotations

import argparse
import functools
import json
import logging
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from slimserve.configs import ConfigError, add_flags, field_names, from_mapping, given, merged, read_config_file
from slimserve.launch import serve
from slimserve.models.registry import DEFAULT_VARIANT, VariantNotFoundError, VariantRegistry
from slimserve.server.settings import ServerSettings

if TYPE_CHECKING:
    from slimserve.compression.distill_config import DistillConfig
    from slimserve.compression.evaluate import EvalConfig
    from slimserve.compression.quantize import QuantizeConfig
    from slimserve.server.profiling import ProfileConfig
    from slimserve.server.simulator import GridConfig


@dataclass
class ListArgs:
    as_json: bool = False
    """Print JSON instead of a table."""


def variants_list(args: ListArgs) -> None:
    """Print the registered variants with their method, bits, size and key metrics."""
    registry = VariantRegistry()
    found = registry.list()
    if args.as_json:
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


@dataclass
class ImportArgs:
    source: str
    """A directory with config.json, *.safetensors and tokenizer files, or a .gguf file."""
    name: str | None = None
    """Variant name [default: the directory's or file's name, lowercased]."""
    overwrite: bool = False
    """Replace a registered variant of the same name."""


def import_variant(args: ImportArgs) -> None:
    """Register a local Hugging Face directory or GGUF file as a variant (converted, checked, manifest written)."""
    from slimserve.models.importer import import_model

    variant = import_model(args.source, args.name, overwrite=args.overwrite)
    m = variant.manifest
    size = f"{m.parameters / 1e6:.1f}M parameters, {m.dtype}, {m.size_bytes / 1e6:.1f} MB"
    print(f"imported {m.name}: {size} at {variant.path}")
    print(f"serve it: slimserve serve --variant {m.name}   (or `slimserve quantize {m.name} ...` to compress it)")


def _fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


@dataclass
class QuantizeArgs:
    source: str
    """Variant directory or registered name to quantize (a float variant)."""
    evaluate_after: bool = False
    """Run `slimserve eval` on the result."""


def quantize(args: QuantizeArgs, config: QuantizeConfig) -> None:
    """Quantize a variant into a new registered variant; optionally measure it right away."""
    from slimserve.compression.quantize import quantize_variant
    from slimserve.models.manifest import VariantManifest
    from slimserve.models.runtimes import vllm_backend_note

    path = quantize_variant(args.source, config)
    print(f"wrote {path}")
    note = vllm_backend_note(VariantManifest.read(path))
    if note is not None:
        print(f"note: {note}")
    if args.evaluate_after:
        from slimserve.compression.evaluate import EvalConfig

        evaluate(EvalArgs(str(path)), EvalConfig())


def distill(config: DistillConfig) -> None:
    """Distill, register the student, and (with --qat) export its quantized variant too."""
    from slimserve.compression.distill import distill as run_distill

    path = run_distill(config)
    print(f"wrote {path}")
    if config.qat:
        from slimserve.compression.quantize import quantize_variant

        exported = quantize_variant(str(path), config.qat_export())
        print(f"wrote {exported}")


@dataclass
class CompressArgs:
    recipe: str
    """Recipe YAML file or the name of a shipped preset (e.g. smollm2-135m)."""
    distill_minutes: float | None = None
    """Override every distill step's wall-clock budget."""
    check: bool = False
    """Validate the recipe and print its plan; run nothing."""
    overwrite: bool = False
    """Replace variants of this recipe that already exist."""


def compress(args: CompressArgs) -> None:
    """Run (or with `check` only validate) a compression recipe."""
    from slimserve.compression.recipe import load_recipe, run_recipe, validate

    recipe = load_recipe(args.recipe)
    registry = VariantRegistry()
    produced = validate(recipe, registry, args.overwrite)
    if args.check:
        print(
            f"recipe {recipe.name}: teacher {recipe.teacher}; {len(recipe.steps)} steps; writes {', '.join(produced)}"
        )
        return
    result = run_recipe(recipe, registry, distill_minutes=args.distill_minutes, overwrite=args.overwrite)
    print(json.dumps(result["seconds"]))


@dataclass
class EvalArgs:
    variant: str
    """Variant directory or registered name."""
    teacher: str | None = None
    """Variant to compare against [default: the manifest's base_model, found in the registry or by the paths
    its provenance records]."""
    text: str | None = None
    """Held-out text file; its figures are printed, not recorded [default: pydoc_data held-out topics]."""
    runtime: bool = True
    """Measure load time, memory and speed (--no-runtime skips them)."""
    as_json: bool = False
    """Print the figures as JSON."""


def evaluate(args: EvalArgs, config: EvalConfig) -> None:
    """Measure a variant (quality vs the teacher, size, memory, speed) and record it in its manifest."""
    from slimserve.compression.data import read_text
    from slimserve.compression.evaluate import evaluate as run_eval

    metrics = run_eval(
        args.variant,
        teacher=args.teacher,
        text=read_text(args.text) if args.text else None,
        config=config,
        measure_runtime=args.runtime,
        write=args.text is None,  # the manifest keeps the standard held-out figures that the router compares
    )
    if args.as_json:
        print(json.dumps(metrics, indent=2))
    else:
        for key, value in metrics.items():
            print(f"{key:>18}: {value}")


@dataclass
class ProfileArgs:
    variant: str
    """Variant directory or registered name."""
    write: bool = True
    """Record the figures in the variant's manifest (--no-write only prints them)."""
    backend: str = "transformers"
    """Whose engine is measured: transformers (slimserve's; `cost_profile`) or vllm (vLLM's, run from the
    vLLM venv; `cost_profile_vllm`, beside the transformers figures)."""


def profile(args: ProfileArgs, config: ProfileConfig) -> None:
    """Measure what a variant's prefill and decode steps cost on this host; record it in its manifest, where
    the router's and the simulator's cost profiles read it."""
    from slimserve.models.loader import parse_dtype

    parse_dtype(config.dtype)
    progress = functools.partial(print, flush=True)
    if args.backend == "vllm":
        _profile_vllm(args, config, progress)
    else:
        from slimserve.server.profiling import profile_variant

        profile_variant(args.variant, config, write=args.write, progress=progress)


def _profile_vllm(args: ProfileArgs, config: ProfileConfig, progress: Callable[[str], None]) -> None:
    """vLLM's engine built as `slimserve serve --backend vllm` builds it (one variant, rows up to the largest
    measured batch), measured by `vllm_profiling`."""
    from slimserve.launch import vllm_engines
    from slimserve.server.profiling import PROFILE_BATCHES
    from slimserve.server.vllm_engine import vllm_available

    if not vllm_available():
        raise ValueError(
            "--backend vllm measures vLLM's engine, and vLLM does not import here: run it from the vLLM venv "
            f"(`make setup-vllm`, then `.venv-vllm/bin/slimserve profile {args.variant} --backend vllm`)"
        )
    from slimserve.server.vllm_profiling import profile_vllm

    rows = max(*PROFILE_BATCHES, *config.batch_sizes)
    (engine,) = vllm_engines(
        [args.variant], VariantRegistry(), None, None, explicit=True, max_batch_size=rows, dtype=config.dtype
    )
    env = engine.placement.environment() if engine.placement is not None else {}
    profile_vllm(engine.engine_args(), env, engine.path, config, write=args.write, progress=progress)


@dataclass
class SimulateArgs:
    variants: list[str]
    """A registered variant whose manifest carries a cost profile (`slimserve profile`); repeat the flag for
    each, the teacher first (quality is perplexity relative to it)."""
    json_path: str | None = None
    """Also write every cell's figures to this JSON file."""
    backend: str = "transformers"
    """Whose engine serves every variant, on its profile for that engine: transformers (`slimserve profile`) or
    vllm (`slimserve profile --backend vllm`: vLLM's continuous batching, deadlines as priorities)."""


def simulate(args: SimulateArgs, grid: GridConfig) -> None:
    """Serve seeded workloads on a virtual clock under each policy with the variants' measured cost profiles;
    print SLO attainment and mean quality per cell and goodput per policy."""
    from slimserve.server.simulator import grid_table, registered_variants, run_grid

    variants = registered_variants(args.variants, args.backend)
    cells = run_grid(variants, grid)
    print("\n".join(grid_table(variants, cells)))
    if args.json_path is not None:
        Path(args.json_path).write_text(json.dumps([c.figures() for c in cells], indent=1) + "\n")


@dataclass(frozen=True)
class Verb:
    """A subcommand: `run` takes one object per config class, built from flags, --config and defaults."""

    help: str
    run: Callable[..., None]
    configs: Callable[[], tuple[type, ...]]
    """Imported when the parser is built (the compression configs import torch)."""
    spelling: dict[str, dict[str, Any]] = field(default_factory=dict)
    """How a field's flag is written where the generated form is not the one users know (see `add_flags`)."""


def _quantize_configs() -> tuple[type, ...]:
    from slimserve.compression.quantize import QuantizeConfig

    return QuantizeArgs, QuantizeConfig


def _distill_configs() -> tuple[type, ...]:
    from slimserve.compression.distill_config import DistillConfig

    return (DistillConfig,)


def _eval_configs() -> tuple[type, ...]:
    from slimserve.compression.evaluate import EvalConfig

    return EvalArgs, EvalConfig


def _profile_configs() -> tuple[type, ...]:
    from slimserve.server.profiling import ProfileConfig

    return ProfileArgs, ProfileConfig


def _simulate_configs() -> tuple[type, ...]:
    from slimserve.server.simulator import GridConfig

    return SimulateArgs, GridConfig


def _spelling() -> dict[str, dict[str, dict[str, Any]]]:
    from slimserve.compression.losses import DIVERGENCES
    from slimserve.compression.quantize import METHODS
    from slimserve.server.profile import RUNTIMES
    from slimserve.server.simulator import POLICIES

    dtypes = {"choices": ["fast", "bf16", "fp32"]}
    return {
        "serve": {"variants": {"flag": "--variant", "action": "append", "nargs": None, "metavar": "DIR_OR_NAME"}},
        "quantize": {
            "source": {"positional": True},
            "evaluate_after": {"flag": "--eval"},
            "method": {"choices": sorted(METHODS)},
            "keep": {"nargs": "*"},
            "embedding": {"choices": ["float", "int8"]},
        },
        "distill": {
            "teacher": {"positional": True},
            "divergence": {"choices": list(DIVERGENCES)},
            "dtype": dtypes,
            "qat": {"choices": ["int4", "int8"]},
        },
        "eval": {"variant": {"positional": True}, "as_json": {"flag": "--json"}, "reference_dtype": dtypes},
        "compress": {"recipe": {"positional": True}},
        "profile": {"variant": {"positional": True}, "dtype": dtypes, "backend": {"choices": list(RUNTIMES)}},
        "simulate": {
            "variants": {"flag": "--variant", "action": "append", "nargs": None, "metavar": "NAME"},
            "json_path": {"flag": "--json", "metavar": "FILE"},
            "policies": {"choices": list(POLICIES)},
            "backend": {"choices": list(RUNTIMES)},
        },
        "import": {"source": {"positional": True}},
        "variants list": {"as_json": {"flag": "--json"}},
    }


VERBS: dict[str, Verb] = {
    "serve": Verb("serve variants behind an OpenAI-compatible API", serve, lambda: (ServerSettings,)),
    "quantize": Verb("post-training quantization of a variant into a new variant", quantize, _quantize_configs),
    "eval": Verb("measure a variant and record the figures in its manifest", evaluate, _eval_configs),
    "distill": Verb("distill a teacher into a smaller student and register it", distill, _distill_configs),
    "compress": Verb(
        "run a compression recipe (distill -> quantize -> evaluate -> report)", compress, lambda: (CompressArgs,)
    ),
    "profile": Verb(
        "measure a variant's prefill and step times on this host and record them in its manifest",
        profile,
        _profile_configs,
    ),
    "simulate": Verb(
        "compare routing policies on a seeded simulation over the variants' measured cost profiles",
        simulate,
        _simulate_configs,
    ),
    "import": Verb(
        "register your own model: a Hugging Face directory (safetensors) or a GGUF file; nothing is downloaded",
        import_variant,
        lambda: (ImportArgs,),
    ),
    "variants list": Verb(
        "list registered variants with method, bits, size and metrics", variants_list, lambda: (ListArgs,)
    ),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="slimserve", description=__doc__)
    verbs = parser.add_subparsers(dest="verb", required=True)
    groups: dict[str, argparse._SubParsersAction[argparse.ArgumentParser]] = {}
    spelling = _spelling()
    for name, verb in VERBS.items():
        into, word = verbs, name
        if " " in name:  # `variants list`: a verb with actions
            group, word = name.split(" ", 1)
            if group not in groups:
                groups[group] = verbs.add_parser(group, help="inspect the variant registry").add_subparsers(
                    dest="action", required=True
                )
            into = groups[group]
        p = into.add_parser(word, help=verb.help, description=verb.help)
        for index, cls in enumerate(verb.configs()):
            add_flags(p, cls, str(index), spelling.get(name, {}))
        p.add_argument(
            "--config",
            metavar="FILE.yaml",
            help="a YAML mapping of option names (as the flags, with _ or -) to values; flags given win",
        )
    return parser


def build_configs(verb: Verb, args: argparse.Namespace) -> list[Any]:
    """One object per config class of `verb`: its defaults, under the --config file, under the flags given."""
    classes = verb.configs()
    from_file = read_config_file(args.config) if args.config else {}
    names = [field_names(cls) for cls in classes]
    unknown = sorted(set(from_file) - set().union(*names))
    if unknown:
        allowed = ", ".join(sorted(set().union(*names)))
        raise ConfigError(f"--config {args.config}: unknown key(s) {', '.join(unknown)}; allowed: {allowed}")
    built = []
    for index, cls in enumerate(classes):
        values = merged({k: v for k, v in from_file.items() if k in names[index]}, given(args, str(index)))
        try:
            built.append(from_mapping(cls, values))
        except ConfigError as exc:
            raise ConfigError(f"{args.verb}: {exc}") from exc
    return built


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    verb = VERBS[f"{args.verb} {args.action}" if args.verb == "variants" else args.verb]
    try:
        verb.run(*build_configs(verb, args))
    except (VariantNotFoundError, ValueError, FileExistsError, FileNotFoundError) as exc:
        print(f"slimserve: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
