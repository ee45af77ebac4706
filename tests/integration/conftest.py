"""Start the real `slimserve serve` on the embedded default model, once per test session."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from openai import OpenAI

from slimserve.compression.quantize import QuantizeConfig, quantize_variant
from slimserve.models import DEFAULT_VARIANT, VariantRegistry
from slimserve.models.embedded import EmbeddedModelMissingError, embedded_gguf_path

API_KEY = "sk-integration"
STARTUP_TIMEOUT_S = 300


@dataclass
class RunningServer:
    base_url: str
    process: subprocess.Popen[bytes]
    log: Path

    def client(self, api_key: str = API_KEY) -> OpenAI:
        return OpenAI(base_url=f"{self.base_url}/v1", api_key=api_key, max_retries=0, timeout=120)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="session")
def int8_variant(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The default teacher quantized to int8 (W8A16), in a throw-away registry."""
    try:
        embedded_gguf_path()
    except EmbeddedModelMissingError as exc:
        pytest.skip(str(exc))
    teacher = VariantRegistry().resolve(DEFAULT_VARIANT)  # the user's cache: converted once, reused
    scratch = VariantRegistry(tmp_path_factory.mktemp("registry"))
    return quantize_variant(str(teacher.path), QuantizeConfig(method="int8-weight"), scratch)


BACKEND = os.environ.get("SLIMSERVE_TEST_BACKEND", "transformers")
"""The same tests run against the vLLM backend on a GPU machine: SLIMSERVE_TEST_BACKEND=vllm make integration."""


@pytest.fixture(scope="session")
def server(tmp_path_factory: pytest.TempPathFactory, int8_variant: Path) -> Iterator[RunningServer]:
    yield from serve(
        tmp_path_factory,
        ["--api-key", API_KEY, "--variant", DEFAULT_VARIANT, "--variant", str(int8_variant), "--backend", BACKEND],
    )


def serve(
    tmp_path_factory: pytest.TempPathFactory,
    arguments: list[str],
    env: dict[str, str] | None = None,
    startup_timeout_s: float = STARTUP_TIMEOUT_S,
) -> Iterator[RunningServer]:
    """`slimserve serve ARGUMENTS` on a free port until it is healthy; stopped when the caller's fixture ends."""
    port = _free_port()
    log = tmp_path_factory.mktemp("server") / "server.log"
    with log.open("wb") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "slimserve", "serve", "--port", str(port), *arguments],
            stdout=out,
            stderr=subprocess.STDOUT,
            env=env if env is not None else os.environ.copy(),
        )
    running = RunningServer(f"http://127.0.0.1:{port}", process, log)
    deadline = time.monotonic() + startup_timeout_s
    try:
        while True:
            if process.poll() is not None:
                pytest.fail(f"server exited with {process.returncode}:\n{log.read_text()[-3000:]}")
            try:
                if httpx.get(f"{running.base_url}/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"server not healthy after {startup_timeout_s} s:\n{log.read_text()[-3000:]}")
            time.sleep(0.5)
        yield running
    finally:
        process.terminate()
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
