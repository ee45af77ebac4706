"""A compression run end to end, from a YAML recipe (or the same structure built in Python).

    teacher: smollm2-135m-instruct
    steps:
      - quantize: {source: teacher, method: int4-gptq, embedding: int8}
      - distill: {name: smollm2-student, student: {layers: 20}, max_minutes: 20}
      - quantize: {source: smollm2-student, method: int8-weight, embedding: int8}
      - evaluate: {}
    report: reports/smollm2

Every step writes a registered variant (writing into the registry is registering). `source: teacher`
names the recipe's teacher. The whole recipe is validated before the first step runs: unknown keys, a
quantize option of another method (`damp` on int8-weight), unknown step kinds and sources that neither
exist nor are produced by an earlier step are errors.
"""

from __future__ import annotations

import dataclasses
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from slimserve.compression.distill_config import DistillConfig
from slimserve.compression.quantize import QuantizeConfig
from slimserve.configs import ConfigError, from_mapping
from slimserve.models.registry import VariantRegistry

STEP_KINDS = ("distill", "quantize", "evaluate")
RECIPES_DIR = Path(__file__).parent / "recipes"


class RecipeError(ValueError):
    """A recipe that cannot run; raised before any step starts."""


@dataclass
class QuantizeStep:
    source: str
    config: QuantizeConfig


@dataclass
class DistillStep:
    config: DistillConfig


@dataclass
class EvaluateStep:
    variants: list[str] | None = None
    """Names to measure; default: the teacher and every variant the recipe produced."""
    max_tokens: int = 4096
    """Tokens of held-out text scored per variant."""
    runtime: bool = True
    """Measure load time, memory and speed as well as quality."""


Step = QuantizeStep | DistillStep | EvaluateStep


@dataclass
class Recipe:
    name: str
    """Names the report; default: the recipe file's name."""
    teacher: str
    """The variant that `source: teacher` (and every distill step) starts from."""
    steps: list[Step] = field(default_factory=list)
    report: str | None = None
    """Directory for report.md and pareto.png; default `$SLIMSERVE_HOME/reports/<name>`."""


def parse_recipe(data: dict[str, Any], name: str = "recipe") -> Recipe:
    """Build a Recipe from parsed YAML; the recipe's keys are `Recipe`'s fields and each step is built by its
    config class (`from_mapping`, as the CLI's --config files are), with errors that name the offending step
    and key."""
    if not isinstance(data, dict):
        raise RecipeError("a recipe is a mapping with `teacher` and `steps`")
    try:
        recipe: Recipe = from_mapping(Recipe, {"name": name, **data, "steps": []})
    except ConfigError as exc:
        raise RecipeError(f"recipe: {exc}") from exc
    if not data.get("steps"):
        raise RecipeError("a recipe needs a non-empty `steps` list")
    teacher = str(recipe.teacher)
    steps: list[Step] = []
    for index, raw in enumerate(data["steps"], start=1):
        if not isinstance(raw, dict) or len(raw) != 1:
            raise RecipeError(f"step {index}: write each step as `- <kind>: {{...}}` with kind in {STEP_KINDS}")
        kind, params = next(iter(raw.items()))
        params = dict(params or {})
        where = f"step {index} ({kind})"
        try:
            if kind == "quantize":
                source = str(params.pop("source", "teacher"))
                steps.append(QuantizeStep(source=source, config=from_mapping(QuantizeConfig, params)))
            elif kind == "distill":
                params.setdefault("teacher", "teacher")
                steps.append(DistillStep(from_mapping(DistillConfig, params)))
            elif kind == "evaluate":
                steps.append(from_mapping(EvaluateStep, params))
            else:
                raise RecipeError(f"{where}: unknown step kind; choose one of {', '.join(STEP_KINDS)}")
        except RecipeError:
            raise
        except (ValueError, TypeError) as exc:
            raise RecipeError(f"{where}: {exc}") from exc
    recipe.name, recipe.teacher, recipe.steps = str(recipe.name), teacher, steps
    return recipe


def load_recipe(path: str | Path) -> Recipe:
    """Read a recipe file; a bare name looks in the shipped presets (`slimserve/compression/recipes/`)."""
    file = Path(path)
    if not file.exists() and (RECIPES_DIR / f"{path}.yaml").exists():
        file = RECIPES_DIR / f"{path}.yaml"
    if not file.is_file():
        presets = ", ".join(sorted(p.stem for p in RECIPES_DIR.glob("*.yaml")))
        raise RecipeError(f"recipe {path} does not exist (shipped presets: {presets})")
    try:
        data = yaml.safe_load(file.read_text())
    except yaml.YAMLError as exc:
        raise RecipeError(f"{file}: not valid YAML: {exc}") from exc
    return parse_recipe(data, name=file.stem)


def output_name(step: Step, recipe: Recipe, registry: VariantRegistry) -> str | None:
    if isinstance(step, QuantizeStep):
        source = recipe.teacher if step.source == "teacher" else step.source
        base = registry.find(source)
        return step.config.name or f"{base.name if base else Path(source).name}-{step.config.method}"
    if isinstance(step, DistillStep):
        return step.config.name
    return None


def validate(recipe: Recipe, registry: VariantRegistry, overwrite: bool = False) -> list[str]:
    """Check sources and names before anything runs; returns the names the recipe will produce.

    A variant the recipe would write that is already registered is an error unless `overwrite`."""
    if not registry.exists(recipe.teacher):
        raise RecipeError(f"teacher {recipe.teacher!r} is not a registered variant or variant directory")
    produced: list[str] = []
    for index, step in enumerate(recipe.steps, start=1):
        sources: list[str] = []
        if isinstance(step, QuantizeStep):
            sources = [step.source]
        elif isinstance(step, DistillStep):
            sources = [step.config.teacher]
        for source in sources:
            if source != "teacher" and source not in produced and not registry.exists(source):
                raise RecipeError(f"step {index}: source {source!r} is neither registered nor made by an earlier step")
        name = output_name(step, recipe, registry)
        if name is not None:
            if name in produced:
                raise RecipeError(f"step {index}: two steps write the variant {name!r}")
            if (registry.variants_dir / name).exists() and not overwrite:
                raise RecipeError(
                    f"step {index}: variant {name!r} already exists; remove it, rename the step or pass --overwrite"
                )
            produced.append(name)
    return produced


def run_recipe(
    recipe: Recipe,
    registry: VariantRegistry | None = None,
    distill_minutes: float | None = None,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Run every step in order; returns {variant name: metrics} of the evaluated variants and writes the report.

    `distill_minutes` overrides every distill step's wall-clock budget (smaller runs of the same recipe).
    `overwrite` replaces variants the recipe writes that already exist, each only when its own step starts (a
    run that fails early leaves the later ones in place).
    """
    from slimserve.compression.data import eval_text
    from slimserve.compression.distill import distill
    from slimserve.compression.evaluate import EvalConfig, evaluate, teacher_scores
    from slimserve.compression.quantize import quantize_variant
    from slimserve.compression.report import write_report
    from slimserve.models.loader import load_variant

    registry = registry or VariantRegistry()
    produced = validate(recipe, registry, overwrite)
    teacher = registry.resolve(recipe.teacher)
    metrics: dict[str, dict[str, Any]] = {}
    timings: dict[str, float] = {}
    for index, step in enumerate(recipe.steps, start=1):
        started = time.perf_counter()
        label = f"step {index}/{len(recipe.steps)}"
        name = output_name(step, recipe, registry)
        if overwrite and name is not None and (registry.variants_dir / name).exists():
            print(f"[{label}] replacing the registered {name}", flush=True)
            shutil.rmtree(registry.variants_dir / name)
        if isinstance(step, QuantizeStep):
            source = str(teacher.path) if step.source == "teacher" else step.source
            print(f"[{label}] quantize {source} -> {name} ({step.config.method})", flush=True)
            quantize_variant(source, dataclasses.replace(step.config, name=name), registry)
        elif isinstance(step, DistillStep):
            config = step.config
            if config.teacher == "teacher":
                config = dataclasses.replace(config, teacher=str(teacher.path))
            if distill_minutes is not None:
                config = dataclasses.replace(config, max_minutes=distill_minutes)
            print(f"[{label}] distill {config.teacher} -> {config.name}", flush=True)
            distill(config, registry)
        else:
            names = step.variants or [teacher.name, *produced]
            eval_config = EvalConfig(max_tokens=step.max_tokens)
            print(f"[{label}] score the held-out text with the teacher {teacher.name}", flush=True)
            scores = teacher_scores(
                load_variant(teacher.path, dtype=eval_config.quality_dtype), eval_text(), eval_config
            )
            for name in names:
                print(f"[{label}] evaluate {name}", flush=True)
                metrics[name] = evaluate(
                    name,
                    teacher=str(teacher.path),
                    config=eval_config,
                    measure_runtime=step.runtime,
                    registry=registry,
                    scores=scores,
                )
            del scores
        timings[label] = round(time.perf_counter() - started, 1)
    report_dir = Path(recipe.report) if recipe.report else registry.home / "reports" / recipe.name
    if metrics:
        write_report(report_dir, recipe.name, teacher.name, metrics, registry)
        print(f"report: {report_dir / 'report.md'}", flush=True)
    return {"variants": metrics, "seconds": timings, "report": str(report_dir)}
