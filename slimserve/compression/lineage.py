"""Which teacher a variant descends from, found through the registry and its own provenance.

`base_model` names the teacher, but a teacher need not be registered under that name: one imported or
distilled from a directory elsewhere is found by the absolute paths each step records in its provenance
(`source_path` for quantize, `teacher_path` for distill), followed back to the variant whose name is the
base model. The working directory plays no part: evaluated from another folder, a variant finds the same
teacher.
"""

from __future__ import annotations

from pathlib import Path

from slimserve.models.embedded import DEFAULT_TEACHER
from slimserve.models.manifest import ManifestError, VariantManifest
from slimserve.models.registry import RegisteredVariant, VariantRegistry

LINKS = (("source_path", "source"), ("teacher_path", "teacher"))
"""Provenance keys that point to the parent a variant was made from: (absolute path, registered name)."""


def _parent(variant: RegisteredVariant, registry: VariantRegistry) -> RegisteredVariant | None:
    """The variant this one was made from, by its recorded path, else by its recorded registered name."""
    provenance = variant.manifest.provenance
    for path_key, name_key in LINKS:
        path = provenance.get(path_key)
        if path and (Path(path) / "manifest.json").is_file():
            try:
                return RegisteredVariant(Path(path), VariantManifest.read(Path(path)))
            except ManifestError:
                continue
        name = provenance.get(name_key)
        found = _registered(name, registry) if isinstance(name, str) else None
        if found is not None:
            return found
    return None


def _registered(name: str, registry: VariantRegistry) -> RegisteredVariant | None:
    """A variant registered under `name` (never a path relative to the working directory)."""
    if name == DEFAULT_TEACHER:
        return registry.resolve(name)
    return next((v for v in registry.list() if v.name == name), None)


def find_teacher(variant: RegisteredVariant, registry: VariantRegistry) -> tuple[RegisteredVariant | None, str]:
    """The variant's teacher (itself for a teacher) and, when none is found, why not in a sentence."""
    base = variant.manifest.base_model
    if variant.manifest.name == base:
        return variant, ""
    registered = _registered(base, registry)
    if registered is not None:
        return registered, ""
    current: RegisteredVariant | None = variant
    seen: set[Path] = set()
    while current is not None and current.path.resolve() not in seen:
        seen.add(current.path.resolve())
        if current.manifest.name == base:
            return current, ""
        current = _parent(current, registry)
    return None, (
        f"its base model {base!r} is not registered under {registry.variants_dir}, and no path or name in its "
        "provenance leads to it; pass --teacher"
    )
