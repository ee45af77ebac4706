"""Where variants live: `$SLIMSERVE_HOME/variants/<name>/`, plus any directory given by path (a variant's, or a
plain Hugging Face directory, described from its files)."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from slimserve.models.embedded import DEFAULT_TEACHER, convert_embedded_teacher, is_current
from slimserve.models.manifest import MANIFEST_FILE, ManifestError, VariantManifest, describe_directory

DEFAULT_VARIANT = DEFAULT_TEACHER


class VariantNotFoundError(LookupError):
    """Neither a variant directory nor a registered name."""


def slimserve_home() -> Path:
    """Root of slimserve's cache: `$SLIMSERVE_HOME`, default `~/.cache/slimserve`."""
    return Path(os.environ.get("SLIMSERVE_HOME") or Path.home() / ".cache" / "slimserve").expanduser()


@dataclass(frozen=True)
class RegisteredVariant:
    """A variant directory and its manifest, as found on disk."""

    path: Path
    manifest: VariantManifest

    @property
    def name(self) -> str:
        return self.manifest.name


class VariantRegistry:
    """Lists and resolves variants; materializes the embedded default teacher on first use."""

    def __init__(self, home: Path | None = None) -> None:
        self.home = Path(home) if home is not None else slimserve_home()

    @property
    def variants_dir(self) -> Path:
        return self.home / "variants"

    def list(self) -> list[RegisteredVariant]:
        """Every readable variant under the registry; broken directories are skipped, not fatal."""
        found: list[RegisteredVariant] = []
        if not self.variants_dir.is_dir():
            return found
        for child in sorted(self.variants_dir.iterdir()):
            if child.name.startswith(".") or not (child / MANIFEST_FILE).is_file():
                continue
            try:
                found.append(RegisteredVariant(child, VariantManifest.read(child)))
            except ManifestError:
                continue
        return found

    def find(self, name_or_path: str | os.PathLike[str]) -> RegisteredVariant | None:
        """A variant directory or registered name, without building anything; None if there is none."""
        candidate = Path(name_or_path).expanduser()
        if candidate.is_dir():
            if (candidate / MANIFEST_FILE).is_file():
                return RegisteredVariant(candidate, VariantManifest.read(candidate))
            return RegisteredVariant(candidate, describe_directory(candidate))  # a plain Hugging Face directory
        return next((v for v in self.list() if v.name == str(name_or_path)), None)

    def exists(self, name_or_path: str | os.PathLike[str]) -> bool:
        """True if `resolve` would succeed: found on disk, or the embedded default."""
        return str(name_or_path) == DEFAULT_TEACHER or self.find(name_or_path) is not None

    def resolve(self, name_or_path: str | os.PathLike[str]) -> RegisteredVariant:
        """Turn a directory path or a registered name into a variant; the default teacher is built on demand
        (and rebuilt when the cached conversion predates the current converter)."""
        found = self.find(name_or_path)
        name = str(name_or_path)
        if found is not None and not (name == DEFAULT_TEACHER and not is_current(found.path)):
            return found
        if name == DEFAULT_TEACHER:
            path = convert_embedded_teacher(self.variants_dir / DEFAULT_TEACHER)
            return RegisteredVariant(path, VariantManifest.read(path))
        known = ", ".join(v.name for v in self.list()) or "none"
        raise VariantNotFoundError(
            f"no variant {name!r}: not a directory, and not registered under {self.variants_dir} "
            f"(registered: {known}; the embedded default is {DEFAULT_TEACHER!r})"
        )

    def register(self, source: Path, manifest: VariantManifest) -> Path:
        """Move a finished variant directory into the registry under its manifest name."""
        target = self.variants_dir / manifest.name
        if target.exists():
            raise FileExistsError(f"variant {manifest.name!r} already exists at {target}")
        self.variants_dir.mkdir(parents=True, exist_ok=True)
        Path(source).rename(target)
        return target
