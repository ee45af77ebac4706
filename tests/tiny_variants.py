"""Quantized tiny variants of every architecture, each made once per test session and shared by the tests that
only read them (quantizing forty of them again for every test that looks at one would take minutes)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from slimserve.compression.quantize import METHODS, CalibrationConfig, method_config, quantize_variant
from slimserve.models.registry import VariantRegistry
from tests.tiny import make_tiny_variant

CALIBRATION_TOKENS = 256
_MADE: dict[tuple[Path, str, str], Path] = {}


def tiny_source(root: Path, arch: str) -> Path:
    """The float tiny `arch` variant registered under `root` (made on first use)."""
    registry = VariantRegistry(root)
    path = registry.variants_dir / arch
    if not path.exists():
        make_tiny_variant(path, name=arch, arch=arch)
    return path


def tiny_quantized(root: Path, arch: str, method: str, **options: Any) -> Path:
    """`arch`'s tiny variant quantized with `method` (and QuantizeConfig `options`), made on first use."""
    key = (root, arch, method + "".join(f"-{k}={v}" for k, v in sorted(options.items())))
    if key not in _MADE:
        tiny_source(root, arch)
        name = f"{arch}-{method}" + "".join(f"-{v}" for _, v in sorted(options.items()))
        if issubclass(METHODS[method].config, CalibrationConfig):
            options = {"calibration_tokens": CALIBRATION_TOKENS, **options}
        config = method_config(method, name=name, **options)
        _MADE[key] = quantize_variant(arch, config, VariantRegistry(root))
    return _MADE[key]


def shared_root(factory: pytest.TempPathFactory) -> Path:
    """The one registry root of the session's shared tiny variants."""
    return factory.getbasetemp() / "tiny-variants"
