"""Real `slimserve serve` processes on 127.0.0.1 for the reliability suite, and the figures it measures.

The suite's figures (cases fuzzed, overload outcomes, stop latencies, shutdown times) are printed at the
end and, with `SLIMSERVE_RELIABILITY_WRITE=docs/BENCHMARKS.md`, written there as the Reliability section.
"""

from __future__ import annotations

import functools
import importlib.util
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from slimserve.models import DEFAULT_VARIANT
from slimserve.models.embedded import EmbeddedModelMissingError, embedded_gguf_path
from tests.tiny import make_tiny_variant

KEY = "sk-reliability"
STARTUP_TIMEOUT_S = 300
ROOT = Path(__file__).resolve().parents[2]
FIGURES: dict[str, Any] = {}
"""What each test measured, by test: printed at the end of the session (and written where asked)."""


@dataclass
class Server:
    """One server process and how to reach it."""

    base_url: str
    process: subprocess.Popen[bytes]
    log: Path

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {KEY}"}

    @functools.cached_property
    def client(self) -> httpx.Client:
        """One kept-alive connection for polling: a new one per poll costs the shared cores a visible share."""
        return httpx.Client(base_url=self.base_url, headers=self.headers, timeout=10)

    def metric(self, name: str, model: str) -> float:
        text = self.client.get("/metrics").text
        found = re.search(rf'^{name}{{model="{re.escape(model)}"}} (\S+)$', text, flags=re.MULTILINE)
        return float(found.group(1)) if found else 0.0

    def rss_mb(self) -> float:
        for line in Path(f"/proc/{self.process.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
        raise AssertionError("no VmRSS")

    def tail(self) -> str:
        return self.log.read_text(errors="replace")[-3000:]

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def launch(log: Path, *args: str) -> Server:
    """Start `slimserve serve ARGS` on a free port of 127.0.0.1 with the suite's key; return once healthy."""
    port = _free_port()
    with log.open("wb") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "slimserve", "serve", "--port", str(port), "--api-key", KEY, *args],
            stdout=out,
            stderr=subprocess.STDOUT,
            env=os.environ.copy(),
        )
    server = Server(f"http://127.0.0.1:{port}", process, log)
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    while True:
        if process.poll() is not None:
            pytest.fail(f"server exited with {process.returncode}:\n{server.tail()}")
        try:
            if httpx.get(f"{server.base_url}/health", timeout=2).status_code == 200:
                return server
        except httpx.TransportError:
            pass
        if time.monotonic() > deadline:
            server.stop()
            pytest.fail(f"server not healthy after {STARTUP_TIMEOUT_S} s:\n{server.tail()}")
        time.sleep(0.5)


@pytest.fixture(scope="session")
def real_model() -> str:
    try:
        embedded_gguf_path()
    except EmbeddedModelMissingError as exc:
        pytest.skip(str(exc))
    return DEFAULT_VARIANT


@pytest.fixture(scope="session")
def real_server(tmp_path_factory: pytest.TempPathFactory, real_model: str) -> Iterator[Server]:
    """The embedded model behind small limits (4 running + 4 waiting), so overload is cheap to reach."""
    log = tmp_path_factory.mktemp("real") / "server.log"
    server = launch(log, "--variant", real_model, "--max-batch-size", "4", "--max-waiting", "4")
    yield server
    server.stop()


@pytest.fixture(scope="session")
def tiny_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """A tiny random model (64-token context) behind the real server: every route and check, at fuzzing speed."""
    variant = make_tiny_variant(tmp_path_factory.mktemp("variants") / "tiny-llama", context=64)  # short generations
    log = tmp_path_factory.mktemp("tiny") / "server.log"
    server = launch(log, "--variant", str(variant), "--default-max-tokens", "16")
    yield server
    server.stop()


@pytest.fixture
def figures(request: pytest.FixtureRequest) -> dict[str, Any]:
    """A test's measured figures, reported at the end of the session."""
    return FIGURES.setdefault(request.node.name, {})


def pytest_terminal_summary(terminalreporter: Any, exitstatus: int) -> None:
    if not FIGURES:
        return
    terminalreporter.section("reliability figures")
    for test, found in FIGURES.items():
        terminalreporter.write_line(f"{test}: {json.dumps(found)}")
    target = os.environ.get("SLIMSERVE_RELIABILITY_WRITE")
    if target and exitstatus == 0:  # the docs record a run that passed
        _write_section(Path(target))
        terminalreporter.write_line(f"wrote {target}")


def _write_section(path: Path) -> None:
    spec = importlib.util.spec_from_file_location("bench_report", ROOT / "benchmarks" / "report.py")
    assert spec is not None and spec.loader is not None
    report = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(report)
    lines = [
        "## Reliability: `make test-reliability`",
        "",
        "- command: `make test-reliability` (`pytest -m reliability tests/reliability`)",
        f"- date: {report.today()}",
        f"- machine: {report.machine()}",
        f"- load: {os.getloadavg()[0]:.1f} (one-minute load average at the end, on {os.cpu_count()} cores; the "
        "step times below grow with it: ~35 ms a token on this host idle)",
        f"- what it checks: the server from outside, on 127.0.0.1, as a hostile client would; all {len(FIGURES)} "
        "checks passed; these are the figures of that run, not timings to compare.",
        "",
        "| check | measured |",
        "|---|---|",
    ]
    lines += [f"| {found.get('check', test)} | {_describe(found)} |" for test, found in FIGURES.items()]
    report.write_section(path, "reliability", "\n".join(lines))


def _describe(found: dict[str, Any]) -> str:
    return ", ".join(f"{key.replace('_', ' ')}: {value}" for key, value in found.items() if key != "check")
