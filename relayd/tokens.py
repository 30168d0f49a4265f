"""Opaque access tokens: ``<state-dir>/tokens.json`` (relayd(8) "ACCESS CONTROL").

A token is ``rlyd_`` plus 256 random bits (base64url), shown once when it is
created. The file holds only its SHA-256 digest. A plain, unsalted hash is the
right tool here, unlike for passwords: the input is a high-entropy random value,
so there is no dictionary to precompute and nothing for a slow hash to slow
down; a stolen file gives no token. Lookup is a dict lookup by digest: its
timing can tell an attacker at most a digest prefix, which is of no use without
a preimage.

The file (mode 0600, replaced atomically like ``ports.json``)::

    {"version": 1, "tokens": [{"name": "dash", "sha256": "<hex>", "read": "*",
      "write": [8001], "created": "2025-05-01T12:00:00Z", "expires": null,
      "last_used": null}]}

Failing closed, by case:

- corrupt (not JSON, wrong shape): moved aside to ``tokens.json.corrupt-<time>``
  and logged; none of its tokens is valid. The store starts empty, so the
  operator recovers by adding tokens again; the old file is kept for
  inspection and is never overwritten.
- written by a newer relayd (a higher ``version``), unreadable, or corrupt
  but impossible to move aside: left where it is and logged; no token is
  valid, and adding or removing tokens is refused (``StateError``) until the
  operator fixes the file and restarts, since a write would destroy it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import secrets
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from relayd.atomicfile import remove_leftovers, write_atomic
from relayd.auth import MAX_TOKEN, TOKEN_PREFIX, AuthFailure, Grant
from relayd.errors import StateError, TokenExists, TokenNotFound
from relayd.parsing import (
    ALL,
    MAX_DURATION,
    NONE,
    Ports,
    check_token_name,
    ports_from_json,
    ports_to_json,
    valid_port,
)

logger = logging.getLogger(__name__)

TOKENS_FILE = "tokens.json"
VERSION = 1
FILE_MODE = 0o600
FLUSH_INTERVAL = 60.0  # seconds between writes of last_used alone


def digest(secret: str) -> str:
    return hashlib.sha256(secret.encode("utf-8", "surrogateescape")).hexdigest()


def new_secret() -> str:
    return TOKEN_PREFIX + secrets.token_urlsafe(32)


def iso(t: float | None) -> str | None:
    """Epoch seconds -> ``2025-05-01T12:00:00Z`` (UTC, whole seconds)."""
    if t is None:
        return None
    return datetime.fromtimestamp(t, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _from_iso(value: object, *, optional: bool = False) -> float | None:
    if value is None and optional:
        return None
    if not isinstance(value, str) or len(value) > 40:
        raise ValueError(f"expected a UTC time, got {str(value)[:40]!r}")
    parsed = datetime.fromisoformat(value)
    if parsed.utcoffset() is None:
        raise ValueError(f"time without a time zone: {value!r}")
    return parsed.timestamp()


@dataclass(frozen=True, slots=True)
class TokenRecord:
    name: str
    sha256: str
    read: Ports
    write: Ports
    created: float
    expires: float | None = None
    last_used: float | None = None

    @property
    def token_id(self) -> str:
        """Identifies the token in Grants, so that removing it closes its connections."""
        return self.sha256

    def api(self) -> dict[str, Any]:
        """The admin API's token object (never the secret, nor its digest)."""
        return {
            "name": self.name,
            "read": ports_to_json(self.read),
            "write": ports_to_json(self.write),
            "created": iso(self.created),
            "expires": iso(self.expires),
            "last_used": iso(self.last_used),
        }

    def grant(self) -> Grant:
        return Grant(
            name=self.name,
            read=self.read,
            write=self.write,
            expires=self.expires,
            token_id=self.sha256,
        )

    def to_json(self) -> dict[str, Any]:
        return {**self.api(), "sha256": self.sha256}

    @classmethod
    def from_json(cls, item: object) -> TokenRecord:
        if not isinstance(item, dict):
            raise ValueError("a token is not an object")
        keys = {"name", "sha256", "read", "write", "created", "expires", "last_used"}
        if set(item) != keys:
            raise ValueError(f"a token has the keys {sorted(item)[:10]}, expected {sorted(keys)}")
        sha = item["sha256"]
        if not (isinstance(sha, str) and len(sha) == 64 and set(sha) <= set("0123456789abcdef")):
            raise ValueError("a token's sha256 is not 64 hex digits")
        created = _from_iso(item["created"])
        assert created is not None
        return cls(
            name=check_token_name(item["name"]),
            sha256=sha,
            read=ports_from_json(item["read"]),
            write=ports_from_json(item["write"]),
            created=created,
            expires=_from_iso(item["expires"], optional=True),
            last_used=_from_iso(item["last_used"], optional=True),
        )


class TokenStore:
    """The tokens of one daemon; ``load()`` once, then ``add``/``remove``/``verify``."""

    def __init__(
        self,
        state_dir: Path,
        *,
        clock: Callable[[], float] = time.time,
        flush_interval: float = FLUSH_INTERVAL,
    ) -> None:
        self.path = state_dir / TOKENS_FILE
        self.clock = clock
        self.flush_interval = flush_interval
        self._tokens: dict[str, TokenRecord] = {}  # by name
        self._by_digest: dict[str, TokenRecord] = {}
        self._revoked: dict[str, str] = {}  # digest -> name, of tokens removed this run
        self._locked: str | None = None  # why the file may not be written, if so
        self._dirty = False  # last_used changed since the last write
        self._flushed_at = clock()

    @property
    def locked(self) -> str | None:
        """Why no token is valid and the file is left alone (None: all is well)."""
        return self._locked

    def load(self) -> None:
        """Read the file; never raises. A bad file fails closed (see the module doc)."""
        remove_leftovers(self.path)
        try:
            raw = self.path.read_bytes()
        except FileNotFoundError:
            return
        except OSError as exc:
            self._lock(f"is unreadable ({(exc.strerror or str(exc)).lower()})")
            return
        try:
            mode = self.path.stat().st_mode
        except OSError:  # pragma: no cover - it was just read
            mode = 0
        if mode & 0o077:
            logger.warning(
                "tokens file %s has mode %03o; it is rewritten with mode 600 on the next change",
                self.path,
                mode & 0o777,
            )
        try:
            document = json.loads(raw)
            version = document.get("version") if isinstance(document, dict) else None
            if type(version) is int and version > VERSION:
                self._lock(
                    f"was written by a newer relayd (version {version}, this one reads {VERSION})"
                )
                return
            records = self._parse(document)
        except (ValueError, RecursionError) as exc:
            self._set_aside(str(exc))
            return
        self._replace(records)
        logger.info("%d token(s) loaded from %s", len(records), self.path)

    @staticmethod
    def _parse(document: Any) -> list[TokenRecord]:
        if not isinstance(document, dict) or set(document) != {"version", "tokens"}:
            raise ValueError('expected an object with "version" and "tokens"')
        if document["version"] != VERSION or type(document["version"]) is not int:
            raise ValueError(f"unknown version {str(document['version'])[:20]!r}")
        if not isinstance(document["tokens"], list):
            raise ValueError('"tokens" is not a list')
        records = [TokenRecord.from_json(item) for item in document["tokens"]]
        if len({r.name for r in records}) != len(records):
            raise ValueError("a token name appears twice")
        if len({r.sha256 for r in records}) != len(records):
            raise ValueError("a token digest appears twice")
        return records

    def _lock(self, why: str) -> None:
        self._locked = f"tokens file {self.path} {why}"
        logger.error("%s: no token is valid, and tokens cannot be changed until it is fixed", why)

    def _set_aside(self, problem: str) -> None:
        aside = self.path.with_name(f"{TOKENS_FILE}.corrupt-{time.strftime('%Y%m%dT%H%M%S')}")
        try:
            os.replace(self.path, aside)
        except OSError as exc:
            self._lock(
                f"is corrupt ({problem}) and cannot be moved aside "
                f"({(exc.strerror or str(exc)).lower()})"
            )
            return
        logger.error(
            "tokens file %s is corrupt (%s); moved to %s: none of its tokens is valid",
            self.path,
            problem[:200],
            aside.name,
        )

    def _replace(self, records: Iterable[TokenRecord]) -> None:
        records = tuple(records)
        self._tokens = {r.name: r for r in records}
        self._by_digest = {r.sha256: r for r in records}

    def list(self) -> list[TokenRecord]:
        """Every token, by name (none while the file is locked)."""
        return sorted(self._tokens.values(), key=lambda r: r.name)

    def get(self, name: str) -> TokenRecord:
        try:
            return self._tokens[name]
        except KeyError:
            raise TokenNotFound(name) from None

    def add(
        self,
        name: str,
        read: Ports = ALL,
        write: Ports = NONE,
        expires_in: float | None = None,
    ) -> tuple[TokenRecord, str]:
        """A new token and its secret, saved; the secret is not kept anywhere.

        ValueError for an invalid name or expiry, TokenExists, StateError when
        the file cannot be written (then nothing changed).
        """
        check_token_name(name)
        for ports in (read, write):
            if ports != ALL and not (
                isinstance(ports, frozenset) and all(valid_port(p) for p in ports)
            ):
                raise ValueError('read and write must be sets of ports (1-65535) or "*"')
        if expires_in is not None and (
            isinstance(expires_in, bool)
            or not isinstance(expires_in, int | float)
            or not 0 < expires_in <= MAX_DURATION
        ):
            raise ValueError(f"expires_in must be between 1 and {MAX_DURATION} seconds")
        self._check_writable()
        if name in self._tokens:
            raise TokenExists(name)
        secret = new_secret()
        created = float(int(self.clock()))
        record = TokenRecord(
            name=name,
            sha256=digest(secret),
            read=read,
            write=write,
            created=created,
            expires=None if expires_in is None else created + expires_in,
        )
        self._save([*self._tokens.values(), record])
        self._replace([*self._tokens.values(), record])
        logger.info("token %s added", name)
        return record, secret

    def remove(self, name: str) -> TokenRecord:
        """Remove a token; from now on it is "revoked". TokenNotFound, StateError."""
        self._check_writable()
        record = self.get(name)
        rest = [r for r in self._tokens.values() if r.name != name]
        self._save(rest)
        self._replace(rest)
        self._revoked[record.sha256] = name
        logger.info("token %s removed", name)
        return record

    def verify(self, secret: str, now: float | None = None) -> Grant | AuthFailure:
        """The Grant of a presented opaque token, or why it is refused."""
        if now is None:
            now = self.clock()
        if self._locked is not None or len(secret) > MAX_TOKEN:
            return AuthFailure("invalid")
        key = digest(secret)
        record = self._by_digest.get(key)
        if record is None:
            name = self._revoked.get(key)
            return AuthFailure("invalid") if name is None else AuthFailure("revoked", name)
        if record.expires is not None and now >= record.expires:
            return AuthFailure("expired", record.name)
        used = dataclasses.replace(record, last_used=now)
        self._tokens[used.name] = self._by_digest[key] = used
        self._dirty = True
        if now - self._flushed_at >= self.flush_interval:
            self.flush()
        return record.grant()

    def flush(self) -> None:
        """Write last_used if it changed (at most every ``flush_interval`` from ``verify``,
        and at shutdown); a failure is logged, not raised, and retried later."""
        if not self._dirty or self._locked is not None:
            return
        self._flushed_at = self.clock()
        try:
            self._save(self._tokens.values())
        except StateError as exc:
            logger.warning("last use of tokens not saved: %s", exc)
        else:
            self._dirty = False

    def _check_writable(self) -> None:
        if self._locked is not None:
            raise StateError(f"{self._locked}; fix or remove it and restart relayd")

    def _save(self, records: Iterable[TokenRecord]) -> None:
        document = {
            "version": VERSION,
            "tokens": [r.to_json() for r in sorted(records, key=lambda r: r.name)],
        }
        try:
            write_atomic(self.path, (json.dumps(document, indent=2) + "\n").encode(), FILE_MODE)
        except OSError as exc:
            raise StateError(
                f"cannot write tokens file {self.path}: {(exc.strerror or str(exc)).lower()}"
            ) from None
        self._dirty = False
