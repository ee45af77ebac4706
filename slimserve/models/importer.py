"""Bring your own model: a local Hugging Face directory or a GGUF file becomes a registered variant.

Nothing is downloaded and no code from the model is run: the directory must hold safetensors weights and a
config whose architecture transformers knows (configs that ask for remote code are refused). The copy is
checked (config and tokenizer load) before it is registered, so a failed import leaves the registry as it was.
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
from pathlib import Path

from slimserve.models.gguf import convert_gguf
from slimserve.models.manifest import MANIFEST_FILE, ManifestError, VariantManifest, describe_directory
from slimserve.models.registry import RegisteredVariant, VariantRegistry

COPIED_SUFFIXES = {".safetensors", ".json", ".model", ".txt", ".jinja", ".tiktoken"}
"""Files of a Hugging Face directory that a variant needs: weights, configs, tokenizer files, chat template.
Pickled weights (`.bin`, `.pt`) and code (`.py`) are never copied."""

NAME_PATTERN = re.compile(r"^[a-z0-9][a-z0-9._-]*$")


def import_model(
    source: str | os.PathLike[str],
    name: str | None = None,
    registry: VariantRegistry | None = None,
    overwrite: bool = False,
) -> RegisteredVariant:
    """Register `source` (a Hugging Face directory or a `.gguf` file) under `name` (default: its own)."""
    registry = registry or VariantRegistry()
    source = Path(source).expanduser()
    if source.is_file() and source.suffix.lower() == ".gguf":
        name = name or source.stem.lower()
    elif source.is_dir():
        name = name or _directory_name(source)
    elif source.exists():
        raise ValueError(f"{source} is neither a model directory nor a .gguf file")
    else:
        raise FileNotFoundError(f"no model at {source}")
    if not NAME_PATTERN.match(name):
        raise ValueError(f"variant name {name!r}: use lowercase letters, digits, '.', '_' and '-' (--name NAME)")
    target = registry.variants_dir / name
    if target.exists() and not overwrite:
        raise FileExistsError(f"variant {name!r} already exists at {target} (pass --overwrite to replace it)")
    registry.variants_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=registry.variants_dir, prefix=f".{name}.importing-") as tmp:
        staging = Path(tmp) / "variant"
        manifest = _copy_directory(source, staging, name) if source.is_dir() else convert_gguf(source, staging, name)
        _check_loadable(staging)
        if target.exists():
            shutil.rmtree(target)
        return RegisteredVariant(registry.register(staging, manifest), manifest)


def _directory_name(source: Path) -> str:
    if (source / MANIFEST_FILE).is_file():
        return VariantManifest.read(source).name
    return source.resolve().name.lower()


def _copy_directory(source: Path, staging: Path, name: str) -> VariantManifest:
    """Copy the files a variant needs; keep its manifest (renamed) or write one from what the files say."""
    if (source / MANIFEST_FILE).is_file():
        manifest = VariantManifest.read(source)
        if manifest.name != name:
            if manifest.base_model == manifest.name:  # a teacher renamed: its family follows it
                manifest.base_model = manifest.family = name
            manifest.name = name
    else:
        manifest = describe_directory(source, name)
    staging.mkdir(parents=True)
    for path in sorted(source.iterdir()):
        if path.is_file() and path.suffix in COPIED_SUFFIXES and path.name != MANIFEST_FILE:
            shutil.copy2(path, staging / path.name)
    manifest.provenance.setdefault("source", str(source.resolve()))
    manifest.write(staging)
    return manifest


def _check_loadable(directory: Path) -> None:
    """The config names a causal LM that transformers knows without remote code, and the tokenizer loads."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    config = AutoConfig.from_pretrained(directory)
    if getattr(config, "auto_map", None):
        raise ManifestError(f"{directory.name}: the config asks for remote code (auto_map), which is never run")
    if type(config) not in AutoModelForCausalLM._model_mapping:
        raise ManifestError(
            f"{type(config).__name__} ({config.model_type}) is not a causal LM that transformers can load"
        )
    AutoTokenizer.from_pretrained(directory)
