"""Schemathesis hooks for the fuzz run (`SCHEMATHESIS_HOOKS=tests.reliability.fuzz_hooks`): model names and
variant names drawn from what the server serves, so generated requests reach generation rather than 404."""

from __future__ import annotations

import os
from typing import Any

import schemathesis

SERVED = os.environ.get("SLIMSERVE_FUZZ_MODEL", "tiny-llama")


@schemathesis.hook
def before_load_schema(context: Any, raw_schema: dict[str, Any]) -> None:
    served = {"type": "string", "enum": [SERVED]}
    schemas = raw_schema.get("components", {}).get("schemas", {})
    for request in ("ChatCompletionRequest", "CompletionRequest"):
        schemas[request]["properties"]["model"] = served
    for operations in raw_schema.get("paths", {}).values():
        for operation in operations.values():
            for parameter in operation.get("parameters", []):
                if parameter.get("in") == "path" and parameter.get("name") in ("name", "model_id"):
                    parameter["schema"] = served
