from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from slimserve.models import LoadedVariant, load_variant
from tests.tiny import make_tiny_variant


@pytest.fixture(scope="session")
def tiny_variant_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_variant(tmp_path_factory.mktemp("variants") / "tiny-llama")


@pytest.fixture(scope="session")
def tiny_loaded(tiny_variant_dir: Path) -> LoadedVariant:
    return load_variant(tiny_variant_dir, dtype="fp32")


@pytest.fixture
def slimserve_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """An empty registry, so tests never see (or write) the user's cache."""
    monkeypatch.setenv("SLIMSERVE_HOME", str(tmp_path / "home"))
    yield tmp_path / "home"
