"""The MQTT spool against a simple model: append/flush/read/ack/rewind/sync/reopen/crash.

The model is a list of records in append order. A clean reopen keeps everything
from the first un-acked record on (at least once: later acks are forgotten); a
crash keeps the flushed records from the first one un-acked at the last sync.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from relayd import spool as spool_mod
from relayd.spool import Spool
from tests.helpers import examples


@dataclass
class Rec:
    seq: int  # the model's own numbering; the payload carries it
    topic: str
    payload: bytes
    flushed: bool = False
    acked: bool = False
    handed: int = -1  # the spool's id once read() handed it out


def abandon(s: Spool) -> None:
    """Drop a spool as kill -9 would: its fds closed, nothing flushed, synced or committed."""
    for fd in [s._fd, s._rd_fd, *s._retired]:
        if fd >= 0:
            os.close(fd)


class SpoolModel(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.dir = Path(tempfile.mkdtemp(prefix="spool-model-")) / "spool"
        self.saved_cache = spool_mod.CACHE_RECORDS
        spool_mod.CACHE_RECORDS = 3  # most reads go to the disk
        self.spool = self.open()
        self.recs: list[Rec] = []
        self.cursor = 0  # index in recs after the last record handed out
        self.committed = 0  # seq of the first record un-acked at the last sync
        self.seq = 0

    def open(self) -> Spool:
        return Spool.open(self.dir, max_bytes=1 << 30, segment_bytes=200)

    def teardown(self) -> None:
        self.spool.close()
        spool_mod.CACHE_RECORDS = self.saved_cache
        shutil.rmtree(self.dir.parent)

    def first_unacked(self) -> int:
        return next((r.seq for r in self.recs if not r.acked), self.seq)

    @rule(
        topic=st.sampled_from(["a", "relayd/gw/8001", "t/ü"]),
        extra=st.binary(max_size=40),
        n=st.integers(1, 6),
    )
    def append(self, topic: str, extra: bytes, n: int) -> None:
        for _ in range(n):
            payload = b"%d|" % self.seq + extra
            self.recs.append(Rec(self.seq, topic, payload))
            self.seq += 1
            self.spool.append(topic, payload)

    @rule()
    def flush(self) -> None:
        self.spool.flush()
        for r in self.recs:
            r.flushed = True

    @rule(k=st.integers(1, 12))
    def read(self, k: int) -> None:
        got = self.spool.read(k)
        expected: list[Rec] = []
        i = self.cursor
        while i < len(self.recs) and len(expected) < k:
            if not self.recs[i].acked:
                expected.append(self.recs[i])
            i += 1
        assert [(r.topic, r.payload) for r in got] == [(r.topic, r.payload) for r in expected]
        if expected:
            self.cursor = self.recs.index(expected[-1]) + 1
        for r, m in zip(got, expected, strict=True):
            assert m.handed in (-1, r.id)  # the same record keeps its id
            m.handed = r.id

    @precondition(lambda self: any(r.handed >= 0 and not r.acked for r in self.recs))
    @rule(data=st.data())
    def ack(self, data: st.DataObject) -> None:
        r = data.draw(st.sampled_from([r for r in self.recs if r.handed >= 0 and not r.acked]))
        self.spool.ack(r.handed)
        r.acked = True

    @rule()
    def rewind(self) -> None:
        self.spool.rewind()
        self.cursor = 0

    @rule()
    def sync(self) -> None:
        asyncio.run(self.spool.sync())
        self.committed = self.first_unacked()

    @rule()
    def reopen(self) -> None:
        self.spool.close()
        self.restart(self.first_unacked(), flushed_only=False)

    @rule()
    def crash(self) -> None:
        abandon(self.spool)
        self.restart(self.committed, flushed_only=True)

    def restart(self, keep_from: int, *, flushed_only: bool) -> None:
        self.recs = [
            Rec(r.seq, r.topic, r.payload, flushed=True)
            for r in self.recs
            if r.seq >= keep_from and (r.flushed or not flushed_only)
        ]
        self.committed = keep_from
        self.spool = self.open()
        got = self.spool.read(len(self.recs) + 1)
        assert [r.payload for r in got] == [r.payload for r in self.recs]
        for r, m in zip(got, self.recs, strict=True):
            m.handed = r.id  # known, so new records must get higher ids
        self.spool.rewind()
        self.cursor = 0

    @invariant()
    def ids_increase(self) -> None:
        ids = [r.handed for r in self.recs if r.handed >= 0]
        assert ids == sorted(set(ids))

    @invariant()
    def counts(self) -> None:
        assert self.spool.messages == sum(not r.acked for r in self.recs)
        assert self.spool.write_errors == 0
        assert self.spool.dropped == 0
        assert self.spool.corrupt == 0


# 60 runs of up to 40 steps with RELAYD_TEST_THOROUGH=1 (`make test-thorough`), 15 in
# `make test`, like the other property tests (tests/helpers.py examples()).
SpoolModel.TestCase.settings = settings(
    max_examples=examples(60), stateful_step_count=40, deadline=None, derandomize=False
)
test_spool_against_model = SpoolModel.TestCase
