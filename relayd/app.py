"""The ASGI application: health, readiness, metrics, ``/ws``, the status page and the admin API.

The public routes are plain Starlette routes. The admin API (FastAPI, its
pydantic models and OpenAPI schema) is built on the first admin request, in a
thread so the loop keeps relaying meanwhile: a daemon nobody administers does
not carry it (relayd(8), ADMIN API). Errors are ``{"detail": ...}`` JSON on both.
"""

from __future__ import annotations

import asyncio
import hmac
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

from starlette.applications import Starlette
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from relayd import metrics, statuspage
from relayd.auth import AuthFailure, Grant
from relayd.listeners import format_peer
from relayd.runtime import Runtime
from relayd.ws import refusal

MAX_BODY = 64 * 1024  # bytes: admin requests are small JSON objects


def send_body_limit(max_message: int) -> int:
    """The largest ``/send`` body: ``max_message`` bytes in base64, a peer and the keys."""
    return 4 * -(-max_message // 3) + 1024


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
        max_body: int = MAX_BODY,
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


async def http_error(request: Request, exc: Exception) -> Response:
    """As FastAPI answers an HTTPException: ``{"detail": ...}``, no body for 204 and 304."""
    assert isinstance(exc, HTTPException)
    if exc.status_code in (204, 304) or exc.status_code < 200:
        return Response(status_code=exc.status_code, headers=exc.headers)
    return JSONResponse({"detail": exc.detail}, status_code=exc.status_code, headers=exc.headers)


def get_route(path: str, endpoint: Callable[..., object]) -> Route:
    """A GET route that, like FastAPI's, answers HEAD with 405 (Starlette would add HEAD)."""
    route = Route(path, endpoint, methods=["GET"])
    assert route.methods is not None
    route.methods.discard("HEAD")
    return route


class LazyAdmin:
    """The admin API's FastAPI app, built once, off the loop, by the first admin request."""

    def __init__(self, build: Callable[[], ASGIApp]) -> None:
        self._build = build
        self._app: ASGIApp | None = None
        self._building: asyncio.Task[ASGIApp] | None = None

    async def app(self) -> ASGIApp:
        if self._app is None:
            if self._building is None:
                self._building = asyncio.create_task(asyncio.to_thread(self._build))
            try:
                self._app = await asyncio.shield(self._building)
            except Exception:
                self._building = None  # the next request tries again
                raise
        return self._app


class AdminDispatch:
    """Admin paths go to the admin API, the rest to the public routes."""

    def __init__(self, app: ASGIApp, admin: LazyAdmin) -> None:
        self.app = app
        self.admin = admin

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["path"].startswith(ADMIN_PREFIXES):
            app = await self.admin.app()
            await app(scope, receive, send)
            return
        await self.app(scope, receive, send)


def build_admin(runtime: Runtime) -> ASGIApp:
    """The admin API: FastAPI with relayd's routes, models and error answers."""
    from fastapi import FastAPI

    from relayd import __version__, api

    app = FastAPI(title="relayd", version=__version__, docs_url=None, redoc_url=None)
    api.install(app, runtime)
    return app


def create_app(runtime: Runtime, *, admin_token: str | None = None) -> Starlette:
    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        await runtime.start_listeners()  # on the sockets relayd.server bound before
        try:
            yield
        finally:
            await runtime.shutdown()  # a no-op: relayd.server drained before uvicorn stops

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

    async def healthz(request: Request) -> Response:
        return JSONResponse({"status": "ok"})

    async def readyz(request: Request) -> Response:
        phase = runtime.phase
        return JSONResponse({"status": phase}, status_code=200 if phase == "ready" else 503)

    async def get_metrics(request: Request) -> Response:
        auth = runtime.settings.auth
        authorize(request, token_required=auth.mode == "token" and auth.metrics == "token")
        return Response(scrape.render(), media_type="text/plain; version=0.0.4")

    async def ws_without_upgrade(request: Request) -> Response:
        # A WebSocket handshake never reaches the app: relayd.wsconn owns /ws.
        return JSONResponse(
            {"detail": "/ws is a WebSocket endpoint: connect with a WebSocket client"},
            status_code=426,
            headers={"Upgrade": "websocket", "Connection": "Upgrade"},
        )

    routes = [
        get_route("/healthz", healthz),
        get_route("/readyz", readyz),
        get_route("/metrics", get_metrics),
        get_route("/ws", ws_without_upgrade),
        *(get_route(path, endpoint) for path, endpoint in statuspage.endpoints(runtime)),
    ]
    admin = LazyAdmin(lambda: build_admin(runtime))
    app = Starlette(
        routes=routes,
        lifespan=lifespan,
        exception_handlers={HTTPException: http_error},
        middleware=[
            Middleware(AdminGate, token=admin_token),
            # Inside the gate: refused requests are not read at all.
            Middleware(
                BodyLimit, send_body=lambda: send_body_limit(runtime.settings.relay.max_message)
            ),
            Middleware(AdminDispatch, admin=admin),
        ],
    )
    app.state.authorize = authorize  # statuspage.visible_ports: same rules as /ws
    return app
