"""slimserve's own endpoints under `/v1/slimserve`: load a variant now, and the router's live state."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Depends

from slimserve.server import status
from slimserve.server.errors import APIError
from slimserve.server.openapi import error_responses
from slimserve.server.protocol import ModelCard
from slimserve.server.routes.dispatch import Dispatcher, dispatcher

router = APIRouter(prefix="/v1/slimserve")


@router.post("/variants/{name}/load", responses=error_responses(404, 503))
async def load_variant(name: str, server: Annotated[Dispatcher, Depends(dispatcher)]) -> ModelCard:
    """Load a variant now (again, if it failed to load): its card once ready, else 503 with the reason."""
    entry = server.pool.entries.get(name)
    if entry is None:
        raise APIError(404, f"The model '{name}' is not a variant this server serves.", param="name")
    await server.pool.reload(entry)
    return status.card(server.pool, entry)


@router.get("/router")
async def router_state(server: Annotated[Dispatcher, Depends(dispatcher)]) -> dict[str, Any]:
    """Live profiles, residency and the router's last decisions."""
    return status.router_state(server.pool, server.router, server.server_budget)
