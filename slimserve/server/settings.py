"""Server settings in one place: flags override `SLIMSERVE_*` environment variables override defaults."""

from __future__ import annotations

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from slimserve.models.registry import DEFAULT_VARIANT


class ServerSettings(BaseSettings):
    """How `slimserve serve` runs. Each field is also read from `SLIMSERVE_<FIELD>`."""

    model_config = SettingsConfigDict(env_prefix="SLIMSERVE_", extra="ignore")

    host: str = Field("127.0.0.1", description="Address to bind; loopback by default.")
    port: int = Field(8000, ge=0, le=65535, description="TCP port (0 picks a free one).")
    variants: list[str] = Field(
        default_factory=lambda: [DEFAULT_VARIANT],
        description="Variant directories or registered names to serve; the first is the default.",
    )
    api_key: str | None = Field(
        None, description="If set, every route but /health requires 'Authorization: Bearer <key>'."
    )
    public_metrics: bool = Field(False, description="With api_key set, leave /metrics open for scrapers.")
    shutdown_timeout: float = Field(
        5.0, ge=0, description="Seconds running requests get to finish after SIGTERM before the rest are ended."
    )
    dtype: str = Field(
        "fast",
        description="Compute dtype for float variants: fast (bf16 where the machine runs it natively, else as "
        "stored), bf16, fp32, auto (as stored).",
    )
    max_batch_size: int = Field(16, ge=1, description="Sequences decoded together per engine step.")
    max_waiting: int = Field(64, ge=1, description="Sequences that may wait for a batch slot; past it, 429.")
    default_max_tokens: int = Field(
        1024, ge=0, description="Completion cap for requests without max_tokens; 0: the whole remaining context."
    )
    log_level: str = Field("info", description="uvicorn/slimserve log level.")
    memory_budget_mb: float | None = Field(
        None,
        gt=0,
        description="Resident memory for variants; the rest load on demand (LRU eviction). None: half "
        "of the memory available at start.",
    )
    latency_budget_ms: float | None = Field(
        None, gt=0, description="Default latency budget of routed requests that give none."
    )
    min_quality: str | None = Field(
        None, description="Default minimum quality of routed requests: a perplexity ratio or a tier."
    )
    trace_turns: str | None = Field(
        None, description="Append one JSON line per compute turn to this file (what each turn prefilled and stepped)."
    )
