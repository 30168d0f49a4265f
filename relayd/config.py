"""Static configuration: the TOML file plus command-line overrides, validated once."""

from __future__ import annotations

import ipaddress
import string
import tomllib
from pathlib import Path
from typing import Annotated, Any, Literal, Self
from urllib.parse import urlsplit

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    model_validator,
)

from relayd.errors import ConfigError

DEFAULT_CONFIG = Path("/etc/relayd/relayd.toml")

PortNumber = Annotated[int, Field(ge=1, le=65535)]
Host = Annotated[str, Field(min_length=1, max_length=255)]
FilePath = Annotated[str, Field(min_length=1, max_length=4096)]


def _network(value: str) -> str:
    """A source network for ``allow``: an address or CIDR, IPv4 or IPv6, normalized."""
    try:
        return str(ipaddress.ip_network(value, strict=False))
    except ValueError:
        raise ValueError(f"{value!r} is not an IP network (e.g. 192.0.2.0/24)") from None


def _origin(value: str) -> str:
    """A browser origin for ``allowed_origins``: ``scheme://host[:port]``, or ``*``."""
    if value == "*":
        return value
    parts = urlsplit(value)
    if (
        parts.scheme not in ("http", "https")
        or not parts.hostname
        or parts.path not in ("", "/")
        or parts.query
        or parts.fragment
        or parts.username
    ):
        raise ValueError(f"{value!r} is not an origin (e.g. https://dash.example:8443)")
    try:
        port = parts.port
    except ValueError:
        raise ValueError(f"{value!r} has an invalid port") from None
    host = parts.hostname.lower()
    if ":" in host:
        host = f"[{host}]"
    return f"{parts.scheme}://{host}" + (f":{port}" if port is not None else "")


def _host_port(value: str) -> str:
    """``connect``: ``HOST:PORT`` or ``[V6]:PORT``."""
    parse_host_port(value)
    return value


Network = Annotated[str, Field(max_length=64), AfterValidator(_network)]
Origin = Annotated[str, Field(max_length=512), AfterValidator(_origin)]


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)


class HttpSettings(_Model):
    host: Host = "0.0.0.0"
    port: PortNumber = 8000
    allowed_origins: Annotated[list[Origin], Field(max_length=256)] = []
    handshake_timeout: Annotated[float, Field(gt=0, le=3600)] = 10.0
    tls_cert: FilePath | None = None
    tls_key: FilePath | None = None
    tls_client_ca: FilePath | None = None

    @model_validator(mode="after")
    def _tls_pair(self) -> Self:
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError("tls_cert and tls_key go together")
        if self.tls_client_ca is not None and self.tls_cert is None:
            raise ValueError("tls_client_ca needs tls_cert and tls_key")
        return self

    @property
    def tls(self) -> bool:
        return self.tls_cert is not None


class AuthSettings(_Model):
    mode: Literal["token", "none"] = "none"
    metrics: Literal["token", "public"] = "token"
    jwt_key_file: FilePath | None = None
    jwt_audience: Annotated[str, Field(min_length=1, max_length=256)] | None = None


class DefaultsSettings(_Model):
    host: Host = "0.0.0.0"


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
    history: Annotated[int, Field(ge=0, le=1_000_000)] = 1000
    history_max_bytes: Annotated[int, Field(ge=0, le=1 << 30)] = 1 << 20


class DrainSettings(_Model):
    timeout: Annotated[float, Field(ge=0, le=3600)] = 5.0


SERIAL_KEYS = ("baudrate", "bytesize", "parity", "stopbits")


class PortSettings(_Model):
    port: PortNumber
    host: Host = "0.0.0.0"  # [defaults] host where the file names none (Settings)
    name: Annotated[str, Field(max_length=128)] | None = None
    framing: Literal["lines", "raw", "delimiter", "length", "fixed"] = "lines"
    delimiter: Annotated[str, Field(min_length=1, max_length=64)] | None = None
    length_prefix: Literal["u8", "u16be", "u16le", "u32be", "u32le"] | None = None
    size: Annotated[int, Field(ge=1, le=16 * 1024 * 1024)] | None = None
    max_connections: Annotated[int, Field(ge=1, le=1_000_000)] = 64
    keepalive: bool = True
    idle_timeout: Annotated[float, Field(ge=0, le=86400 * 365)] = 0.0
    allow: Annotated[list[Network], Field(max_length=1024)] = []
    tls: bool = False
    tls_cert: FilePath | None = None
    tls_key: FilePath | None = None
    client_ca: FilePath | None = None
    downlink: bool = False
    downlink_buffer: Annotated[int, Field(ge=1, le=64 * 1024 * 1024)] = 65536
    # A source that is not a listener (relayd.toml(5), SOURCES): relayd dials
    # ``connect``, or reads the serial line ``serial`` with the settings after it.
    connect: Annotated[str, Field(max_length=300), AfterValidator(_host_port)] | None = None
    serial: FilePath | None = None
    # The line settings; unset is 9600 baud, 8 data bits, no parity, 1 stop bit.
    baudrate: Annotated[int, Field(ge=50, le=4_000_000)] | None = None
    bytesize: Literal[5, 6, 7, 8] | None = None
    parity: Literal["none", "even", "odd"] | None = None
    stopbits: Literal[1, 2] | None = None

    @property
    def source_kind(self) -> Literal["listen", "connect", "serial"]:
        if self.connect is not None:
            return "connect"
        if self.serial is not None:
            return "serial"
        return "listen"

    @model_validator(mode="after")
    def _source_keys(self) -> Self:
        if self.connect is not None and self.serial is not None:
            raise ValueError("connect and serial exclude each other: a port is one source")
        if self.serial is None:
            for key in SERIAL_KEYS:
                if getattr(self, key) is not None:
                    raise ValueError(f"{key} needs serial (a serial line's setting)")
        if self.source_kind != "listen":
            key = self.source_kind
            if self.host not in ("0.0.0.0", None):  # None: PortIn (the admin API) left it out
                raise ValueError(f"host is for listeners: a {key} source has none")
            if self.allow:
                raise ValueError(f"allow is for listeners: a {key} source has none")
            if self.tls:
                raise ValueError(f"tls is for listeners: a {key} source has none")
        return self

    @model_validator(mode="after")
    def _tls_files(self) -> Self:
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError("tls_cert and tls_key go together")
        if not self.tls and (self.tls_cert or self.client_ca):
            raise ValueError("tls_cert, tls_key and client_ca need tls = true")
        return self

    @model_validator(mode="after")
    def _framing_keys(self) -> Self:
        """Each framing's own key is required with it and refused without it."""
        own = {"delimiter": "delimiter", "length": "length_prefix", "fixed": "size"}
        for framing, key in own.items():
            given = getattr(self, key) is not None
            if self.framing == framing and not given:
                raise ValueError(f'{key} is required with framing = "{framing}"')
            if self.framing != framing and given:
                raise ValueError(f'{key} needs framing = "{framing}"')
        if self.delimiter is not None and max(map(ord, self.delimiter)) > 0xFF:
            raise ValueError(
                'delimiter: each character is one byte, \\u0000 to \\u00ff (e.g. "\\u0003")'
            )
        return self

    @property
    def delimiter_bytes(self) -> bytes | None:
        """``delimiter`` as bytes: each character U+0000..U+00FF is the byte of that value."""
        return None if self.delimiter is None else self.delimiter.encode("latin-1")


MQTT_SCHEMES = {"mqtt": 1883, "mqtts": 8883}
TOPIC_FIELDS = frozenset({"hostname", "port", "name"})
CLIENT_ID_FIELDS = frozenset({"hostname"})


def _placeholders(value: str, allowed: frozenset[str]) -> str:
    """A template with ``{placeholder}`` fields: each must be one of ``allowed``."""
    names = ", ".join(f"{{{n}}}" for n in sorted(allowed))
    try:
        fields = [
            (name, spec, conv)
            for _, name, spec, conv in string.Formatter().parse(value)
            if name is not None
        ]
    except ValueError as exc:
        raise ValueError(f"{value!r}: {exc} (write {{{{ and }}}} for a literal brace)") from None
    for name, spec, conv in fields:
        if name not in allowed:
            raise ValueError(f"unknown placeholder {{{name[:32]}}}; known: {names}")
        if spec or conv:  # {port:>5}, {hostname!r}: a placeholder is its name alone
            raise ValueError(f"{{{name}}} takes no format or conversion; known: {names}")
    return value


def _topic(value: str) -> str:
    if "+" in value or "#" in value or "\0" in value:
        raise ValueError("a topic to publish to has no wildcards (+, #)")
    return _placeholders(value, TOPIC_FIELDS)


def _mqtt_url(value: str) -> str:
    parts = urlsplit(value)
    if parts.scheme not in MQTT_SCHEMES:
        raise ValueError(f"{value!r}: the scheme is mqtt:// or mqtts://")
    try:
        parts.port  # noqa: B018 (validates it)
    except ValueError:
        raise ValueError(f"{value!r} has an invalid port") from None
    if not parts.hostname or parts.path not in ("", "/") or parts.query or parts.username:
        raise ValueError(f"{value!r} is not a broker URL (e.g. mqtts://broker.example.net:8883)")
    return value


Template = Annotated[str, Field(min_length=1, max_length=1024)]


class MqttSettings(_Model):
    """``[mqtt]``: the uplink to an MQTT broker (relayd.toml(5), [mqtt])."""

    url: Annotated[str, Field(max_length=1024), AfterValidator(_mqtt_url)] | None = None
    client_id: Annotated[
        str,
        Field(min_length=1, max_length=128),
        AfterValidator(lambda v: _placeholders(v, CLIENT_ID_FIELDS)),
    ] = "relayd-{hostname}"
    username: Annotated[str, Field(min_length=1, max_length=1024)] | None = None
    password_file: FilePath | None = None
    ca_file: FilePath | None = None
    cert_file: FilePath | None = None
    key_file: FilePath | None = None
    topic: Annotated[Template, AfterValidator(_topic)] = "relayd/{hostname}/{port}"
    payload: Literal["raw", "json"] = "raw"
    qos: Literal[0, 1] = 1
    retain: bool = False
    spool_max_bytes: Annotated[int, Field(ge=65536, le=1 << 44)] = 256 * 1024 * 1024
    downlink_topic: Annotated[Template, AfterValidator(_topic)] | None = None

    @model_validator(mode="after")
    def _files(self) -> Self:
        if self.cert_file is not None and self.key_file is None:
            raise ValueError("cert_file needs key_file (the client certificate's key)")
        if self.key_file is not None and self.cert_file is None:
            raise ValueError("key_file needs cert_file")
        if self.password_file is not None and self.username is None:
            raise ValueError("password_file needs username")
        return self

    @property
    def enabled(self) -> bool:
        return self.url is not None

    @property
    def address(self) -> tuple[str, int, bool]:
        """The broker's host, port and whether it is TLS (``mqtts``)."""
        assert self.url is not None
        parts = urlsplit(self.url)
        assert parts.hostname is not None
        return parts.hostname, parts.port or MQTT_SCHEMES[parts.scheme], parts.scheme == "mqtts"


_NO_HOST = {"host", "connect", "serial"}  # entries that take no [defaults] host


class Settings(_Model):
    http: HttpSettings = HttpSettings()
    admin: AdminSettings = AdminSettings()
    auth: AuthSettings = AuthSettings()
    defaults: DefaultsSettings = DefaultsSettings()
    relay: RelaySettings = RelaySettings()
    drain: DrainSettings = DrainSettings()
    mqtt: MqttSettings = MqttSettings()
    ports: list[PortSettings] = []

    @model_validator(mode="before")
    @classmethod
    def _default_host(cls, data: Any) -> Any:
        """``[[ports]]`` entries without ``host`` take ``[defaults] host``."""
        if not isinstance(data, dict):
            return data
        defaults = data.get("defaults")
        host = defaults.get("host") if isinstance(defaults, dict) else None
        ports = data.get("ports")
        if isinstance(host, str) and isinstance(ports, list):
            data = {
                **data,
                "ports": [
                    {"host": host, **p} if isinstance(p, dict) and not p.keys() & _NO_HOST else p
                    for p in ports
                ],
            }
        return data

    @model_validator(mode="after")
    def _tls_defaults(self) -> Self:
        for port in self.ports:
            if port.tls and port.tls_cert is None and not self.http.tls:
                raise ValueError(
                    f"port {port.port}: tls = true needs tls_cert and tls_key, "
                    "on the port or in [http]"
                )
        return self

    @model_validator(mode="after")
    def _frame_sizes(self) -> Self:
        for index, port in enumerate(self.ports):
            check_frame_size(port, self.relay.max_message, f"ports[{index}].size")
        return self

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


def check_frame_size(port: PortSettings, max_message: int, key: str = "size") -> None:
    """A ``fixed`` frame must fit in one message: ``size`` up to ``relay.max_message``."""
    if port.size is not None and port.size > max_message:
        raise ValueError(f"{key}: {port.size} is over relay.max_message ({max_message})")


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
            # Our own validators' messages, after the key they are about (a validator
            # of the whole file names the key in its message itself).
            msg = str(error["ctx"]["error"]) if "ctx" in error else error["msg"]
            lines.append(f"{key}: {msg}" if key and not msg.startswith(key) else msg)
        else:
            msg = error["msg"]
            lines.append(f"{key}: {msg}" if key else msg)
    return lines
