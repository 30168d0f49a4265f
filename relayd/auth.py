"""Access control on ``[http]``: who a request is and which ports it may use.

Everything here is pure (no sockets, no event loop), so the WebSocket endpoint,
``/metrics`` and the admin API share one set of rules (relayd.toml(5)
``[auth]``, relayd(8) "ACCESS CONTROL"):

- ``extract_token``: the token a request presents, as ``Authorization: Bearer``
  or ``?access_token=``; ambiguous or malformed presentations are refused.
- ``Authenticator``: a presented token -> ``Grant`` or ``AuthFailure``, through
  the token store (``relayd.tokens``) or, for JWTs, ``relayd.jwtauth``.
- ``origin_allowed``: the browser ``Origin`` rule; it never fails open.
- ``redact_query``: a query string fit for a log line.
- ``AuthFailureLog``: counts refusals by reason and logs them, rate-limited.

Refusals are checked in the order Origin, token, ports.
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Callable, Collection, Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Final, Literal, TypeAlias
from urllib.parse import unquote_plus

from relayd.parsing import ALL, NONE, Ports, union

if TYPE_CHECKING:
    from relayd.jwtauth import JwtVerifier
    from relayd.tokens import TokenStore

logger = logging.getLogger(__name__)

TOKEN_PREFIX: Final = "rlyd_"
MAX_TOKEN = 4096  # bytes of a presented token, and of an Authorization header
MAX_ORIGIN = 2048  # an origin is scheme://host:port; a hostname is at most 253

Reason: TypeAlias = Literal["missing", "invalid", "expired", "revoked", "forbidden_port", "origin"]
REASONS: Final[tuple[Reason, ...]] = (
    "missing",
    "invalid",
    "expired",
    "revoked",
    "forbidden_port",
    "origin",
)
Kind: TypeAlias = Literal["token", "jwt", "anonymous", "admin"]


@dataclass(frozen=True, slots=True)
class AuthFailure:
    """A refusal; ``name`` is the token's name (or JWT ``sub``) when known, for the log."""

    reason: Reason
    name: str | None = None

    @property
    def status(self) -> int:
        """The HTTP status of the refusal: 401 for the token, 403 for ports and Origin."""
        return 403 if self.reason in ("forbidden_port", "origin") else 401


@dataclass(frozen=True, slots=True)
class Grant:
    """What a request may do: read (subscribe) and write (downlink) per port.

    ``name`` is the token name or JWT ``sub`` (None: anonymous, or a JWT
    without ``sub``); ``expires`` is an epoch time, when the connection must
    be closed; ``token_id`` identifies an opaque token, so that removing it
    can close the connections that used it (None for JWTs and anonymous).
    """

    name: str | None
    read: Ports = NONE
    write: Ports = NONE
    expires: float | None = None
    token_id: str | None = None
    kind: Kind = "token"

    @classmethod
    def anonymous(cls) -> Grant:
        """Auth mode "none": anyone may read and (where downlink is on) write."""
        return cls(name=None, read=ALL, write=ALL, kind="anonymous")

    def can_write(self, port: int) -> bool:
        return self.write == ALL or port in self.write

    def can_read(self, port: int) -> bool:
        """Write permission on a port implies read permission on it."""
        return self.read == ALL or port in self.read or self.can_write(port)

    @property
    def all_readable(self) -> Ports:
        """Every port this grant may read (ALL includes ports added later)."""
        return union(self.read, self.write)

    def forbidden(self, requested: Iterable[int]) -> list[int]:
        """The requested ports this grant may not read, sorted (empty: all allowed)."""
        return sorted({p for p in requested if not self.can_read(p)})

    def readable(self, requested: Collection[int]) -> Ports | None:
        """The ports a subscription for ``requested`` gets, or None (403) if any is forbidden.

        No port requested means every port the grant may read.
        """
        if not requested:
            return self.all_readable
        if self.forbidden(requested):
            return None
        return frozenset(requested)

    def expired(self, now: float) -> bool:
        return self.expires is not None and now >= self.expires

    def who(self, peer: str) -> str:
        """The actor in log and audit lines: the name, ``admin``, or ``anonymous <peer>``."""
        if self.kind == "anonymous":
            return f"anonymous {peer}"
        if self.kind == "admin":
            return "admin"
        if self.name is None:
            return f"jwt without sub from {peer}"
        return self.name


class Authenticator:
    """A presented token -> Grant or AuthFailure: opaque ``rlyd_`` tokens, else JWTs."""

    def __init__(self, store: TokenStore, jwt: JwtVerifier | None = None) -> None:
        self.store = store
        self.jwt = jwt

    def verify(self, token: str | None, now: float | None = None) -> Grant | AuthFailure:
        if now is None:
            now = time.time()
        if token is None:
            return AuthFailure("missing")
        if token.startswith(TOKEN_PREFIX):
            return self.store.verify(token, now)
        if self.jwt is not None:
            return self.jwt.verify(token, now)
        return AuthFailure("invalid")


# --- presentation -------------------------------------------------------------------

# RFC 6750 b64token: what a bearer token may consist of. Ours are base64url
# after the prefix, JWTs are three base64url parts joined by dots.
_B64TOKEN = re.compile(r"[A-Za-z0-9\-._~+/]+=*")
_BEARER = re.compile(r"[Bb][Ee][Aa][Rr][Ee][Rr] +([^ ]+) *")


def _token_or_invalid(value: str) -> str | AuthFailure:
    if len(value) > MAX_TOKEN or _B64TOKEN.fullmatch(value) is None:
        return AuthFailure("invalid")
    return value


def extract_token(
    headers: Iterable[tuple[bytes, bytes]], query: bytes | str
) -> str | None | AuthFailure:
    """The token a request presents; None when it presents none.

    ``headers`` are the raw ASGI headers, ``query`` the raw query string:
    both raw, so a duplicated header or parameter is seen rather than merged.
    More than one ``Authorization`` header, one that is not a well-formed
    ``Bearer`` token, ``access_token`` given twice, or a header and a
    parameter that disagree: AuthFailure("invalid").
    """
    authorizations = [value for name, value in headers if name.lower() == b"authorization"]
    from_header: str | None = None
    if len(authorizations) > 1:
        return AuthFailure("invalid")
    if authorizations:
        raw = authorizations[0]
        if len(raw) > MAX_TOKEN:
            return AuthFailure("invalid")
        match = _BEARER.fullmatch(raw.decode("latin-1"))
        if match is None:
            return AuthFailure("invalid")
        checked = _token_or_invalid(match[1])
        if isinstance(checked, AuthFailure):
            return checked
        from_header = checked

    if isinstance(query, bytes):
        query = query.decode("latin-1")
    values = [value for key, value in _query_pairs(query) if key == "access_token"]
    from_query: str | None = None
    if len(values) > 1:
        return AuthFailure("invalid")
    if values:
        checked = _token_or_invalid(values[0])
        if isinstance(checked, AuthFailure):
            return checked
        from_query = checked

    if from_header is not None and from_query is not None and from_header != from_query:
        return AuthFailure("invalid")
    return from_header if from_header is not None else from_query


def _query_pairs(query: str) -> Iterable[tuple[str, str]]:
    """Decoded (key, value) pairs the way Starlette reads them (``&``-separated, ``+`` = space)."""
    for part in query.split("&"):
        if not part:
            continue
        key, _, value = part.partition("=")
        yield unquote_plus(key), unquote_plus(value)


def redact_query(query: bytes | str) -> str:
    """The query string with every ``access_token`` value replaced by ``***``, for logs.

    A value that looks like one of our tokens under another name goes too.
    """
    if isinstance(query, bytes):
        query = query.decode("latin-1")
    parts = []
    for part in query.split("&"):
        key, _, value = part.partition("=")
        if unquote_plus(key) == "access_token" or TOKEN_PREFIX in unquote_plus(value):
            part = f"{key}=***"
        parts.append(part)
    return "&".join(parts)


# --- Origin -------------------------------------------------------------------------

_DEFAULT_PORTS = {"http": 80, "https": 443, "ws": 80, "wss": 443}
_ORIGIN = re.compile(
    r"(?P<scheme>[a-z][a-z0-9+.\-]{0,31})://"
    r"(?P<host>[a-z0-9](?:[a-z0-9_\-.]{0,251}[a-z0-9])?|\[[0-9a-f:.]{2,45}\])"
    r"(?::(?P<port>[0-9]{1,5}))?"
)
_HOST = re.compile(
    r"(?P<host>[a-z0-9](?:[a-z0-9_\-.]{0,251}[a-z0-9])?|\[[0-9a-f:.]{2,45}\])"
    r"(?::(?P<port>[0-9]{1,5}))?"
)

Origin: TypeAlias = tuple[str, str, int | None]


def parse_origin(text: str) -> Origin | None:
    """``scheme://host[:port]`` -> (scheme, host, port with defaults filled in), or None.

    Case-insensitive in scheme and host; anything else (a path, userinfo, a
    query, ``null``, odd characters, an out-of-range port) is None.
    """
    if len(text) > MAX_ORIGIN:
        return None
    match = _ORIGIN.fullmatch(text.lower())
    if match is None:
        return None
    scheme = match["scheme"]
    port = _port(match["port"], scheme)
    if port == 0:
        return None
    return scheme, match["host"], port


def _port(text: str | None, scheme: str) -> int | None:
    """The port, the scheme's default when absent; 0 when out of range."""
    if text is None:
        return _DEFAULT_PORTS.get(scheme)
    port = int(text)
    return port if 1 <= port <= 65535 else 0


def origin_allowed(
    origin: str | None, request_scheme: str, request_host: str | None, allowed: Iterable[str]
) -> bool:
    """The browser Origin rule on ``/ws`` (relayd.toml(5) ``allowed_origins``).

    No ``Origin``: not a browser, allowed. Otherwise allowed when it is the
    request's own origin (``request_scheme`` as in the ASGI scope, ``ws``/``wss``
    or ``http``/``https``; ``request_host`` the ``Host`` header), when it is in
    ``allowed``, or when ``allowed`` holds ``"*"``. An Origin that cannot be
    parsed, ``null`` included, is refused even with ``"*"``: never fail open.
    """
    if origin is None:
        return True
    parsed = parse_origin(origin.strip())
    if parsed is None:
        return False
    if request_host is not None and len(request_host) <= MAX_ORIGIN:
        scheme = {"ws": "http", "wss": "https"}.get(request_scheme, request_scheme)
        own = _HOST.fullmatch(request_host.strip().lower())
        if own is not None and parsed == (scheme, own["host"], _port(own["port"], scheme)):
            return True
    for entry in allowed:
        if entry == "*" or parse_origin(entry) == parsed:
            return True
    return False


# --- failure log --------------------------------------------------------------------


@dataclass
class AuthFailureLog:
    """Counts refusals by reason; logs one line each, at most ``burst`` per ``window`` s.

    Past the burst, lines are suppressed and counted; the first line after the
    window says how many were. The secret is never logged: callers pass the
    token's name (known for expired and revoked tokens) and the peer.
    """

    burst: int = 20
    window: float = 10.0
    clock: Callable[[], float] = time.monotonic
    counts: dict[Reason, int] = field(default_factory=lambda: dict.fromkeys(REASONS, 0))
    _window_start: float = field(default=-1e18, init=False)
    _lines: int = field(default=0, init=False)
    _suppressed: int = field(default=0, init=False)

    def record(self, failure: AuthFailure | Reason, peer: str, detail: str = "") -> None:
        if isinstance(failure, str):
            failure = AuthFailure(failure)
        self.counts[failure.reason] += 1
        self.flush()
        if self._lines >= self.burst:
            self._suppressed += 1
            return
        self._lines += 1
        name = f" token {failure.name}" if failure.name is not None else ""
        logger.warning(
            "auth: refused %s: %s%s%s",
            peer,
            failure.reason,
            name,
            f" ({detail})" if detail else "",
        )

    def flush(self) -> None:
        """Start a new window if the last one is over, saying how many lines it suppressed."""
        now = self.clock()
        if now - self._window_start < self.window:
            return
        if self._suppressed:
            logger.warning(
                "auth: %d refusal(s) not logged (more than %d in %.0fs)",
                self._suppressed,
                self.burst,
                self.window,
            )
        self._window_start, self._lines, self._suppressed = now, 0, 0
