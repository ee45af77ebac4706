"""`GET /health` (the probes': open without a key) and `GET /metrics` (Prometheus)."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Response
from fastapi.responses import JSONResponse, PlainTextResponse

from slimserve.server import status
from slimserve.server.protocol import HealthResponse
from slimserve.server.routes.dispatch import Dispatcher, dispatcher

router = APIRouter()


@router.get(
    "/health",
    response_model=HealthResponse,
    responses={503: {"model": HealthResponse, "description": "Loading, or nothing can serve."}},
)
async def health(server: Annotated[Dispatcher, Depends(dispatcher)]) -> JSONResponse:
    body, code = status.health(server.pool, server.drain.draining)
    return JSONResponse(body.model_dump(exclude_none=True), status_code=code)


@router.get("/metrics", response_class=PlainTextResponse)
async def prometheus(server: Annotated[Dispatcher, Depends(dispatcher)]) -> Response:
    return Response(server.metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")
