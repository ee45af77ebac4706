from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from slimserve.models import ManifestError, VariantManifest, VariantNotFoundError, VariantRegistry, load_variant
from slimserve.models.loader import parse_dtype
from tests.tiny import make_tiny_variant


def _manifest(**overrides: object) -> VariantManifest:
    fields: dict[str, object] = dict(
        name="v", base_model="t", method="none", bits=32, parameters=10, size_bytes=40, dtype="float32"
    )
    fields.update(overrides)
    return VariantManifest(**fields)  # type: ignore[arg-type]


def test_manifest_round_trips_and_defaults_family(tmp_path: Path) -> None:
    manifest = _manifest(metrics={"perplexity": 12.5})
    manifest.write(tmp_path)
    again = VariantManifest.read(tmp_path)
    assert again == manifest
    assert again.family == "t"


def test_manifest_rejects_unknown_fields_by_name(tmp_path: Path) -> None:
    data = _manifest().to_dict() | {"bitz": 4}
    (tmp_path / "manifest.json").write_text(json.dumps(data))
    with pytest.raises(ManifestError, match="bitz"):
        VariantManifest.read(tmp_path)


def test_manifest_missing_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(ManifestError, match="not a variant directory"):
        VariantManifest.read(tmp_path)


def test_manifest_rejects_nonpositive_bits() -> None:
    with pytest.raises(ManifestError, match="bits"):
        _manifest(bits=0)


def test_registry_lists_and_resolves_by_name_and_path(slimserve_home: Path) -> None:
    registry = VariantRegistry()
    path = make_tiny_variant(registry.variants_dir / "tiny-a", name="tiny-a")
    (registry.variants_dir / "broken").mkdir()
    (registry.variants_dir / "broken" / "manifest.json").write_text("{not json")

    assert [v.name for v in registry.list()] == ["tiny-a"]
    assert registry.resolve("tiny-a").path == path
    assert registry.resolve(str(path)).name == "tiny-a"


def test_registry_unknown_name_lists_what_exists(slimserve_home: Path) -> None:
    registry = VariantRegistry()
    make_tiny_variant(registry.variants_dir / "tiny-a", name="tiny-a")
    with pytest.raises(VariantNotFoundError, match="tiny-a"):
        registry.resolve("no-such-variant")


def test_load_variant_gives_logits_and_tokenizer(tiny_variant_dir: Path) -> None:
    loaded = load_variant(tiny_variant_dir, dtype="bf16")
    ids = loaded.tokenizer("The capital of France", return_tensors="pt")["input_ids"]
    logits = loaded.model(ids).logits
    assert logits.shape == (1, ids.shape[1], len(loaded.tokenizer))
    assert logits.dtype == torch.bfloat16
    assert loaded.manifest.name == "tiny-llama"
    assert loaded.context_length == 256
    assert loaded.eos_token_ids == {loaded.tokenizer.convert_tokens_to_ids("<|im_end|>")}


def test_parse_dtype_names_the_choices() -> None:
    assert parse_dtype("bf16") is torch.bfloat16
    assert parse_dtype(None, default=torch.float16) is torch.float16
    with pytest.raises(ValueError, match="bf16"):
        parse_dtype("int3")


def test_cached_default_conversions_are_redone_when_the_converter_changes(tmp_path: Path) -> None:
    from slimserve.models.embedded import CONVERTER_VERSION, is_current

    path = make_tiny_variant(tmp_path / "old")
    assert not is_current(path)  # made before converter versions were recorded
    manifest = VariantManifest.read(path)
    manifest.provenance["converter_version"] = CONVERTER_VERSION
    manifest.write(path)
    assert is_current(path)
    assert not is_current(tmp_path / "missing")
