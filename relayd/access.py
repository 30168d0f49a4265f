"""Who may use ``[http]``: one check for ``/ws``, ``/metrics`` and ``/status.json``.

``Access.check`` applies relayd(8) ACCESS CONTROL in its order: the browser
``Origin``, then the token (in auth mode ``"token"``), then the requested
ports; every refusal is counted by reason and logged, rate-limited, without
the secret. The admin socket's file mode is its access control: requests on
it are never asked for a token or an Origin.

``Access`` also knows every live WebSocket subscription that a token opened,
so that removing the token closes them at once (1008 "token revoked") and a
token that expires closes them within a second (1008 "token expired").
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import time
from collections.abc import Callable, Collection, Iterable
from pathlib import Path
from typing import TYPE_CHECKING

from relayd.auth import Authenticator, AuthFailure, AuthFailureLog, Grant, extract_token
from relayd.auth import origin_allowed as _origin_allowed
from relayd.config import Settings
from relayd.errors import ConfigError
from relayd.hub import CLOSE_POLICY_VIOLATION
from relayd.parsing import ALL
from relayd.tokens import TokenStore

if TYPE_CHECKING:
    from relayd.hub import Subscription
    from relayd.jwtauth import JwtVerifier

logger = logging.getLogger(__name__)

EXPIRY_CHECK = 0.5  # seconds between looks for connections whose token expired

ADMIN = Grant(name="admin", read=ALL, write=ALL, kind="admin")
ANONYMOUS = Grant.anonymous()


def load_jwt(settings: Settings) -> JwtVerifier | None:
    """The JWT verifier of ``[auth] jwt_key_file``; ConfigError when the key is unusable."""
    auth = settings.auth
    if auth.jwt_key_file is None:
        return None
    from relayd.jwtauth import JwtVerifier  # PyJWT only when JWTs are configured

    try:
        return JwtVerifier.from_file(Path(auth.jwt_key_file), auth.jwt_audience)
    except ConfigError as exc:
        raise ConfigError([f"auth.jwt_key_file: {p}" for p in exc.problems]) from None


class Access:
    def __init__(
        self,
        settings: Callable[[], Settings],
        tokens: TokenStore,
        *,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._settings = settings
        self.tokens = tokens
        self.authenticator = Authenticator(tokens)
        self.failures = AuthFailureLog()
        self.admin_token: bytes | None = None  # admin.token_file: also good on /ws, /metrics
        self._clock = clock
        self._by_token: dict[str, set[Subscription]] = {}
        self._expiring: dict[Subscription, float] = {}

    def set_jwt(self, verifier: JwtVerifier | None) -> None:
        self.authenticator.jwt = verifier

    # The check

    def check(
        self,
        *,
        headers: Iterable[tuple[bytes, bytes]],
        query: bytes | str,
        scheme: str,
        admin: bool,
        peer: str,
        requested: Collection[int] = (),
        token_required: bool | None = None,
    ) -> Grant | AuthFailure:
        """The grant of a request on ``[http]`` (or the admin socket), or why it is refused.

        ``token_required``: None follows ``[auth] mode``; False for what needs no
        token (``/metrics`` with ``metrics = "public"``).
        """
        if admin:
            return ADMIN
        settings = self._settings()
        origins: list[bytes] = []
        host: bytes | None = None
        for name, value in headers:
            if name == b"origin":
                origins.append(value)
            elif name == b"host":
                host = value
        if origins:
            origin = origins[0].decode("latin-1") if len(origins) == 1 else "\0"  # two: refuse
            own_host = host.decode("latin-1") if host is not None else None
            if not _origin_allowed(origin, scheme, own_host, settings.http.allowed_origins):
                return self._refuse(AuthFailure("origin"), peer, "origin not allowed")
        if token_required is None:
            token_required = settings.auth.mode == "token"
        if not token_required:
            return ANONYMOUS
        presented = extract_token(headers, query)
        if isinstance(presented, AuthFailure):
            return self._refuse(presented, peer)
        if self.admin_token is not None and presented is not None:
            if hmac.compare_digest(presented.encode(), self.admin_token):
                return ADMIN
        grant = self.authenticator.verify(presented, self._clock())
        if isinstance(grant, AuthFailure):
            return self._refuse(grant, peer)
        forbidden = grant.forbidden(requested)
        if forbidden:
            ports = ",".join(map(str, forbidden[:8]))
            return self._refuse(
                AuthFailure("forbidden_port", grant.name), peer, f"may not read port {ports}"
            )
        return grant

    def _refuse(self, failure: AuthFailure, peer: str, detail: str = "") -> AuthFailure:
        self.failures.record(failure, peer, detail)
        return failure

    # Live connections of tokens

    def track(self, subscription: Subscription, grant: Grant) -> None:
        if grant.token_id is not None:
            self._by_token.setdefault(grant.token_id, set()).add(subscription)
        if grant.expires is not None:
            self._expiring[subscription] = grant.expires

    def untrack(self, subscription: Subscription, grant: Grant) -> None:
        if grant.token_id is not None:
            subs = self._by_token.get(grant.token_id)
            if subs is not None:
                subs.discard(subscription)
                if not subs:
                    del self._by_token[grant.token_id]
        self._expiring.pop(subscription, None)

    def revoke(self, token_id: str) -> int:
        """Close every connection the token opened (1008 "token revoked"); how many."""
        subs = self._by_token.pop(token_id, set())
        for sub in subs:
            self._expiring.pop(sub, None)
            sub.close(CLOSE_POLICY_VIOLATION, "token revoked")
        return len(subs)

    def expire(self) -> int:
        """Close connections whose token expired (1008 "token expired"); how many."""
        now = self._clock()
        due = [sub for sub, expires in self._expiring.items() if now >= expires]
        for sub in due:
            del self._expiring[sub]
            sub.close(CLOSE_POLICY_VIOLATION, "token expired")
        return len(due)

    async def run_expiry(self) -> None:
        while True:
            await asyncio.sleep(EXPIRY_CHECK)
            if self._expiring:
                self.expire()
