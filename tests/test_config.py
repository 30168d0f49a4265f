"""The configuration model: v2 keys, defaults and one clear line per problem."""

from __future__ import annotations

from pathlib import Path

import pytest

from relayd.config import Settings
from relayd.errors import ConfigError


def load(tmp_path: Path, text: str) -> Settings:
    path = tmp_path / "relayd.toml"
    path.write_text(text)
    return Settings.load(path)


def problems(tmp_path: Path, text: str) -> list[str]:
    with pytest.raises(ConfigError) as info:
        load(tmp_path, text)
    return info.value.problems


def test_defaults_host_applies_to_ports_without_one(tmp_path: Path) -> None:
    settings = load(
        tmp_path,
        '[defaults]\nhost = "127.0.0.1"\n[[ports]]\nport = 8001\n'
        '[[ports]]\nport = 8002\nhost = "::1"\n',
    )
    assert [p.host for p in settings.ports] == ["127.0.0.1", "::1"]
    assert Settings().defaults.host == "0.0.0.0"
    assert Settings().auth.mode == "none"  # v1 configs keep working


def test_allow_networks_are_normalized_and_checked(tmp_path: Path) -> None:
    settings = load(
        tmp_path, '[[ports]]\nport = 8001\nallow = ["192.0.2.7/24", "2001:DB8::/32", "10.1.2.3"]\n'
    )
    assert settings.ports[0].allow == ["192.0.2.0/24", "2001:db8::/32", "10.1.2.3/32"]
    assert problems(tmp_path, '[[ports]]\nport = 8001\nallow = ["192.0.2.0/33"]\n') == [
        "ports[0].allow[0]: '192.0.2.0/33' is not an IP network (e.g. 192.0.2.0/24)"
    ]


@pytest.mark.parametrize(
    ("origin", "normalized"),
    [
        ("https://Dash.Example:8443", "https://dash.example:8443"),
        ("http://dash.example/", "http://dash.example"),
        ("http://[::1]:8000", "http://[::1]:8000"),
        ("*", "*"),
    ],
)
def test_allowed_origins_are_normalized(tmp_path: Path, origin: str, normalized: str) -> None:
    settings = load(tmp_path, f'[http]\nallowed_origins = ["{origin}"]\n')
    assert settings.http.allowed_origins == [normalized]


@pytest.mark.parametrize(
    "origin",
    ["dash.example", "ftp://dash.example", "https://dash.example/path", "https://u@x", "null"],
)
def test_bad_origins_are_config_errors(tmp_path: Path, origin: str) -> None:
    (line,) = problems(tmp_path, f'[http]\nallowed_origins = ["{origin}"]\n')
    assert line.startswith("http.allowed_origins[0]: ")


def test_tls_keys_go_together(tmp_path: Path) -> None:
    assert problems(tmp_path, '[http]\ntls_cert = "a.pem"\n') == [
        "http: tls_cert and tls_key go together"
    ]
    assert problems(tmp_path, '[[ports]]\nport = 8001\ntls_cert = "a"\ntls_key = "b"\n') == [
        "ports[0]: tls_cert, tls_key and client_ca need tls = true"
    ]
    assert problems(tmp_path, "[[ports]]\nport = 8001\ntls = true\n") == [
        "port 8001: tls = true needs tls_cert and tls_key, on the port or in [http]"
    ]


def test_auth_keys(tmp_path: Path) -> None:
    settings = load(tmp_path, '[auth]\nmode = "token"\nmetrics = "public"\n')
    assert (settings.auth.mode, settings.auth.metrics) == ("token", "public")
    assert problems(tmp_path, '[auth]\nmode = "open"\n') == [
        "auth.mode: Input should be 'token' or 'none'"
    ]
    assert problems(tmp_path, "[http]\nhandshake_timeout = 0\n") == [
        "http.handshake_timeout: Input should be greater than 0"
    ]
