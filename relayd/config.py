"""Static configuration: the TOML file plus command-line overrides, validated once."""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Annotated, Any, Literal, Self

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from relayd.errors import ConfigError

DEFAULT_CONFIG = Path("/etc/relayd/relayd.toml")

PortNumber = Annotated[int, Field(ge=1, le=65535)]
Host = Annotated[str, Field(min_length=1, max_length=255)]


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)


class HttpSettings(_Model):
    host: Host = "0.0.0.0"
    port: PortNumber = 8000


class AdminSettings(_Model):
    socket: Annotated[str, Field(min_length=1)] = "/run/relayd/admin.sock"
    token_file: str | None = None


class RelaySettings(_Model):
    queue_size: Annotated[int, Field(ge=1, le=1_000_000)] = 1024
    slow_client: Literal["drop", "disconnect"] = "drop"
    max_message: Annotated[int, Field(ge=1, le=16 * 1024 * 1024)] = 65536
    max_clients: Annotated[int, Field(ge=1, le=1_000_000)] = 1000
    ping_interval: Annotated[float, Field(ge=0, le=86400)] = 20.0
    ping_timeout: Annotated[float, Field(gt=0, le=86400)] = 20.0
    per_message_deflate: bool = False


class DrainSettings(_Model):
    timeout: Annotated[float, Field(ge=0, le=3600)] = 5.0


class PortSettings(_Model):
    port: PortNumber
    host: Host = "0.0.0.0"
    name: Annotated[str, Field(max_length=128)] | None = None
    framing: Literal["lines", "raw"] = "lines"
    max_connections: Annotated[int, Field(ge=1, le=1_000_000)] = 64
    keepalive: bool = True
    idle_timeout: Annotated[float, Field(ge=0, le=86400 * 365)] = 0.0


class Settings(_Model):
    http: HttpSettings = HttpSettings()
    admin: AdminSettings = AdminSettings()
    relay: RelaySettings = RelaySettings()
    drain: DrainSettings = DrainSettings()
    ports: list[PortSettings] = []

    @model_validator(mode="after")
    def _unique_ports(self) -> Self:
        seen: set[int] = set()
        for index, port in enumerate(self.ports):
            if port.port in seen:
                raise ValueError(f"ports[{index}].port: duplicate port {port.port}")
            seen.add(port.port)
        return self

    @classmethod
    def load(
        cls,
        path: Path | None,
        *,
        http: str | None = None,
        admin_socket: str | None = None,
        extra_ports: tuple[int, ...] = (),
    ) -> Settings:
        """Read ``path`` (None: defaults only), apply command-line overrides, validate.

        Raises ConfigError with one line per problem, each naming the key.
        """
        data = _read_toml(path) if path is not None else {}
        problems: list[str] = []
        if http is not None:
            try:
                host, port = parse_host_port(http)
            except ValueError as exc:
                problems.append(f"--http: {exc}")
            else:
                data["http"] = {**_table(data.get("http")), "host": host, "port": port}
        if admin_socket is not None:
            data["admin"] = {**_table(data.get("admin")), "socket": admin_socket}
        if extra_ports:
            ports = data.get("ports", [])
            if isinstance(ports, list):
                configured = {p.get("port") for p in ports if isinstance(p, dict)}
                for port in extra_ports:
                    if port in configured:
                        problems.append(f"--port {port}: port {port} is already configured")
                    else:
                        configured.add(port)
                        ports = [*ports, {"port": port}]
                data["ports"] = ports
        try:
            settings = cls.model_validate(data)
        except ValidationError as exc:
            problems.extend(format_validation_error(exc))
            raise ConfigError(problems) from None
        if problems:
            raise ConfigError(problems)
        return settings


def _table(value: object) -> dict[str, Any]:
    return dict(value) if isinstance(value, dict) else {}


def _read_toml(path: Path) -> dict[str, Any]:
    try:
        with path.open("rb") as f:
            return tomllib.load(f)
    except OSError as exc:
        raise ConfigError([f"{path}: cannot read: {exc.strerror or exc}"]) from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError([f"{path}: invalid TOML: {exc}"]) from None
    except UnicodeDecodeError as exc:
        raise ConfigError([f"{path}: invalid TOML: not UTF-8 ({exc.reason})"]) from None


def parse_host_port(value: str) -> tuple[str, int]:
    """Parse ``HOST:PORT`` or ``[V6]:PORT``."""
    host, sep, port_text = value.rpartition(":")
    if not sep or not host or not port_text.isdigit():
        raise ValueError(f"expected HOST:PORT, got {value!r}")
    port = int(port_text)
    if not 1 <= port <= 65535:
        raise ValueError(f"port {port} is outside 1..65535")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    return host, port


def format_loc(loc: tuple[int | str, ...]) -> str:
    text = ""
    for part in loc:
        if isinstance(part, int):
            text += f"[{part}]"
        else:
            text += f".{part}" if text else part
    return text


def format_validation_error(exc: ValidationError) -> list[str]:
    lines = []
    for error in exc.errors():
        key = format_loc(tuple(error["loc"]))
        if error["type"] == "extra_forbidden":
            lines.append(f"{key}: unknown key")
        elif error["type"] == "value_error":
            # Our own validators put the key into the message already.
            lines.append(str(error["ctx"]["error"]) if "ctx" in error else error["msg"])
        else:
            msg = error["msg"]
            lines.append(f"{key}: {msg}" if key else msg)
    return lines
