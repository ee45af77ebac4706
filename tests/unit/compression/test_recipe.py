from __future__ import annotations

from pathlib import Path

import pytest

from slimserve.compression.recipe import RecipeError, load_recipe, parse_recipe, run_recipe, validate
from slimserve.models import VariantManifest, VariantRegistry
from tests.tiny import make_tiny_variant

RECIPE = {
    "name": "tiny-run",
    "teacher": "teacher",
    "steps": [
        {"quantize": {"source": "teacher", "method": "int8-weight", "embedding": "int8", "name": "teacher-int8"}},
        {
            "distill": {
                "name": "student",
                "student": {"layers": 2, "calibration_tokens": 512},
                "seq_len": 64,
                "batch_size": 2,
                "max_steps": 3,
            }
        },
        {"quantize": {"source": "student", "method": "int4-rtn"}},
        {"evaluate": {"max_tokens": 256, "runtime": False}},
    ],
}


@pytest.fixture
def registry(slimserve_home: Path) -> VariantRegistry:
    registry = VariantRegistry()
    make_tiny_variant(registry.variants_dir / "teacher", name="teacher", layers=4, hidden=64)
    return registry


def test_a_recipe_runs_end_to_end_registers_variants_and_writes_a_report(
    registry: VariantRegistry, tmp_path: Path
) -> None:
    recipe = parse_recipe({**RECIPE, "report": str(tmp_path / "report")})
    result = run_recipe(recipe, registry)
    names = {"teacher", "teacher-int8", "student", "student-int4-rtn"}
    assert set(result["variants"]) == names
    assert names <= {v.name for v in registry.list()}
    student = VariantManifest.read(registry.variants_dir / "student")
    assert student.metrics["perplexity"] > 0 and "kl_to_teacher" in student.metrics  # written by evaluate
    report = (tmp_path / "report" / "report.md").read_text()
    assert all(f"| {name} |" in report for name in names)
    assert (tmp_path / "report" / "pareto.png").stat().st_size > 1000


def test_recipe_errors_name_the_problem_before_anything_runs(registry: VariantRegistry) -> None:
    with pytest.raises(RecipeError, match=r"step 1 \(quantize\): unknown key\(s\) bitz"):
        parse_recipe({"teacher": "teacher", "steps": [{"quantize": {"method": "int8-weight", "bitz": 3}}]})
    with pytest.raises(RecipeError, match="unknown step kind"):
        parse_recipe({"teacher": "teacher", "steps": [{"prune": {}}]})
    with pytest.raises(RecipeError, match="student: unknown key"):
        parse_recipe({"teacher": "teacher", "steps": [{"distill": {"name": "s", "student": {"depth": 2}}}]})
    with pytest.raises(RecipeError, match="unknown method"):
        parse_recipe({"teacher": "teacher", "steps": [{"quantize": {"method": "int3"}}]})
    rtn = {"method": "int4-rtn", "calibration_tokens": 256}
    with pytest.raises(RecipeError, match=r"step 1 \(quantize\): --calibration-tokens does not apply to --method int4"):
        parse_recipe({"teacher": "teacher", "steps": [{"quantize": rtn}]})
    with pytest.raises(RecipeError, match=r"recipe: unknown key\(s\) stepz"):
        parse_recipe({"teacher": "teacher", "stepz": []})
    missing = parse_recipe({"teacher": "teacher", "steps": [{"quantize": {"source": "ghost", "method": "int4-rtn"}}]})
    with pytest.raises(RecipeError, match="'ghost' is neither registered"):
        validate(missing, registry)
    with pytest.raises(RecipeError, match="teacher 'nobody'"):
        validate(parse_recipe({**RECIPE, "teacher": "nobody"}), registry)
    assert [v.name for v in registry.list()] == ["teacher"]


def test_a_rerun_refuses_existing_variants_unless_told_to_overwrite(registry: VariantRegistry) -> None:
    step = {"quantize": {"source": "teacher", "method": "int8-weight", "name": "teacher-int8"}}
    recipe = parse_recipe({"name": "again", "teacher": "teacher", "steps": [step]})
    run_recipe(recipe, registry)
    stale = registry.variants_dir / "teacher-int8" / "stale.txt"
    stale.write_text("from the first run")
    with pytest.raises(RecipeError, match=r"'teacher-int8' already exists.*--overwrite"):
        run_recipe(recipe, registry)
    assert stale.exists()  # the refusal touched nothing
    run_recipe(recipe, registry, overwrite=True)
    assert not stale.exists() and VariantManifest.read(registry.variants_dir / "teacher-int8").bits == 8


def test_the_shipped_preset_parses() -> None:
    recipe = load_recipe("smollm2-135m")
    assert recipe.teacher == "smollm2-135m-instruct" and len(recipe.steps) == 6
    with pytest.raises(RecipeError, match="shipped presets: smollm2-135m"):
        load_recipe("no-such-recipe")
