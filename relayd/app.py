"""The FastAPI application: health, readiness, metrics, ``/ws`` and the admin API."""

from __future__ import annotations

import hmac
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

from fastapi import FastAPI, HTTPException, Request, Response
from fastapi.responses import JSONResponse
from starlette.datastructures import Headers
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from relayd import __version__, api, metrics, statuspage
from relayd.auth import AuthFailure, Grant
from relayd.listeners import format_peer
from relayd.runtime import Runtime
from relayd.ws import refusal

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


def is_json(content_type: str) -> bool:
    media = content_type.partition(";")[0].strip().lower()
    return media == "application/json" or (
        media.startswith("application/") and media.endswith("+json")
    )


class BodyLimit:
    """Read each request body up front, at most ``max_body`` bytes, then hand it on.

    A larger body is refused with 413 before it is read (``Content-Length``) or
    as soon as the count passes the limit (a chunked body has no length). A
    non-empty admin request body without a JSON ``Content-Type`` is refused with
    415 (FastAPI versions differ on untyped bodies). Nothing in relayd takes a
    large body, so a client cannot make the daemon buffer one; but for
    ``POST /v1/ports/{port}/send``, whose limit follows ``relay.max_message``
    (``send_body``), so that a message as large as a device may be sent fits.
    """

    def __init__(
        self,
        app: ASGIApp,
        max_body: int = api.MAX_BODY,
        send_body: Callable[[], int] | None = None,
    ) -> None:
        self.app = app
        self.max_body = max_body
        self.send_body = send_body

    def limit(self, scope: Scope) -> int:
        if self.send_body is not None and scope["method"] == "POST":
            parts = scope["path"].split("/")  # "", "v1", "ports", "8001", "send"
            if len(parts) == 5 and parts[1:3] == ["v1", "ports"] and parts[4] == "send":
                return max(self.max_body, self.send_body())
        return self.max_body

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = Headers(scope=scope)
        limit = self.limit(scope)
        length = headers.get("content-length", "")
        if length.isdigit() and int(length) > limit:
            await self._too_large(limit, scope, receive, send)
            return
        body = bytearray()
        while True:
            message = await receive()
            if message["type"] != "http.request":
                return  # the client went away before its body arrived
            body += message.get("body", b"")
            if len(body) > limit:
                await self._too_large(limit, scope, receive, send)
                return
            if not message.get("more_body", False):
                break
        if (
            body
            and not is_json(headers.get("content-type", ""))
            and scope["path"].startswith(ADMIN_PREFIXES)
        ):
            response = JSONResponse(
                {"detail": "the request body must be JSON (Content-Type: application/json)"},
                status_code=415,
            )
            await response(scope, receive, send)
            return
        pending: Message | None = {"type": "http.request", "body": bytes(body), "more_body": False}

        async def replay() -> Message:
            nonlocal pending
            if pending is not None:
                message, pending = pending, None
                return message
            return await receive()

        await self.app(scope, replay, send)

    async def _too_large(self, limit: int, scope: Scope, receive: Receive, send: Send) -> None:
        response = JSONResponse(
            {"detail": f"the request body is larger than {limit} bytes"},
            status_code=413,
            headers={"Connection": "close"},
        )
        await response(scope, receive, send)


def create_app(runtime: Runtime, *, admin_token: str | None = None) -> FastAPI:
    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await runtime.start_listeners()  # on the sockets relayd.server bound before
        try:
            yield
        finally:
            await runtime.shutdown()  # a no-op: relayd.server drained before uvicorn stops

    app = FastAPI(
        title="relayd",
        version=__version__,
        lifespan=lifespan,
        docs_url=None,
        redoc_url=None,
    )
    scrape = metrics.Metrics(runtime)

    def authorize(request: Request, *, token_required: bool | None = None) -> Grant:
        """The request's grant (relayd(8), ACCESS CONTROL), or HTTPException 401/403."""
        scope = request.scope
        client = scope.get("client")
        result = runtime.access.check(
            headers=scope["headers"],
            query=scope.get("query_string", b""),
            scheme=scope.get("scheme", "http"),
            admin=on_admin_socket(scope),
            peer=format_peer(tuple(client)) if client else "?",
            token_required=token_required,
        )
        if isinstance(result, AuthFailure):
            refused = refusal(result)
            raise HTTPException(refused.status, refused.reason, headers=dict(refused.headers))
        return result

    app.state.authorize = authorize  # statuspage.visible_ports: same rules as /ws

    @app.get("/healthz", include_in_schema=False)
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/readyz", include_in_schema=False)
    async def readyz() -> JSONResponse:
        phase = runtime.phase
        return JSONResponse({"status": phase}, status_code=200 if phase == "ready" else 503)

    @app.get("/metrics", include_in_schema=False)
    async def get_metrics(request: Request) -> Response:
        auth = runtime.settings.auth
        authorize(request, token_required=auth.mode == "token" and auth.metrics == "token")
        return Response(scrape.render(), media_type="text/plain; version=0.0.4")

    @app.get("/ws", include_in_schema=False)
    async def ws_without_upgrade() -> JSONResponse:
        # A WebSocket handshake never reaches the app: relayd.wsconn owns /ws.
        return JSONResponse(
            {"detail": "/ws is a WebSocket endpoint: connect with a WebSocket client"},
            status_code=426,
            headers={"Upgrade": "websocket", "Connection": "Upgrade"},
        )

    app.include_router(statuspage.create_router(runtime))
    api.install(app, runtime)
    # Inside the gate: refused requests are not read at all.
    app.add_middleware(
        BodyLimit, send_body=lambda: api.send_body_limit(runtime.settings.relay.max_message)
    )
    app.add_middleware(AdminGate, token=admin_token)
    return app
