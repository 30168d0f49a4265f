"""JWTs from an identity provider (relayd.toml(5) ``[auth] jwt_key_file``).

Imported only when a key file is configured. The key file decides the one
algorithm accepted, and nothing in a token can change it:

- a PEM public key (or certificate): RS256 for RSA (2048 bits or more),
  ES256 for EC P-256;
- anything else: the HS256 shared secret (32 bytes or more, surrounding
  whitespace stripped).

So ``alg: none`` is refused, and so is an HS256 token "signed" with the public
key as its HMAC secret (the classic key-confusion attack): with a PEM key only
RS256 or ES256 is ever accepted. Claims: ``exp`` (required), ``aud`` (required
and checked when an audience is configured), ``nbf`` (if present), ``sub`` (the
name in logs), ``relayd_read`` / ``relayd_write`` (a list of ports or ``"*"``;
absent means none).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import jwt
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.serialization import load_pem_public_key

from relayd.auth import AuthFailure, Grant
from relayd.errors import ConfigError
from relayd.parsing import NONE, Ports, ports_from_json

MAX_KEY_FILE = 64 * 1024
MIN_HMAC_KEY = 32  # bytes: RFC 7518 3.2, a key at least as long as the SHA-256 output
MIN_RSA_BITS = 2048
MAX_SUB = 128
NBF_LEEWAY = 60.0  # seconds of clock skew tolerated on "not before"

Key = bytes | rsa.RSAPublicKey | ec.EllipticCurvePublicKey


class JwtVerifier:
    def __init__(self, key: Key, algorithm: str, audience: str | None = None) -> None:
        self.key = key
        self.algorithm = algorithm
        self.audience = audience

    @classmethod
    def from_file(cls, path: Path, audience: str | None = None) -> JwtVerifier:
        """ConfigError (one line naming the file) when it is unusable."""

        def problem(what: str) -> ConfigError:
            return ConfigError([f"auth.jwt_key_file {path}: {what}"])

        try:
            with open(path, "rb") as f:
                content = f.read(MAX_KEY_FILE + 1)
        except OSError as exc:
            raise problem((exc.strerror or str(exc)).lower()) from None
        if len(content) > MAX_KEY_FILE:
            raise problem(f"larger than {MAX_KEY_FILE // 1024} KiB: not a key")
        if b"-----BEGIN" not in content:
            secret = content.strip()
            if len(secret) < MIN_HMAC_KEY:
                raise problem(
                    f"an HS256 secret needs at least {MIN_HMAC_KEY} bytes "
                    f"(this one has {len(secret)}); or give a PEM public key"
                )
            return cls(secret, "HS256", audience)
        if b"PRIVATE KEY-----" in content:
            raise problem("holds a private key; give relayd only the public key")
        public: object
        try:
            if b"-----BEGIN CERTIFICATE-----" in content:
                public = x509.load_pem_x509_certificate(content).public_key()
            else:
                public = load_pem_public_key(content)
        except ValueError as exc:
            raise problem(f"not a readable PEM public key or certificate ({exc})") from None
        if isinstance(public, rsa.RSAPublicKey):
            if public.key_size < MIN_RSA_BITS:
                raise problem(f"an RSA key of {public.key_size} bits; at least {MIN_RSA_BITS}")
            return cls(public, "RS256", audience)
        if isinstance(public, ec.EllipticCurvePublicKey):
            if not isinstance(public.curve, ec.SECP256R1):
                raise problem(f"an EC key on {public.curve.name}; ES256 needs P-256")
            return cls(public, "ES256", audience)
        raise problem("a public key of a kind other than RSA or EC P-256")

    def verify(self, token: str, now: float) -> Grant | AuthFailure:
        """The Grant a valid JWT carries, or AuthFailure (``invalid`` or ``expired``)."""
        try:
            claims: dict[str, Any] = jwt.decode(
                token,
                self.key,
                algorithms=[self.algorithm],
                audience=self.audience,
                options={
                    "require": ["exp", "aud"] if self.audience is not None else ["exp"],
                    # Times are checked below against the caller's clock.
                    "verify_exp": False,
                    "verify_nbf": False,
                    "verify_iat": False,
                    "verify_aud": self.audience is not None,
                },
            )
        except (jwt.PyJWTError, ValueError, TypeError):
            return AuthFailure("invalid")
        sub = claims.get("sub")
        if sub is not None and not (
            isinstance(sub, str) and 0 < len(sub) <= MAX_SUB and sub.isprintable()
        ):
            return AuthFailure("invalid")
        exp, nbf = _time(claims.get("exp")), _time(claims.get("nbf", 0))
        if exp is None or nbf is None:
            return AuthFailure("invalid", sub)
        if nbf > now + NBF_LEEWAY:
            return AuthFailure("invalid", sub)
        if now >= exp:
            return AuthFailure("expired", sub)
        try:
            read = _ports_claim(claims, "relayd_read")
            write = _ports_claim(claims, "relayd_write")
        except ValueError:
            return AuthFailure("invalid", sub)
        return Grant(name=sub, read=read, write=write, expires=exp, kind="jwt")


def _time(value: object) -> float | None:
    """A NumericDate claim as a float; None if it is not one (bool, string, NaN, 10**400)."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    try:
        result = float(value)
    except OverflowError:
        return None
    return result if math.isfinite(result) else None


def _ports_claim(claims: dict[str, Any], name: str) -> Ports:
    if name not in claims:
        return NONE
    return ports_from_json(claims[name])
