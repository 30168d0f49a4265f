"""The token store on real files: hashing, permissions, atomic saves, failing closed."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import stat
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import relayd.atomicfile
import relayd.tokens
from relayd.auth import AuthFailure, Grant
from relayd.errors import StateError, TokenExists, TokenNotFound
from relayd.parsing import ALL
from relayd.tokens import TOKENS_FILE, TokenStore

ISO = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ")
T0 = 1_750_000_000.0  # 2025-06-15T15:06:40Z


class Clock:
    def __init__(self) -> None:
        self.t = T0

    def __call__(self) -> float:
        return self.t


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def store(tmp_path: Path, clock: Clock) -> TokenStore:
    s = TokenStore(tmp_path, clock=clock)
    s.load()
    return s


@pytest.fixture(autouse=True)
def no_secret_in_logs(caplog: pytest.LogCaptureFixture) -> Iterator[None]:
    """Every test: no log line carries a token (they all start with rlyd_)."""
    caplog.set_level(logging.DEBUG)
    yield
    assert "rlyd_" not in caplog.text


def reload(tmp_path: Path, clock: Clock) -> TokenStore:
    s = TokenStore(tmp_path, clock=clock)
    s.load()
    return s


def file_doc(tmp_path: Path) -> dict[str, Any]:
    doc: dict[str, Any] = json.loads((tmp_path / TOKENS_FILE).read_text())
    return doc


def test_a_token_is_random_shown_once_and_stored_as_its_hash(
    store: TokenStore, tmp_path: Path
) -> None:
    record, secret = store.add("dash", read=frozenset({8001}), write=frozenset({8002}))
    _, other = store.add("other")
    assert re.fullmatch(r"rlyd_[A-Za-z0-9_-]{43}", secret)  # 256 bits, base64url
    assert secret != other
    text = (tmp_path / TOKENS_FILE).read_text()
    assert secret not in text and secret[5:] not in text
    assert hashlib.sha256(secret.encode()).hexdigest() in text
    assert record.api() == {
        "name": "dash",
        "read": [8001],
        "write": [8002],
        "created": "2025-06-15T15:06:40Z",
        "expires": None,
        "last_used": None,
    }
    assert "token" not in record.api() and "sha256" not in record.api()
    grant = store.verify(secret, T0)
    assert grant == Grant(
        "dash", read=frozenset({8001}), write=frozenset({8002}), token_id=record.token_id
    )


def test_the_file_is_0600_from_its_first_byte(
    tmp_path: Path, clock: Clock, monkeypatch: pytest.MonkeyPatch
) -> None:
    modes = []
    real_fsync = os.fsync

    def spy(fd: int) -> None:
        st = os.fstat(fd)
        if stat.S_ISREG(st.st_mode):
            modes.append(stat.S_IMODE(st.st_mode))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", spy)
    old_umask = os.umask(0)  # the mode must not depend on a friendly umask
    try:
        store = TokenStore(tmp_path / "new-dir", clock=clock)
        store.load()
        store.add("dash")
        store.add("two")
    finally:
        os.umask(old_umask)
    assert modes == [0o600, 0o600]
    assert stat.S_IMODE((tmp_path / "new-dir" / TOKENS_FILE).stat().st_mode) == 0o600


def test_tokens_survive_a_restart(store: TokenStore, tmp_path: Path, clock: Clock) -> None:
    _, secret = store.add("dash", read=ALL, write=frozenset({8001}), expires_in=3600)
    again = reload(tmp_path, clock)
    assert [r.api() for r in again.list()] == [r.api() for r in store.list()]
    grant = again.verify(secret, T0 + 10)
    assert isinstance(grant, Grant) and grant.read == ALL and grant.expires == T0 + 3600
    assert file_doc(tmp_path)["version"] == 1


def test_names_are_unique_and_checked(store: TokenStore) -> None:
    store.add("dash")
    with pytest.raises(TokenExists, match="token dash already exists"):
        store.add("dash")
    for bad in ["", "a b", "x" * 65, "../etc", "dash\n"]:
        with pytest.raises(ValueError, match="invalid token name"):
            store.add(bad)
    for expires_in in [0, -1, True, float("nan"), float("inf"), 10**12, "60"]:
        with pytest.raises(ValueError, match="expires_in"):
            store.add("x", expires_in=expires_in)  # type: ignore[arg-type]
    for ports in [frozenset({0}), frozenset({70000}), "all", [8001]]:
        with pytest.raises(ValueError, match="ports"):
            store.add("x", read=ports)  # type: ignore[arg-type]
    assert [r.name for r in store.list()] == ["dash"]


def test_refusal_reasons(store: TokenStore, clock: Clock) -> None:
    _, short = store.add("short", expires_in=60)
    _, gone = store.add("gone")
    record = store.remove("gone")
    assert record.name == "gone"
    assert store.verify(short, T0 + 59.9) == Grant(
        "short", read=ALL, expires=T0 + 60, token_id=store.get("short").token_id
    )
    assert store.verify(short, T0 + 60) == AuthFailure("expired", "short")
    assert store.verify(gone, T0) == AuthFailure("revoked", "gone")
    assert store.verify("rlyd_" + "A" * 43, T0) == AuthFailure("invalid")
    assert store.verify(short + "x", T0) == AuthFailure("invalid")
    assert store.verify(short[:-1], T0) == AuthFailure("invalid")
    assert store.verify("rlyd_" + "A" * 100_000, T0) == AuthFailure("invalid")
    assert store.verify("rlyd_\udcff", T0) == AuthFailure("invalid")
    with pytest.raises(TokenNotFound, match="token gone does not exist"):
        store.remove("gone")
    with pytest.raises(TokenNotFound):
        store.get("nobody")


def test_a_removed_name_can_be_reused_with_a_new_secret(store: TokenStore) -> None:
    old_record, old = store.add("dash")
    store.remove("dash")
    new_record, new = store.add("dash")
    assert store.verify(old, T0) == AuthFailure("revoked", "dash")
    grant = store.verify(new, T0)
    assert isinstance(grant, Grant) and grant.token_id == new_record.token_id
    assert old_record.token_id != new_record.token_id


def test_revocation_is_remembered_for_this_run_only(
    store: TokenStore, tmp_path: Path, clock: Clock
) -> None:
    _, secret = store.add("dash")
    store.remove("dash")
    assert reload(tmp_path, clock).verify(secret, T0) == AuthFailure("invalid")


def test_last_used_is_kept_in_memory_and_written_lazily(
    store: TokenStore, tmp_path: Path, clock: Clock
) -> None:
    _, secret = store.add("dash")
    clock.t = T0 + 5
    assert isinstance(store.verify(secret, clock.t), Grant)
    assert store.get("dash").api()["last_used"] == "2025-06-15T15:06:45Z"
    assert file_doc(tmp_path)["tokens"][0]["last_used"] is None  # not yet on disk
    clock.t = T0 + 30
    store.verify(secret, clock.t)
    assert file_doc(tmp_path)["tokens"][0]["last_used"] is None
    clock.t = T0 + 61
    store.verify(secret, clock.t)  # a minute after the last write
    assert file_doc(tmp_path)["tokens"][0]["last_used"] == "2025-06-15T15:07:41Z"
    clock.t = T0 + 70
    store.verify(secret, clock.t)
    store.add("other")  # any save carries it
    assert file_doc(tmp_path)["tokens"][0]["last_used"] == "2025-06-15T15:07:50Z"
    clock.t = T0 + 80
    store.verify(secret, clock.t)
    store.flush()  # at shutdown
    assert reload(tmp_path, clock).get("dash").api()["last_used"] == "2025-06-15T15:08:00Z"
    assert ISO.fullmatch(store.get("dash").api()["created"])


def test_a_failed_lazy_write_is_logged_and_retried(
    store: TokenStore, tmp_path: Path, clock: Clock, monkeypatch: pytest.MonkeyPatch
) -> None:
    _, secret = store.add("dash")

    def full(*args: Any) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(relayd.atomicfile, "write_atomic", full)
    monkeypatch.setattr(relayd.tokens, "write_atomic", full)
    clock.t = T0 + 61
    assert isinstance(store.verify(secret, clock.t), Grant)  # authentication goes on
    monkeypatch.undo()
    clock.t = T0 + 62
    store.verify(secret, clock.t)
    assert file_doc(tmp_path)["tokens"][0]["last_used"] is None  # retried only a minute later
    clock.t = T0 + 122
    store.verify(secret, clock.t)
    assert file_doc(tmp_path)["tokens"][0]["last_used"] is not None


def test_a_failed_save_changes_nothing(
    store: TokenStore, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _, secret = store.add("dash")
    before = (tmp_path / TOKENS_FILE).read_bytes()

    def broken_replace(src: Any, dst: Any) -> None:
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(os, "replace", broken_replace)
    with pytest.raises(StateError, match="cannot write tokens file .*: input/output error"):
        store.add("new")
    with pytest.raises(StateError):
        store.remove("dash")
    monkeypatch.undo()
    assert (tmp_path / TOKENS_FILE).read_bytes() == before
    assert [r.name for r in store.list()] == ["dash"]
    assert isinstance(store.verify(secret, T0), Grant)  # not revoked: the removal failed
    assert list(tmp_path.iterdir()) == [tmp_path / TOKENS_FILE]  # no temp file left


class Crash(BaseException):
    """Stands in for SIGKILL: no cleanup runs."""


def test_a_save_killed_before_its_rename_leaves_the_old_file(
    store: TokenStore, tmp_path: Path, clock: Clock, monkeypatch: pytest.MonkeyPatch
) -> None:
    _, secret = store.add("dash")

    def crash(src: Any, dst: Any) -> None:
        raise Crash

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(Crash):
        store.add("new")
    monkeypatch.undo()
    leftovers = list(tmp_path.glob(f".{TOKENS_FILE}.tmp-*"))
    assert len(leftovers) == 1 and b"new" in leftovers[0].read_bytes()
    again = reload(tmp_path, clock)
    assert [r.name for r in again.list()] == ["dash"]
    assert isinstance(again.verify(secret, T0), Grant)
    assert not list(tmp_path.glob(f".{TOKENS_FILE}.tmp-*"))  # cleaned at load


def test_a_half_written_temp_file_of_another_process_is_ignored_and_removed(
    store: TokenStore, tmp_path: Path, clock: Clock
) -> None:
    _, secret = store.add("dash")
    (tmp_path / f".{TOKENS_FILE}.tmp-999999").write_bytes(b'{"version": 1, "tok')
    again = reload(tmp_path, clock)
    assert isinstance(again.verify(secret, T0), Grant)
    assert sorted(p.name for p in tmp_path.iterdir()) == [TOKENS_FILE]


@pytest.mark.parametrize(
    "content",
    [
        b"",
        b"not json",
        b"\xff\xfe\x00",
        b"[]",
        b"null",
        b'{"version": 1}',
        b'{"version": 1, "tokens": {}}',
        b'{"version": 1, "tokens": [], "extra": 1}',
        b'{"version": 0, "tokens": []}',
        b'{"version": true, "tokens": []}',
        b'{"version": "2", "tokens": []}',
        b'{"version": 1, "tokens": [1]}',
        b'{"version": 1, "tokens": [{"name": "a"}]}',
        b"[" * 100_000 + b"]" * 100_000,
    ],
)
def test_a_corrupt_file_is_set_aside_and_none_of_its_tokens_is_valid(
    store: TokenStore,
    tmp_path: Path,
    clock: Clock,
    content: bytes,
    caplog: pytest.LogCaptureFixture,
) -> None:
    _, secret = store.add("dash")
    (tmp_path / TOKENS_FILE).write_bytes(content)
    again = reload(tmp_path, clock)
    assert again.verify(secret, T0) == AuthFailure("invalid")
    assert again.list() == [] and again.locked is None
    aside = list(tmp_path.glob(f"{TOKENS_FILE}.corrupt-*"))
    assert len(aside) == 1 and aside[0].read_bytes() == content
    assert not (tmp_path / TOKENS_FILE).exists()
    assert f"tokens file {tmp_path / TOKENS_FILE} is corrupt" in caplog.text
    # Recovery: new tokens go into a fresh file; the corrupt one is kept.
    _, fresh = again.add("dash")
    assert isinstance(again.verify(fresh, T0), Grant)
    assert aside[0].read_bytes() == content


def corrupt_record(store: TokenStore, tmp_path: Path, **change: Any) -> None:
    store.add("dash")
    store.add("two")
    doc = file_doc(tmp_path)
    doc["tokens"][0].update(change)
    (tmp_path / TOKENS_FILE).write_text(json.dumps(doc))


@pytest.mark.parametrize(
    "change",
    [
        {"name": "bad name"},
        {"name": "two"},  # duplicate name
        {"sha256": "zz"},
        {"sha256": "A" * 64},
        {"read": "all"},
        {"write": [0]},
        {"created": "yesterday"},
        {"created": "2025-06-15T15:06:40"},  # no time zone
        {"created": None},
        {"expires": 12},
        {"last_used": "9" * 100},
        {"secret": "rlyd_x"},  # unknown key
    ],
)
def test_a_bad_record_makes_the_whole_file_corrupt(
    store: TokenStore, tmp_path: Path, clock: Clock, change: dict[str, Any]
) -> None:
    corrupt_record(store, tmp_path, **change)
    again = reload(tmp_path, clock)
    assert again.list() == []
    assert len(list(tmp_path.glob(f"{TOKENS_FILE}.corrupt-*"))) == 1


def test_a_duplicate_digest_is_corrupt(store: TokenStore, tmp_path: Path, clock: Clock) -> None:
    store.add("dash")
    store.add("two")
    doc = file_doc(tmp_path)
    doc["tokens"][1]["sha256"] = doc["tokens"][0]["sha256"]
    (tmp_path / TOKENS_FILE).write_text(json.dumps(doc))
    assert reload(tmp_path, clock).list() == []


def test_a_file_from_a_newer_relayd_is_left_alone_and_fails_closed(
    store: TokenStore, tmp_path: Path, clock: Clock, caplog: pytest.LogCaptureFixture
) -> None:
    _, secret = store.add("dash")
    doc = file_doc(tmp_path)
    doc["version"] = 2
    doc["groups"] = ["new things"]
    content = json.dumps(doc).encode()
    (tmp_path / TOKENS_FILE).write_bytes(content)
    again = reload(tmp_path, clock)
    assert again.locked is not None and "newer relayd (version 2" in again.locked
    assert "newer relayd" in caplog.text
    assert again.verify(secret, T0) == AuthFailure("invalid")
    assert again.list() == []
    with pytest.raises(StateError, match="newer relayd.*fix or remove it and restart"):
        again.add("other")
    with pytest.raises(StateError):
        again.remove("dash")
    again.flush()
    assert (tmp_path / TOKENS_FILE).read_bytes() == content  # not moved, not overwritten
    assert sorted(p.name for p in tmp_path.iterdir()) == [TOKENS_FILE]


def test_an_unreadable_file_fails_closed_and_is_not_overwritten(
    tmp_path: Path, clock: Clock
) -> None:
    (tmp_path / TOKENS_FILE).mkdir()  # unreadable even for root
    store = reload(tmp_path, clock)
    assert store.locked is not None and "unreadable" in store.locked
    assert store.verify("rlyd_" + "A" * 43, T0) == AuthFailure("invalid")
    with pytest.raises(StateError, match="unreadable"):
        store.add("dash")
    assert (tmp_path / TOKENS_FILE).is_dir()


def test_a_corrupt_file_that_cannot_be_moved_aside_locks_the_store(
    store: TokenStore, tmp_path: Path, clock: Clock, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / TOKENS_FILE).write_bytes(b"garbage")

    def refuse(src: Any, dst: Any) -> None:
        raise OSError(30, "Read-only file system")

    monkeypatch.setattr(os, "replace", refuse)
    again = reload(tmp_path, clock)
    monkeypatch.undo()
    assert again.locked is not None and "cannot be moved aside" in again.locked
    with pytest.raises(StateError, match="read-only file system"):
        again.add("dash")
    assert (tmp_path / TOKENS_FILE).read_bytes() == b"garbage"


def test_a_file_readable_by_others_is_reported_and_tightened_on_the_next_save(
    store: TokenStore, tmp_path: Path, clock: Clock, caplog: pytest.LogCaptureFixture
) -> None:
    store.add("dash")
    (tmp_path / TOKENS_FILE).chmod(0o644)
    again = reload(tmp_path, clock)
    assert "has mode 644" in caplog.text
    again.add("two")
    assert stat.S_IMODE((tmp_path / TOKENS_FILE).stat().st_mode) == 0o600
