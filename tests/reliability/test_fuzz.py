"""Schemathesis against the server's own /openapi.json: no server error, no response the document does not
promise, no invalid request accepted (bounded: a fixed number of examples per operation and a seed)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.reliability.conftest import KEY, ROOT, Server

pytestmark = pytest.mark.reliability

CHECKS = (
    "not_a_server_error,status_code_conformance,content_type_conformance,response_headers_conformance,"
    "response_schema_conformance,negative_data_rejection,ignored_auth"
)
MAX_EXAMPLES = 30


def test_fuzzing_the_openapi_document_finds_no_server_error_and_no_mismatch(
    tiny_server: Server, tmp_path: Path, figures: dict[str, Any]
) -> None:
    report = tmp_path / "schemathesis.json"
    command = [
        str(Path(sys.executable).with_name("st")),
        "run",
        f"{tiny_server.base_url}/openapi.json",
        "--header",
        f"Authorization: Bearer {KEY}",
        "--checks",
        CHECKS,
        "--phases",
        "examples,coverage,fuzzing",
        "--max-examples",
        str(MAX_EXAMPLES),
        "--seed",
        "1",
        "--workers",
        "1",
        "--request-timeout",
        "30",
        "--report",
        "json",
        "--report-json-path",
        str(report),
    ]
    env = os.environ | {"SCHEMATHESIS_HOOKS": "tests.reliability.fuzz_hooks", "PYTHONPATH": str(ROOT)}
    run = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert report.exists(), run.stdout[-3000:] + run.stderr[-3000:]
    found = json.loads(report.read_text())
    cases = found["test_cases"]
    accepted = sum(p.get("accepted", 0) for rates in found["valid_rates"].values() for p in rates.values())
    figures.update(
        check=f"fuzz: schemathesis over /openapi.json, {MAX_EXAMPLES} examples per operation, seed 1",
        cases=cases["generated"],
        accepted_2xx=accepted,
        failures=cases["with_failures"],
        errors=cases["errored"],
        seconds=round(found["running_time"]),
    )
    assert run.returncode == 0 and cases["with_failures"] == 0 and cases["errored"] == 0, run.stdout[-6000:]
    assert accepted > 100  # the cases reached generation, not only validation
    assert "Traceback" not in tiny_server.log.read_text(errors="replace")
