"""JWT verification with keys made in the test: HS256, RS256, ES256, and the classic attacks."""

from __future__ import annotations

import base64
import datetime
import hashlib
import hmac
import json
from pathlib import Path
from typing import Any

import jwt
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.x509.oid import NameOID
from hypothesis import given
from hypothesis import strategies as st

from relayd.auth import Authenticator, AuthFailure, Grant
from relayd.errors import ConfigError
from relayd.jwtauth import JwtVerifier
from relayd.parsing import ALL
from relayd.tokens import TokenStore

NOW = 1_750_000_000.0
SECRET = b"0123456789abcdef0123456789abcdef-shared"


@pytest.fixture(scope="module")
def rsa_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


@pytest.fixture(scope="module")
def ec_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def public_pem(key: rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey) -> bytes:
    return key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def write(tmp_path: Path, content: bytes) -> Path:
    path = tmp_path / "jwt.key"
    path.write_bytes(content)
    return path


def claims(**extra: Any) -> dict[str, Any]:
    return {"sub": "fleet-7", "exp": NOW + 60, "relayd_read": [8001], **extra}


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def forge(header: dict[str, Any], payload: dict[str, Any], key: bytes | None) -> str:
    """A JWT built by hand, as an attacker would, signed with HMAC-SHA256 over ``key``."""
    signing_input = f"{b64(json.dumps(header).encode())}.{b64(json.dumps(payload).encode())}"
    if key is None:
        return signing_input + "."
    signature = hmac.new(key, signing_input.encode(), hashlib.sha256).digest()
    return f"{signing_input}.{b64(signature)}"


def test_hs256(tmp_path: Path) -> None:
    verifier = JwtVerifier.from_file(write(tmp_path, SECRET + b"\n"))
    assert verifier.algorithm == "HS256"
    token = jwt.encode(claims(relayd_write="*"), SECRET, algorithm="HS256")
    assert verifier.verify(token, NOW) == Grant(
        "fleet-7", read=frozenset({8001}), write=ALL, expires=NOW + 60, kind="jwt"
    )
    assert verifier.verify(jwt.encode(claims(), b"x" * 40, algorithm="HS256"), NOW) == (
        AuthFailure("invalid")
    )


def test_rs256(tmp_path: Path, rsa_key: rsa.RSAPrivateKey) -> None:
    verifier = JwtVerifier.from_file(write(tmp_path, public_pem(rsa_key)))
    assert verifier.algorithm == "RS256"
    grant = verifier.verify(jwt.encode(claims(), rsa_key, algorithm="RS256"), NOW)
    assert isinstance(grant, Grant) and grant.read == frozenset({8001}) and grant.name == "fleet-7"
    assert grant.token_id is None and grant.write == frozenset()
    other = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    assert verifier.verify(jwt.encode(claims(), other, algorithm="RS256"), NOW) == AuthFailure(
        "invalid"
    )
    # PS256 with the same key: not the pinned algorithm.
    assert verifier.verify(jwt.encode(claims(), rsa_key, algorithm="PS256"), NOW) == (
        AuthFailure("invalid")
    )


def test_es256(tmp_path: Path, ec_key: ec.EllipticCurvePrivateKey) -> None:
    verifier = JwtVerifier.from_file(write(tmp_path, public_pem(ec_key)))
    assert verifier.algorithm == "ES256"
    assert isinstance(verifier.verify(jwt.encode(claims(), ec_key, algorithm="ES256"), NOW), Grant)


def test_a_certificate_stands_for_its_public_key(
    tmp_path: Path, ec_key: ec.EllipticCurvePrivateKey
) -> None:
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "idp.example")])
    start = datetime.datetime(2025, 1, 1, tzinfo=datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(ec_key.public_key())
        .serial_number(1)
        .not_valid_before(start)
        .not_valid_after(start + datetime.timedelta(days=365))
        .sign(ec_key, hashes.SHA256())
    )
    verifier = JwtVerifier.from_file(write(tmp_path, cert.public_bytes(serialization.Encoding.PEM)))
    assert verifier.algorithm == "ES256"
    assert isinstance(verifier.verify(jwt.encode(claims(), ec_key, algorithm="ES256"), NOW), Grant)


def test_hs256_signed_with_the_public_key_is_refused(
    tmp_path: Path, rsa_key: rsa.RSAPrivateKey
) -> None:
    """Key confusion: the public key is public, so an HMAC over it proves nothing."""
    pem = public_pem(rsa_key)
    verifier = JwtVerifier.from_file(write(tmp_path, pem))
    for key in (pem, pem.strip(), pem.decode().replace("\n", "\r\n").encode()):
        forged = forge({"alg": "HS256", "typ": "JWT"}, claims(relayd_read="*"), key)
        assert jwt.decode(forged, options={"verify_signature": False})["relayd_read"] == "*"
        assert verifier.verify(forged, NOW) == AuthFailure("invalid")


def test_alg_none_is_refused(tmp_path: Path, rsa_key: rsa.RSAPrivateKey) -> None:
    for key_file in (SECRET, public_pem(rsa_key)):
        verifier = JwtVerifier.from_file(write(tmp_path, key_file))
        for alg in ("none", "None", "NONE"):
            unsigned = forge({"alg": alg}, claims(), None)
            assert verifier.verify(unsigned, NOW) == AuthFailure("invalid")
        # A correct HS256 signature under a header that claims another algorithm.
        assert verifier.verify(forge({"alg": "HS512"}, claims(), SECRET), NOW) == (
            AuthFailure("invalid")
        )


def test_expiry_is_required_and_checked_against_the_callers_clock(tmp_path: Path) -> None:
    verifier = JwtVerifier.from_file(write(tmp_path, SECRET))

    def check(payload: dict[str, Any], now: float = NOW) -> Grant | AuthFailure:
        return verifier.verify(jwt.encode(payload, SECRET, algorithm="HS256"), now)

    assert check(claims(), NOW + 59.9) == check(claims())
    assert check(claims(), NOW + 60) == AuthFailure("expired", "fleet-7")
    assert check(claims(exp=NOW - 3600)) == AuthFailure("expired", "fleet-7")
    no_exp = claims()
    del no_exp["exp"]
    assert check(no_exp) == AuthFailure("invalid")
    for exp in ["tomorrow", None, True, [1], 10**400]:
        assert check(claims(exp=exp)) in (AuthFailure("invalid"), AuthFailure("invalid", "fleet-7"))
    assert check(claims(nbf=NOW + 3600)) == AuthFailure("invalid", "fleet-7")
    assert isinstance(check(claims(nbf=NOW + 30)), Grant)  # clock skew
    assert isinstance(check(claims(iat=NOW + 30)), Grant)


def test_audience(tmp_path: Path) -> None:
    strict = JwtVerifier.from_file(write(tmp_path, SECRET), audience="relayd")
    lax = JwtVerifier.from_file(write(tmp_path, SECRET))

    def token(**extra: Any) -> str:
        return jwt.encode(claims(**extra), SECRET, algorithm="HS256")

    assert isinstance(strict.verify(token(aud="relayd"), NOW), Grant)
    assert isinstance(strict.verify(token(aud=["other", "relayd"]), NOW), Grant)
    assert strict.verify(token(aud="other"), NOW) == AuthFailure("invalid")
    assert strict.verify(token(), NOW) == AuthFailure("invalid")  # required when configured
    assert isinstance(lax.verify(token(aud="anything"), NOW), Grant)
    assert isinstance(lax.verify(token(), NOW), Grant)


@pytest.mark.parametrize(
    "bad",
    [
        {"relayd_read": "all"},
        {"relayd_read": [0]},
        {"relayd_read": ["8001"]},
        {"relayd_write": 8001},
        {"relayd_write": [True]},
        {"sub": ""},
        {"sub": 7},
        {"sub": "x" * 129},
        {"sub": "fleet\nrelayd: forged log line"},
    ],
)
def test_bad_claims_are_invalid(tmp_path: Path, bad: dict[str, Any]) -> None:
    verifier = JwtVerifier.from_file(write(tmp_path, SECRET))
    result = verifier.verify(jwt.encode(claims(**bad), SECRET, algorithm="HS256"), NOW)
    assert isinstance(result, AuthFailure) and result.reason == "invalid"


def test_no_sub_and_no_ports(tmp_path: Path) -> None:
    verifier = JwtVerifier.from_file(write(tmp_path, SECRET))
    grant = verifier.verify(jwt.encode({"exp": NOW + 60}, SECRET, algorithm="HS256"), NOW)
    assert grant == Grant(None, expires=NOW + 60, kind="jwt")


@given(st.text(max_size=500))
def test_garbage_never_raises(garbage: str) -> None:
    verifier = JwtVerifier(SECRET, "HS256")
    assert verifier.verify(garbage, NOW) == AuthFailure("invalid")
    assert verifier.verify("eyJhbGciOiJIUzI1NiJ9." + garbage, NOW) == AuthFailure("invalid")


def test_authenticator_sends_jwts_to_the_verifier(tmp_path: Path) -> None:
    auth = Authenticator(TokenStore(tmp_path), JwtVerifier(SECRET, "HS256"))
    assert isinstance(auth.verify(jwt.encode(claims(), SECRET, algorithm="HS256"), NOW), Grant)
    assert auth.verify("rlyd_" + jwt.encode(claims(), SECRET), NOW) == AuthFailure("invalid")


def test_unusable_key_files(
    tmp_path: Path, rsa_key: rsa.RSAPrivateKey, ec_key: ec.EllipticCurvePrivateKey
) -> None:
    def refused(content: bytes) -> str:
        with pytest.raises(ConfigError) as info:
            JwtVerifier.from_file(write(tmp_path, content))
        [line] = info.value.problems
        assert line.startswith(f"auth.jwt_key_file {tmp_path / 'jwt.key'}: ")
        return line

    assert "at least 32 bytes (this one has 31)" in refused(b"x" * 31 + b"\n\n")
    assert "at least 32 bytes" in refused(b"")
    assert "larger than 64 KiB" in refused(b"x" * (64 * 1024 + 1))
    private = rsa_key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    assert "private key" in refused(private)
    assert "not a readable PEM" in refused(b"-----BEGIN PUBLIC KEY-----\ngarbage\n")
    small = rsa.generate_private_key(public_exponent=65537, key_size=1024)
    assert "1024 bits" in refused(public_pem(small))
    p384 = ec.generate_private_key(ec.SECP384R1())
    assert "secp384r1" in refused(public_pem(p384))
    ed = ed25519.Ed25519PrivateKey.generate().public_key()
    ed_pem = ed.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    assert "other than RSA or EC" in refused(ed_pem)
    with pytest.raises(ConfigError, match="no such file"):
        JwtVerifier.from_file(tmp_path / "missing.pem")
