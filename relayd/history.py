"""Per-port history: the last messages of each port, numbered, for ``?last`` and ``?since``.

The hub owns one ``History``. Every message a port relays gets the next
sequence number of that port (1, 2, ...) in ``Hub.publish``, where it is
encoded; the ring keeps the raw bytes with the batch's time and source, so a
replay can build bare frames or JSON envelopes exactly as they were sent live.

A ring keeps at most ``history`` messages and ``history_max_bytes`` bytes
(each message counts its length plus ``ENTRY_OVERHEAD``, about what Python
holds per kept message), evicting the oldest first. Sequence numbers are not
stored: the ring's messages are consecutive, ending at ``seq``.

History belongs to the port number (relayd.toml(5), ``history``): a listener
replaced on reload keeps it; a removed port loses it, and its numbering
continues if the port is added again within the same epoch.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass
from itertools import islice, repeat
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from relayd.hub import Source

# Bytes counted per kept message on top of its length: what Python holds for it
# besides the payload (the bytes object's header, two deque slots, and at worst a
# (time, source) tuple of its own), measured with tracemalloc at about 132 bytes.
# Counting it keeps the memory held within history_max_bytes also for tiny messages.
ENTRY_OVERHEAD = 136

Meta = tuple[float, "Source"]  # one per published batch: time.time() and the device
Snapshot = tuple[int, list[bytes], list[Meta]]  # first seq, messages, their metas


@dataclass(frozen=True, slots=True)
class Replay:
    """What a new subscription asked to be sent before live messages."""

    last: int = 0  # the last N kept messages of each subscribed port without ``since``
    since: tuple[tuple[int, str, int], ...] = ()  # (port, epoch, seq), one per port


class Ring:
    """One port's kept messages, oldest first, and its last sequence number."""

    __slots__ = ("messages", "metas", "nbytes", "seq", "limit", "max_bytes")

    def __init__(self, limit: int, max_bytes: int, seq: int = 0) -> None:
        self.messages: deque[bytes] = deque()
        self.metas: deque[Meta] = deque()
        self.nbytes = 0
        self.seq = seq  # the number of the last message relayed (0: none yet)
        self.limit = limit
        self.max_bytes = max_bytes

    def __len__(self) -> int:
        return len(self.messages)

    @property
    def first_seq(self) -> int:
        """The oldest kept message's number; ``seq + 1`` (the next one) when none is kept."""
        return self.seq - len(self.messages) + 1

    def add(self, messages: list[bytes], meta: Meta) -> None:
        """Number ``messages`` and keep them, evicting the oldest beyond the limits."""
        n = len(messages)
        self.seq += n
        if self.limit == 0:
            return
        kept = self.messages
        kept.extend(messages)
        self.metas.extend(repeat(meta, n))
        self.nbytes += sum(map(len, messages)) + ENTRY_OVERHEAD * n
        if len(kept) > self.limit or self.nbytes > self.max_bytes:
            self._evict()

    def _evict(self) -> None:
        kept, metas = self.messages, self.metas
        nbytes = self.nbytes
        limit, max_bytes = self.limit, self.max_bytes
        while kept and (len(kept) > limit or nbytes > max_bytes):
            nbytes -= len(kept.popleft()) + ENTRY_OVERHEAD
            metas.popleft()
        self.nbytes = nbytes

    def configure(self, limit: int, max_bytes: int) -> None:
        self.limit = limit
        self.max_bytes = max_bytes
        self._evict()

    def snapshot(self, seq: int) -> Snapshot:
        """The kept messages numbered above ``seq``: copies of the references, not the bytes."""
        start = max(0, seq - self.first_seq + 1)
        return (
            self.first_seq + start,
            list(islice(self.messages, start, None)),
            list(islice(self.metas, start, None)),
        )

    def after(self, seq: int) -> Iterator[tuple[int, bytes, Meta]]:
        """The kept messages numbered above ``seq``, oldest first, with number and meta."""
        start = max(0, seq - self.first_seq + 1)
        number = self.first_seq + start
        for offset, (message, meta) in enumerate(
            zip(islice(self.messages, start, None), islice(self.metas, start, None), strict=True)
        ):
            yield number + offset, message, meta


class History:
    """Every port's ring, and the last number of each port removed in this epoch."""

    def __init__(self, epoch: str, limit: int, max_bytes: int) -> None:
        self.epoch = epoch
        self.limit = limit
        self.max_bytes = max_bytes
        self.rings: dict[int, Ring] = {}
        self._removed: dict[int, int] = {}  # port -> last seq, so numbering continues

    def ring(self, port: int) -> Ring:
        """The port's ring, made on its first message."""
        ring = self.rings.get(port)
        if ring is None:
            seq = self._removed.pop(port, 0)
            ring = self.rings[port] = Ring(self.limit, self.max_bytes, seq)
        return ring

    def peek(self, port: int) -> Ring:
        """The port's ring if it has one, else an empty one with its numbering (not kept)."""
        ring = self.rings.get(port)
        if ring is None:
            ring = Ring(self.limit, self.max_bytes, self._removed.get(port, 0))
        return ring

    def drop(self, port: int) -> None:
        """The port was removed: forget its messages, remember its last number."""
        ring = self.rings.pop(port, None)
        if ring is not None:
            self._removed[port] = ring.seq

    def configure(self, limit: int, max_bytes: int) -> None:
        self.limit = limit
        self.max_bytes = max_bytes
        for ring in self.rings.values():
            ring.configure(limit, max_bytes)

    @property
    def nbytes(self) -> dict[int, int]:
        return {port: ring.nbytes for port, ring in sorted(self.rings.items())}
