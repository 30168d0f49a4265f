"""Access-control rules without sockets: grants, token presentation, Origin, logs, parsing."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from relayd.auth import (
    MAX_TOKEN,
    REASONS,
    Authenticator,
    AuthFailure,
    AuthFailureLog,
    Grant,
    extract_token,
    origin_allowed,
    parse_origin,
    redact_query,
)
from relayd.parsing import (
    ALL,
    check_token_name,
    parse_duration,
    parse_ports,
    ports_from_json,
    ports_text,
    ports_to_json,
)
from relayd.tokens import TokenStore

TOKEN = "rlyd_" + "A" * 43
JWT = "eyJhbGciOiJIUzI1NiJ9.eyJleHAiOjF9.c2lnbmF0dXJl"

# --- parsing ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("90s", 90),
        ("15m", 900),
        ("12h", 43200),
        ("30d", 2592000),
        (" 1s ", 1),
        ("36500d", 3153600000),
    ],
)
def test_durations(text: str, seconds: int) -> None:
    assert parse_duration(text) == seconds


@pytest.mark.parametrize(
    "text",
    ["", "s", "0s", "-5m", "5", "5 m", "5M", "1.5h", "5w", "1e3s", "٣s", "36501d", "9" * 13 + "s"],
)
def test_bad_durations(text: str) -> None:
    with pytest.raises(ValueError, match="invalid duration"):
        parse_duration(text)


@pytest.mark.parametrize(
    ("text", "ports"),
    [
        ("8001,8002", frozenset({8001, 8002})),
        (" 8001 , 8001 ", frozenset({8001})),
        ("1,65535", frozenset({1, 65535})),
        ("all", ALL),
        ("ALL", ALL),
        ("*", ALL),
        ("", frozenset()),
    ],
)
def test_port_lists(text: str, ports: object) -> None:
    assert parse_ports(text) == ports


@pytest.mark.parametrize(
    "text",
    ["0", "65536", "8001,", ",8001", "8001;8002", "80o1", "+80", "٨٠٠١", "8001,all", "0008001"],
)
def test_bad_port_lists(text: str) -> None:
    with pytest.raises(ValueError, match="invalid port"):
        parse_ports(text)


def test_ports_json_round_trip_and_text() -> None:
    assert ports_to_json(frozenset({8002, 8001})) == [8001, 8002]
    assert ports_to_json(ALL) == "*"
    assert ports_from_json([8001, 8001]) == frozenset({8001})
    assert ports_from_json("*") == ALL
    for bad in [None, "all", [0], [True], [8001.0], ["8001"], {"8001": 1}, 8001]:
        with pytest.raises(ValueError):
            ports_from_json(bad)
    assert ports_text(ALL) == "all"
    assert ports_text(frozenset({8002, 8001})) == "8001,8002"
    assert ports_text(frozenset()) == "-"


@pytest.mark.parametrize("name", ["a", "dash", "Dash-1.prod_2", "x" * 64, ".", "-"])
def test_token_names(name: str) -> None:
    assert check_token_name(name) == name


@pytest.mark.parametrize(
    "name", ["", "x" * 65, "a b", "a/b", "dash\n", "dásh", "a:b", "a\x00", None, 5, ["a"]]
)
def test_bad_token_names(name: object) -> None:
    with pytest.raises(ValueError, match="invalid token name"):
        check_token_name(name)


# --- grants -------------------------------------------------------------------------


def test_write_implies_read() -> None:
    grant = Grant("dash", read=frozenset({8001}), write=frozenset({8002}))
    assert grant.can_read(8001) and grant.can_read(8002) and not grant.can_read(8003)
    assert grant.can_write(8002) and not grant.can_write(8001)
    assert grant.all_readable == frozenset({8001, 8002})
    assert grant.readable([]) == frozenset({8001, 8002})
    assert grant.readable([8002]) == frozenset({8002})
    assert grant.readable([8001, 8003]) is None
    assert grant.forbidden([8003, 8001, 8004, 8003]) == [8003, 8004]


def test_all_covers_ports_added_later() -> None:
    reader = Grant("r", read=ALL)
    assert reader.can_read(65535) and not reader.can_write(1)
    assert reader.readable([]) == ALL
    writer = Grant("w", read=frozenset(), write=ALL)
    assert writer.can_read(12345) and writer.can_write(12345)
    assert writer.readable([]) == ALL
    nothing = Grant("n")
    assert nothing.readable([]) == frozenset()
    assert nothing.readable([8001]) is None


def test_grant_expiry_and_actor_names() -> None:
    assert not Grant("a").expired(1e12)
    assert Grant("a", expires=100.0).expired(100.0)
    assert not Grant("a", expires=100.0).expired(99.9)
    assert Grant("dash").who("192.0.2.7:5000") == "dash"
    assert Grant.anonymous().who("192.0.2.7:5000") == "anonymous 192.0.2.7:5000"
    assert Grant.anonymous().can_write(8001)
    assert Grant(None, kind="admin").who("x") == "admin"
    assert "192.0.2.7" in Grant(None, kind="jwt").who("192.0.2.7:5000")


def test_failure_statuses() -> None:
    assert {r: AuthFailure(r).status for r in REASONS} == {
        "missing": 401,
        "invalid": 401,
        "expired": 401,
        "revoked": 401,
        "forbidden_port": 403,
        "origin": 403,
    }


def test_authenticator_routes_by_shape(tmp_path: Path) -> None:
    store = TokenStore(tmp_path)
    _, secret = store.add("dash")
    auth = Authenticator(store)
    assert auth.verify(None) == AuthFailure("missing")
    assert isinstance(auth.verify(secret), Grant)
    assert auth.verify(TOKEN) == AuthFailure("invalid")
    assert auth.verify(JWT) == AuthFailure("invalid")  # no JWT key configured
    assert auth.verify(secret[5:]) == AuthFailure("invalid")


# --- presentation -------------------------------------------------------------------


def hdr(*values: bytes, name: bytes = b"authorization") -> list[tuple[bytes, bytes]]:
    return [(b"host", b"gw:8000"), *((name, v) for v in values)]


def test_bearer_header_and_query_parameter() -> None:
    assert extract_token(hdr(), b"") is None
    assert extract_token(hdr(), b"port=8001") is None
    assert extract_token(hdr(b"Bearer " + TOKEN.encode()), b"") == TOKEN
    assert extract_token(hdr(b"bearer  " + TOKEN.encode() + b" "), b"") == TOKEN
    assert extract_token(hdr(b"Bearer " + TOKEN.encode(), name=b"Authorization"), b"") == TOKEN
    assert extract_token(hdr(), f"port=8001&access_token={TOKEN}") == TOKEN
    assert extract_token(hdr(), f"access_token={TOKEN}&port=8001".encode()) == TOKEN
    assert extract_token(hdr(), "access_token=" + TOKEN.replace("_", "%5F")) == TOKEN
    assert extract_token(hdr(b"Bearer " + JWT.encode()), b"") == JWT
    # The same token both ways is unambiguous.
    assert extract_token(hdr(b"Bearer " + TOKEN.encode()), f"access_token={TOKEN}") == TOKEN


@pytest.mark.parametrize(
    ("headers", "query"),
    [
        (hdr(b"Bearer " + TOKEN.encode(), b"Bearer " + TOKEN.encode()), ""),  # duplicated
        (hdr(b"Bearer a", name=b"Authorization") + [(b"authorization", b"Bearer b")], ""),
        (hdr(b"Basic dXNlcjpwYXNz"), ""),
        (hdr(b"Bearer"), ""),
        (hdr(b"Bearer "), ""),
        (hdr(b""), ""),
        (hdr(b"Bearer a b"), ""),
        (hdr(b"Bearer\t" + TOKEN.encode()), ""),
        (hdr(b"Bearer " + TOKEN.encode() + b"\x00"), ""),
        (hdr(b"Bearer rlyd_\xff\xfe"), ""),
        (hdr(b"Bearer rlyd_<script>"), ""),
        (hdr(b"Bearer rlyd_a\r\nX-Injected: 1"), ""),
        (hdr(b"Bearer " + b"A" * (MAX_TOKEN + 1)), ""),
        (hdr(b"Bearer " + b"A" * 100_000), ""),
        (hdr(), f"access_token={TOKEN}&access_token={TOKEN}"),  # given twice
        (hdr(), f"access_token={TOKEN}&access%5Ftoken={TOKEN}"),  # twice, one encoded
        (hdr(), "access_token="),
        (hdr(), "access_token"),
        (hdr(), "access_token=rlyd_a%20b"),
        (hdr(), "access_token=rlyd_a+b"),
        (hdr(), "access_token=%00"),
        (hdr(), "access_token=" + "A" * (MAX_TOKEN + 1)),
        (hdr(b"Bearer rlyd_one"), "access_token=rlyd_two"),  # both, different
    ],
)
def test_bad_presentations_are_invalid(headers: list[tuple[bytes, bytes]], query: str) -> None:
    assert extract_token(headers, query) == AuthFailure("invalid")


def test_the_longest_acceptable_token() -> None:
    # The header's limit includes "Bearer ".
    longest = "A" * (MAX_TOKEN - len("Bearer "))
    assert extract_token(hdr(b"Bearer " + longest.encode()), b"") == longest
    assert extract_token(hdr(b"Bearer A" + longest.encode()), b"") == AuthFailure("invalid")
    assert extract_token(hdr(), "access_token=" + "A" * MAX_TOKEN) == "A" * MAX_TOKEN


@given(
    st.lists(st.tuples(st.sampled_from([b"authorization", b"host", b"x"]), st.binary())),
    st.text() | st.binary(),
)
def test_extract_token_never_raises(headers: list[tuple[bytes, bytes]], query: str) -> None:
    result = extract_token(headers, query)
    assert result is None or isinstance(result, AuthFailure) or 0 < len(result) <= MAX_TOKEN


def test_redact_query() -> None:
    assert redact_query(f"port=8001&access_token={TOKEN}") == "port=8001&access_token=***"
    assert redact_query(f"access_token={TOKEN}&access_token=x".encode()) == (
        "access_token=***&access_token=***"
    )
    assert redact_query(f"access%5Ftoken={TOKEN}") == "access%5Ftoken=***"
    assert redact_query(f"token={TOKEN}") == "token=***"  # our token under another name
    assert redact_query("port=8001&port=8002&format=json") == "port=8001&port=8002&format=json"
    assert redact_query("") == ""
    assert redact_query("access_token") == "access_token=***"


@given(st.text())
def test_redact_never_leaks(secret_tail: str) -> None:
    secret = TOKEN + secret_tail.replace("&", "")
    for query in (f"access_token={secret}", f"a=1&access_token={secret}&b=2"):
        assert secret not in redact_query(query)


# --- Origin -------------------------------------------------------------------------

ALLOWED = ["https://dash.example:8443", "HTTP://Other.Example"]


@pytest.mark.parametrize(
    ("origin", "scheme", "host"),
    [
        (None, "ws", "gw:8000"),  # not a browser
        ("http://gw:8000", "ws", "gw:8000"),  # own origin
        ("http://GW:8000", "ws", "gw:8000"),
        ("http://gw", "ws", "gw:80"),  # default ports
        ("http://gw:80", "ws", "gw"),
        ("https://gw", "wss", "gw:443"),
        ("https://gw:443", "https", "GW"),
        ("http://[::1]:8000", "ws", "[::1]:8000"),
        ("https://dash.example:8443", "ws", "gw:8000"),  # allowed list
        ("https://DASH.example:8443", "ws", "gw:8000"),
        ("http://other.example:80", "ws", None),
        ("http://other.example", "ws", "gw:8000"),
    ],
)
def test_origins_allowed(origin: str | None, scheme: str, host: str | None) -> None:
    assert origin_allowed(origin, scheme, host, ALLOWED)


@pytest.mark.parametrize(
    ("origin", "scheme", "host"),
    [
        ("null", "ws", "gw:8000"),
        ("", "ws", "gw:8000"),
        ("http://evil.example", "ws", "gw:8000"),
        ("https://gw:8000", "ws", "gw:8000"),  # another scheme
        ("http://gw:8001", "ws", "gw:8000"),  # another port
        ("http://gw", "ws", "gw:8000"),
        ("http://gw:8000", "wss", "gw:8000"),
        ("https://dash.example", "ws", "gw:8000"),  # allowed, but on 8443
        ("https://dash.example:8443.evil.example", "ws", "gw:8000"),
        ("https://dash.example:8443/", "ws", "gw:8000"),  # a path: not an origin
        ("https://user@dash.example:8443", "ws", "gw:8000"),
        ("https://dash.example:8443?x", "ws", "gw:8000"),
        ("https://dash.example:99999", "ws", "gw:8000"),
        ("http://gw:0", "ws", "gw:0"),
        ("https://dash.example:8443 https://x", "ws", "gw:8000"),
        ("http://gw:8000\r\nX: y", "ws", "gw:8000"),
        ("http://gw:8000", "ws", None),  # no Host header: nothing to compare with
        ("http://gw:8000", "ws", "gw:8000:1"),
        ("http://" + "a" * 100_000, "ws", "a" * 100_000),  # the 100 KB Origin
        ("http://" + "a" * 100_000 + ":8000", "ws", "gw:8000"),
        ("file://", "ws", "gw:8000"),
        ("http://dásh.example", "ws", "dásh.example"),
    ],
)
def test_origins_refused(origin: str, scheme: str, host: str | None) -> None:
    assert not origin_allowed(origin, scheme, host, ALLOWED)


def test_star_allows_any_well_formed_origin_only() -> None:
    assert origin_allowed("http://evil.example", "ws", "gw:8000", ["*"])
    assert origin_allowed("chrome-extension://abcdef", "ws", "gw:8000", ["*"])
    for origin in ("null", "", "http://x/", "http://" + "a" * 100_000, "garbage"):
        assert not origin_allowed(origin, "ws", "gw:8000", ["*"])


def test_parse_origin() -> None:
    assert parse_origin("HTTPS://Dash.Example") == ("https", "dash.example", 443)
    assert parse_origin("http://192.0.2.7:8080") == ("http", "192.0.2.7", 8080)
    assert parse_origin("x-app://thing") == ("x-app", "thing", None)
    assert parse_origin("null") is None
    assert parse_origin("https://") is None


@given(st.text(max_size=300), st.sampled_from(["ws", "wss", "http", "https", "?"]), st.text())
def test_origin_allowed_never_raises(origin: str, scheme: str, host: str) -> None:
    assert origin_allowed(origin, scheme, host, ALLOWED) in (True, False)


# --- failure log --------------------------------------------------------------------


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def test_failure_log_counts_and_rate_limits(caplog: pytest.LogCaptureFixture) -> None:
    clock = Clock()
    log = AuthFailureLog(burst=3, window=10.0, clock=clock)
    assert log.counts == dict.fromkeys(REASONS, 0)
    caplog.set_level(logging.WARNING, logger="relayd.auth")
    log.record(AuthFailure("expired", "dash"), "192.0.2.7:5000")
    log.record("origin", "192.0.2.8:5000", "Origin https://evil.example")
    for _ in range(50):
        log.record("invalid", "192.0.2.9:5000")
    lines = [r.getMessage() for r in caplog.records]
    assert lines == [
        "auth: refused 192.0.2.7:5000: expired token dash",
        "auth: refused 192.0.2.8:5000: origin (Origin https://evil.example)",
        "auth: refused 192.0.2.9:5000: invalid",
    ]
    assert log.counts["invalid"] == 50 and log.counts["expired"] == 1
    caplog.clear()
    clock.t += 10.0
    log.record("revoked", "192.0.2.9:5000")
    assert [r.getMessage() for r in caplog.records] == [
        "auth: 49 refusal(s) not logged (more than 3 in 10s)",
        "auth: refused 192.0.2.9:5000: revoked",
    ]
    caplog.clear()
    clock.t += 10.0
    log.flush()  # nothing suppressed: nothing to say
    assert caplog.records == []
    assert sum(log.counts.values()) == 53
