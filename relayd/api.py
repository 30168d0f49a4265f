"""The admin API (``/v1``): status, ports added and removed at runtime, reload.

The port models derive from the config model (``PortSettings``): a port added
at runtime takes exactly the keys and defaults of a ``[[ports]]`` entry, and a
port object is those settings plus its state and counters (relayd(8), ADMIN API).
"""

from __future__ import annotations

import base64
import binascii
import logging
from typing import Annotated, Any, Literal

from fastapi import APIRouter, FastAPI, HTTPException, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field

from relayd import __version__
from relayd.access import ADMIN
from relayd.config import Host, PortNumber, PortSettings, format_loc
from relayd.downlink import Refusal
from relayd.errors import (
    BindError,
    ConfigError,
    ListenerExists,
    ListenerNotFound,
    RelaydError,
    Stopping,
    TokenExists,
    TokenNotFound,
)
from relayd.listeners import PortSource
from relayd.parsing import ALL, MAX_DURATION, ports_from_json
from relayd.runtime import Runtime

logger = logging.getLogger(__name__)

MAX_BODY = 64 * 1024  # bytes: admin requests are small JSON objects


def send_body_limit(max_message: int) -> int:
    """The largest ``/send`` body: ``max_message`` bytes in base64, a peer and the keys."""
    return 4 * -(-max_message // 3) + 1024


class ErrorOut(BaseModel):
    detail: str = Field(examples=["port 8004: address already in use"])


class MqttOut(BaseModel):
    state: Literal["off", "connecting", "connected"]
    spooled: int = Field(
        description="messages not yet acknowledged by (QoS 1) or handed to the broker"
    )


class StatusOut(BaseModel):
    version: str = Field(examples=[__version__])
    pid: int
    uptime_s: float
    state: Literal["starting", "ready", "draining"]
    drain_timeout: float
    http: str = Field(examples=["0.0.0.0:8000"])
    ports: int
    tcp_connections: int
    ws_clients: int
    mqtt: MqttOut


class PortIn(PortSettings):
    """A port to open now: the keys of a ``[[ports]]`` entry, with the same defaults."""

    host: Host | None = None  # type: ignore[assignment]  # None: [defaults] host


class PortOut(PortSettings):
    """A port's settings, its state and its counters."""

    kind: Literal["listen", "connect", "serial"]
    state: Literal["listening", "connected", "connecting", "draining"]
    last_error: str | None = Field(
        None, description="while connecting: why the last attempt failed", examples=[None]
    )
    source: Literal["config", "runtime"]
    connections: int
    messages_received: int
    bytes_received: int


PortList = list[PortNumber] | Literal["*"]


class TokenIn(BaseModel):
    """A token to create; it is shown once, in the answer (relayd(8), ACCESS CONTROL)."""

    model_config = ConfigDict(extra="forbid", strict=True)

    name: Annotated[str, Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9._-]+$")]
    read: PortList = ALL
    write: PortList = []
    expires_in: Annotated[float, Field(gt=0, le=MAX_DURATION)] | None = None


class TokenOut(BaseModel):
    name: str
    read: list[int] | Literal["*"]
    write: list[int] | Literal["*"]
    created: str = Field(examples=["2026-12-02T10:00:00Z"])
    expires: str | None
    last_used: str | None


class NewTokenOut(TokenOut):
    token: str = Field(examples=["rlyd_..."], description="the secret: shown this once")


class SendIn(BaseModel):
    """Data for a port's devices: text, or bytes in base64; one device with ``peer``."""

    model_config = ConfigDict(extra="forbid", strict=True)

    data: str | None = None
    data_b64: str | None = None
    peer: Annotated[str, Field(max_length=256)] | None = None


class SendOut(BaseModel):
    delivered: int


class FailedPort(BaseModel):
    port: int
    detail: str


class ReloadOut(BaseModel):
    added: list[int]
    removed: list[int]
    changed: list[int]
    failed: list[FailedPort]


def port_out(listener: PortSource) -> PortOut:
    return PortOut.model_validate(listener.snapshot())


def _invalid(detail: str) -> HTTPException:
    return HTTPException(422, f"invalid request: {detail}")


def _error(status: int, detail: str) -> JSONResponse:
    return JSONResponse({"detail": detail}, status_code=status)


def one_sentence(errors: list[Any]) -> str:
    """FastAPI's list of validation errors as the single sentence of ``detail``."""
    parts = []
    for error in errors:
        loc = [p for p in error.get("loc", ()) if p not in ("body", "path", "query")]
        key = format_loc(tuple(loc))
        msg = error.get("msg", "invalid")
        if error.get("type") == "extra_forbidden":
            msg = "unknown field"
        elif error.get("type") == "value_error" and "ctx" in error:
            msg = str(error["ctx"].get("error", msg))  # our validators' own sentence
        elif error.get("type") == "json_invalid":
            msg = "the body is not valid JSON"
        elif error.get("type") == "missing" and not key:
            msg = "a JSON body is required"
        parts.append(f"{key}: {msg}" if key else msg)
    return "invalid request: " + "; ".join(parts or ["invalid request"])


ERRORS: dict[int | str, dict[str, Any]] = {
    404: {"model": ErrorOut, "description": "No such port or token"},
    409: {"model": ErrorOut, "description": "Already a listener or a token, or the bind failed"},
    413: {"model": ErrorOut, "description": f"The body is larger than {MAX_BODY} bytes"},
    415: {"model": ErrorOut, "description": "The body is not JSON"},
    422: {"model": ErrorOut, "description": "Invalid body or port"},
    500: {"model": ErrorOut, "description": "The state file could not be written"},
    503: {"model": ErrorOut, "description": "relayd is stopping"},
}


def create_router(runtime: Runtime) -> APIRouter:
    router = APIRouter(prefix="/v1", tags=["admin"])

    @router.get("/status", response_model=StatusOut)
    async def get_status() -> dict[str, object]:
        return runtime.status()

    @router.get("/ports", response_model=list[PortOut])
    async def list_ports() -> list[PortOut]:
        return [port_out(listener) for listener in runtime.registry.listeners()]

    @router.get("/ports/{port}", response_model=PortOut, responses={404: ERRORS[404]})
    async def get_port(port: PortNumber) -> PortOut:
        return port_out(runtime.registry.get(port))

    @router.post(
        "/ports",
        response_model=PortOut,
        status_code=201,
        responses={k: ERRORS[k] for k in (409, 413, 415, 422, 500, 503)},
    )
    async def add_port(body: PortIn) -> PortOut:
        host = body.host or (
            runtime.settings.defaults.host if body.source_kind == "listen" else "0.0.0.0"
        )
        settings = PortSettings.model_validate({**body.model_dump(), "host": host})
        listener = await runtime.add_port(settings)
        return port_out(listener)

    @router.delete(
        "/ports/{port}",
        response_model=PortOut,
        responses={k: ERRORS[k] for k in (404, 500, 503)},
    )
    async def remove_port(
        port: PortNumber,
        force: Annotated[bool, Query(description="close connections without a drain")] = False,
    ) -> PortOut:
        listener = await runtime.remove_port(port, force=force)
        return port_out(listener)

    @router.post(
        "/ports/{port}/send",
        response_model=SendOut,
        responses={k: ERRORS[k] for k in (404, 409, 413, 415, 422)},
    )
    async def send(port: PortNumber, body: SendIn) -> SendOut:
        if (body.data is None) == (body.data_b64 is None):
            raise _invalid('give exactly one of "data" and "data_b64"')
        if body.data is not None:
            # as /ws does (relayd.downlink.parse_command): a lone surrogate that JSON
            # can spell ("\ud800") is passed through, not a 500
            data = body.data.encode("utf-8", "surrogatepass")
        else:
            try:
                data = base64.b64decode(body.data_b64 or "", validate=True)
            except (binascii.Error, ValueError):
                raise _invalid('"data_b64" is not valid base64') from None
        if port not in runtime.registry:
            raise ListenerNotFound(port)
        result = runtime.downlink.send(ADMIN, "admin", port, data, peer=body.peer)
        if isinstance(result, Refusal):
            status = 422 if result.reason in ("too_large", "invalid") else 409
            raise HTTPException(status, f"port {port}: {result.sentence}")
        return SendOut(delivered=result)

    @router.get("/tokens", response_model=list[TokenOut])
    async def list_tokens() -> list[dict[str, Any]]:
        return [record.api() for record in runtime.tokens.list()]

    @router.post(
        "/tokens",
        response_model=NewTokenOut,
        status_code=201,
        responses={k: ERRORS[k] for k in (409, 413, 415, 422, 500)},
    )
    async def add_token(body: TokenIn) -> dict[str, Any]:
        record, secret = runtime.add_token(
            body.name, ports_from_json(body.read), ports_from_json(body.write), body.expires_in
        )
        return {**record.api(), "token": secret}

    @router.delete("/tokens/{name}", response_model=TokenOut, responses={404: ERRORS[404]})
    async def remove_token(name: str) -> dict[str, Any]:
        return runtime.remove_token(name).api()

    @router.post("/reload", response_model=ReloadOut, responses={k: ERRORS[k] for k in (422, 503)})
    async def reload() -> ReloadOut:
        report = await runtime.reload()
        return ReloadOut.model_validate(report, from_attributes=True)

    return router


def install(app: FastAPI, runtime: Runtime) -> None:
    """Mount the admin routes and map relayd's errors to HTTP answers."""
    app.include_router(create_router(runtime))

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        return _error(422, one_sentence(list(exc.errors())))

    @app.exception_handler(RelaydError)
    async def relayd_error(request: Request, exc: RelaydError) -> JSONResponse:
        if isinstance(exc, ListenerNotFound | TokenNotFound):
            return _error(404, str(exc))
        if isinstance(exc, ListenerExists | BindError | TokenExists):
            return _error(409, str(exc))
        if isinstance(exc, ConfigError):
            return _error(422, "the configuration is invalid: " + "; ".join(exc.problems))
        if isinstance(exc, Stopping):
            return _error(503, str(exc))
        return _error(500, str(exc))  # StateError: the state file could not be written

    @app.exception_handler(OSError)
    async def os_error(request: Request, exc: OSError) -> JSONResponse:
        # An OS error that no code path turned into a RelaydError: still one sentence
        # in JSON, and one log line without a traceback (relayd(8), ADMIN API).
        reason = (exc.strerror or str(exc)).lower()
        logger.error("admin %s %s failed: %s", request.method, request.url.path, reason)
        return _error(500, f"the request failed: {reason}")
