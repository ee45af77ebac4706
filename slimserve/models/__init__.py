"""What a variant is (manifest), where variants live (registry), how one is loaded (loader)."""

import os

# Nothing in slimserve may reach a model hub at run time: every weight comes from disk.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

from slimserve.models.loader import LoadedVariant, load_variant
from slimserve.models.manifest import ManifestError, VariantManifest
from slimserve.models.registry import (
    DEFAULT_VARIANT,
    VariantNotFoundError,
    VariantRegistry,
    slimserve_home,
)

__all__ = [
    "DEFAULT_VARIANT",
    "LoadedVariant",
    "ManifestError",
    "VariantManifest",
    "VariantNotFoundError",
    "VariantRegistry",
    "load_variant",
    "slimserve_home",
]
