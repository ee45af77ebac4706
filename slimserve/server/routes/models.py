"""`GET /v1/models` and `GET /v1/models/{model_id}`: every variant, every family that routes, and `auto`."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends

from slimserve.server import status
from slimserve.server.errors import APIError
from slimserve.server.openapi import error_responses
from slimserve.server.protocol import ModelCard, ModelList
from slimserve.server.routes.dispatch import Dispatcher, dispatcher

router = APIRouter(prefix="/v1")


@router.get("/models")
async def list_models(server: Annotated[Dispatcher, Depends(dispatcher)]) -> ModelList:
    return ModelList(data=status.cards(server.pool))


@router.get("/models/{model_id:path}", responses=error_responses(404))
async def get_model(model_id: str, server: Annotated[Dispatcher, Depends(dispatcher)]) -> ModelCard:
    for found in status.cards(server.pool):
        if found.id == model_id:
            return found
    raise APIError(404, f"The model '{model_id}' does not exist.", param="model", code="model_not_found")
