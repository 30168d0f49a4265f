"""The status page (relayd(8), HTTP INTERFACE): ``GET /``, ``/static/*``, ``GET /status.json``.

The page is three files shipped inside the package (``relayd/static``) and read
once through ``importlib.resources``. It polls ``/status.json`` for counters
and computes rates in the browser from their deltas, and tails messages from
``/ws?format=json`` like any other client: nothing here touches the
per-message path.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from importlib.resources import files

from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from relayd.parsing import ALL
from relayd.runtime import Runtime

STATIC_FILES = {
    "index.html": "text/html; charset=utf-8",
    "status.js": "text/javascript; charset=utf-8",
    "status.css": "text/css; charset=utf-8",
}

# Script and styles only from the page's own origin (no inline script, no inline
# style attributes); data only from its own origin and WebSockets.
CONTENT_SECURITY_POLICY = "; ".join(
    (
        "default-src 'self'",
        "script-src 'self'",
        "style-src 'self'",
        "img-src 'self' data:",
        "connect-src 'self' ws: wss:",
        "object-src 'none'",
        "base-uri 'none'",
        "form-action 'none'",
        "frame-ancestors 'none'",
    )
)

SECURITY_HEADERS = {
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
}

PAGE_HEADERS = {
    **SECURITY_HEADERS,
    "Content-Security-Policy": CONTENT_SECURITY_POLICY,
    "X-Frame-Options": "DENY",
    "Cache-Control": "no-cache",
}


def visible_ports(request: Request) -> set[int] | None:
    """The ports this request may see: None for all of them.

    The same rules as ``/ws`` (relayd(8), ACCESS CONTROL): a missing, invalid,
    expired or revoked token is ``HTTPException(401)`` (the page then asks for a
    token), a refused Origin 403; else the ports the token may read.
    """
    grant = request.app.state.authorize(request)
    readable = grant.all_readable
    return None if readable == ALL else set(readable)


def load_static() -> dict[str, bytes]:
    static = files("relayd") / "static"
    return {name: (static / name).read_bytes() for name in STATIC_FILES}


Endpoint = Callable[[Request], Awaitable[Response]]


def endpoints(runtime: Runtime) -> list[tuple[str, Endpoint]]:
    """The page's GET routes: (path, endpoint)."""
    content = load_static()

    def static_response(name: str) -> Response:
        return Response(content[name], media_type=STATIC_FILES[name], headers=PAGE_HEADERS)

    async def index(request: Request) -> Response:
        return static_response("index.html")

    async def static(request: Request) -> Response:
        name = request.path_params["name"]
        if name not in content:
            raise HTTPException(404)
        return static_response(name)

    async def status_json(request: Request) -> Response:
        visible = visible_ports(request)
        status = runtime.status()
        ports = []
        for listener in runtime.registry.listeners():
            if visible is not None and listener.port not in visible:
                continue
            snap = listener.snapshot()
            ports.append(
                {
                    "port": snap["port"],
                    "name": snap["name"],
                    "kind": snap.get("kind", "listen"),
                    "state": snap["state"],
                    "connections": snap["connections"],
                    "messages_received": snap["messages_received"],
                    "bytes_received": snap["bytes_received"],
                }
            )
        body = {
            "version": status["version"],
            "uptime_s": status["uptime_s"],
            "state": status["state"],
            "ws_clients": status["ws_clients"],
            "ports": ports,
        }
        return JSONResponse(body, headers={**SECURITY_HEADERS, "Cache-Control": "no-store"})

    return [("/", index), ("/static/{name}", static), ("/status.json", status_json)]
