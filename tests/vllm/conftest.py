"""`slimserve serve --backend vllm` on the embedded model and its int8-dynamic (W8A8) variant, once per session.

Each test module skips itself where vllm does not import (`make setup-vllm` builds the venv that has it).
vLLM runs with VLLM_CPU_CI_ENV=1 (its own CI setting: dynamo without inductor, no warm-up) unless
SLIMSERVE_TEST_VLLM_COMPILE=1: a first inductor compilation takes minutes per variant on two cores."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from slimserve.compression.quantize import method_config, quantize_variant
from slimserve.models import DEFAULT_VARIANT, VariantRegistry
from slimserve.models.embedded import EmbeddedModelMissingError, embedded_gguf_path
from tests.integration.conftest import API_KEY, RunningServer, serve

STARTUP_TIMEOUT_S = 600
MEMORY_BUDGET_MB = 3000
"""Two variants: each gets the smallest KV cache vLLM serves the 8k context with (256 MiB)."""


def vllm_environment() -> dict[str, str]:
    env = os.environ.copy()
    if env.get("SLIMSERVE_TEST_VLLM_COMPILE") != "1":
        env.setdefault("VLLM_CPU_CI_ENV", "1")
    return env


@pytest.fixture(scope="session")
def teacher() -> Path:
    try:
        embedded_gguf_path()
    except EmbeddedModelMissingError as exc:
        pytest.skip(str(exc))
    return VariantRegistry().resolve(DEFAULT_VARIANT).path  # the user's cache: converted once, reused


@pytest.fixture(scope="session")
def scratch(tmp_path_factory: pytest.TempPathFactory) -> VariantRegistry:
    return VariantRegistry(tmp_path_factory.mktemp("registry"))


@pytest.fixture(scope="session")
def w8a8_variant(teacher: Path, scratch: VariantRegistry) -> Path:
    """The teacher quantized to int8-dynamic (W8A8), which vllm-cpu loads."""
    return quantize_variant(str(teacher), method_config("int8-dynamic", calibration_tokens=1024), scratch)


@pytest.fixture(scope="session")
def vllm_server(tmp_path_factory: pytest.TempPathFactory, w8a8_variant: Path) -> Iterator[RunningServer]:
    arguments = [
        "--backend", "vllm", "--api-key", API_KEY, "--memory-budget-mb", str(MEMORY_BUDGET_MB),
        "--variant", DEFAULT_VARIANT, "--variant", str(w8a8_variant),
    ]  # fmt: skip
    yield from serve(tmp_path_factory, arguments, env=vllm_environment(), startup_timeout_s=STARTUP_TIMEOUT_S)
