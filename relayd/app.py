"""The FastAPI application: health, readiness, metrics, ``/ws`` and the admin API."""

from __future__ import annotations

import hmac
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request, Response
from fastapi.responses import JSONResponse
from starlette.types import ASGIApp, Receive, Scope, Send

from relayd import __version__, api, metrics, ws
from relayd.runtime import Runtime

ADMIN_PREFIXES = ("/v1/", "/openapi.json", "/docs", "/redoc")


def on_admin_socket(scope: Scope) -> bool:
    """True for connections on the admin Unix socket (uvicorn reports no TCP port there)."""
    server = scope.get("server")
    return server is None or server[1] is None


class AdminGate:
    """Admin routes answer on the Unix socket, and on TCP only with the bearer token."""

    def __init__(self, app: ASGIApp, token: str | None) -> None:
        self.app = app
        self.token = token.encode() if token else None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["path"].startswith(ADMIN_PREFIXES):
            if not on_admin_socket(scope):
                response = self._check(scope)
                if response is not None:
                    await response(scope, receive, send)
                    return
        await self.app(scope, receive, send)

    def _check(self, scope: Scope) -> Response | None:
        if self.token is None:
            return JSONResponse({"detail": "Not Found"}, status_code=404)
        supplied = b""
        for name, value in scope["headers"]:
            if name == b"authorization":
                scheme, _, credentials = value.partition(b" ")
                if scheme.lower() == b"bearer":
                    supplied = credentials.strip()
        if not hmac.compare_digest(supplied, self.token):
            return JSONResponse(
                {"detail": "a valid bearer token is required"},
                status_code=401,
                headers={"WWW-Authenticate": "Bearer"},
            )
        return None


def create_app(runtime: Runtime, *, admin_token: str | None = None) -> FastAPI:
    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[dict[str, Any]]:
        await runtime.start_listeners()
        try:
            yield {"runtime": runtime}
        finally:
            await runtime.shutdown()  # a no-op when RelayServer already drained

    app = FastAPI(
        title="relayd",
        version=__version__,
        lifespan=lifespan,
        docs_url=None,
        redoc_url=None,
    )
    app.state.runtime = runtime
    registry = metrics.make_registry(runtime)

    @app.get("/healthz", include_in_schema=False)
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/readyz", include_in_schema=False)
    async def readyz() -> JSONResponse:
        if runtime.ready and not runtime.draining:
            return JSONResponse({"status": "ready"})
        state = "draining" if runtime.draining else "starting"
        return JSONResponse({"status": state}, status_code=503)

    @app.get("/metrics", include_in_schema=False)
    async def get_metrics(request: Request) -> Response:
        return Response(metrics.render(registry), media_type="text/plain; version=0.0.4")

    app.include_router(ws.router)
    api.install(app, runtime)
    app.add_middleware(AdminGate, token=admin_token)
    return app
