"""The FastAPI application: the endpoints' routers (`routes/`), auth, request counting, one error shape."""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager

from fastapi import FastAPI

from slimserve import __version__
from slimserve.server.errors import install_error_handlers
from slimserve.server.metrics import ServerMetrics
from slimserve.server.middleware import CountRequests, RequireKey
from slimserve.server.openapi import install_openapi
from slimserve.server.pool import VariantPool
from slimserve.server.profile import combined_sharing
from slimserve.server.router import Budget, Router
from slimserve.server.routes import chat_completions, completions, control, health, models
from slimserve.server.routes.dispatch import Dispatcher
from slimserve.server.serving_engine import ServingEngine
from slimserve.server.shutdown import ENGINE_STOP_S, Drain


def create_app(
    engines: Sequence[ServingEngine],
    metrics: ServerMetrics,
    api_key: str | None = None,
    default_max_tokens: int | None = 1024,
    memory_budget_mb: float | None = None,
    default_budget: Budget | None = None,
    public_metrics: bool = False,
) -> FastAPI:
    """Build the app around engines that the caller created (the pool starts and stops them).

    `default_max_tokens` caps requests that give no max_tokens (None: the whole remaining context).
    Variants beyond `memory_budget_mb` stay on disk until a request needs them. `default_budget` applies
    to routed requests that carry no budget of their own. `api_key` guards every route but /health (the
    probes') and, with `public_metrics`, /metrics. `app.state.drain` ends open requests at shutdown;
    `app.state.dispatcher` is what the endpoints share."""
    pool = VariantPool(engines, metrics, memory_budget_mb)
    router = Router(sharing=combined_sharing([e.sharing for e in engines]))

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        pool.start()
        yield
        pool.shutdown(ENGINE_STOP_S)

    app = FastAPI(title="slimserve", version=__version__, lifespan=lifespan)
    app.state.drain = drain = Drain()
    app.state.dispatcher = Dispatcher(pool, router, metrics, drain, default_budget or Budget(), default_max_tokens)
    install_error_handlers(app)
    open_paths = {"/health", "/metrics"} if public_metrics else {"/health"}
    install_openapi(app, protected=api_key is not None, open_paths=open_paths)
    app.add_middleware(RequireKey, api_key=api_key, open_paths=open_paths)
    app.add_middleware(  # outermost: requests refused for their key are counted too
        CountRequests,
        metrics=metrics,
        served=lambda: pool.entries.keys(),
        endpoints=lambda: {getattr(r, "path", "") for r in app.routes},
    )
    for endpoint in (health, models, control, chat_completions, completions):
        app.include_router(endpoint.router)
    return app
