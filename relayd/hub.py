"""The one fan-out hub: device messages in, WebSocket frames out.

``Hub.publish`` is synchronous and never waits for a client. Each message is
encoded into a WebSocket frame once (and into a JSON envelope once, when a
client asked for envelopes); the same bytes go to every subscriber. Each
subscriber has its own queue: frames published during one event-loop
iteration are written to its transport in one call at the end of that
iteration. Passes over the clients start at most once per ``FLUSH_INTERVAL``
(relayd(8), "Relaying"): a message after a quiet spell goes out at the end of
the iteration that read it, messages that follow sooner wait for the rest of
the interval and go together, so a busy port costs one system call per client
and interval, not one per message. With thousands of clients a pass is long
(one system call per client), so it writes ``FLUSH_CHUNK`` clients per loop
iteration: a message read from a device meanwhile joins the queues of the
clients the pass has not reached yet and goes out with it, and the others get
it in the next pass. While a client's transport is paused (its socket is not
keeping up), its queue holds at most ``queue_size`` messages from one pass to
the next and the overflow policy applies to that client alone: drop its oldest
messages and count them, or close it with 1008.

Every message also gets its port's next sequence number and is kept in that
port's history ring (``relayd.history``) before it is fanned out; a new
subscription can ask for a replay, which is queued ahead of any live frame.
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import struct
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Literal, Protocol

from relayd.history import History, Meta, Replay, Snapshot

REPLAY_CHUNK = 256  # replayed messages encoded and sent per event-loop iteration
FLUSH_CHUNK = 128  # clients written per event-loop iteration (see the module docstring)
FLUSH_INTERVAL = 0.002  # passes start at most this often, in seconds (module docstring)

logger = logging.getLogger(__name__)

OP_TEXT = 0x1
OP_BINARY = 0x2

CLOSE_GOING_AWAY = 1001
CLOSE_POLICY_VIOLATION = 1008
CLOSE_TRY_AGAIN_LATER = 1013


# The 2-byte headers of short frames, by opcode and payload length: most line
# messages are short, and a table lookup is the cheapest header there is.
_SHORT_HEADERS = {
    opcode: tuple(bytes((0x80 | opcode, n)) for n in range(126)) for opcode in (OP_TEXT, OP_BINARY)
}
_TEXT_HEADERS = _SHORT_HEADERS[OP_TEXT]


def encode_frame(payload: bytes, opcode: int) -> bytes:
    """One unmasked, unfragmented server-to-client frame (RFC 6455 §5.2)."""
    n = len(payload)
    if n < 126:
        return _SHORT_HEADERS[opcode][n] + payload
    if n < 65536:
        return struct.pack("!BBH", 0x80 | opcode, 126, n) + payload
    return struct.pack("!BBQ", 0x80 | opcode, 127, n) + payload


def is_utf8(data: bytes) -> bool:
    if data.isascii():
        return True
    try:
        data.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


def call_when_due(
    loop: asyncio.AbstractEventLoop, due: float, callback: Callable[[], None]
) -> asyncio.Handle:
    """Run ``callback`` at the end of this loop iteration, or at loop time ``due`` if later.

    The rate rule of the hub's passes and of the device outbox (relayd(8)):
    after a quiet spell at once, otherwise when the interval is up.
    """
    if loop.time() >= due:
        return loop.call_soon(callback)
    return loop.call_at(due, callback)


def _ts_text(ts: float) -> bytes:
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ").encode()


class Sink(Protocol):
    """What the hub needs of one WebSocket connection."""

    def send_frames(self, frames: list[bytes]) -> None: ...

    def close(self, code: int, reason: str) -> None: ...

    def abort(self) -> None: ...


@dataclass(frozen=True, slots=True)
class Source:
    """Where a batch of messages came from: one device connection."""

    port: int
    name: str | None
    peer: str
    device: str | None = None  # the TLS client certificate's CN, when the port asks for one
    # The envelope's head, made when first needed: a device that stays silent, or
    # whose port no JSON client reads, costs none (thousands of idle connections).
    _json_prefix: bytes = field(default=b"", init=False, repr=False, compare=False)

    @property
    def json_prefix(self) -> bytes:
        prefix = self._json_prefix
        if not prefix:
            fields: dict[str, object] = {"port": self.port, "name": self.name, "peer": self.peer}
            if self.device is not None:
                fields["device"] = self.device
            prefix = (json.dumps(fields)[:-1] + ', "ts": "').encode()
            object.__setattr__(self, "_json_prefix", prefix)
        return prefix


class Tap(Protocol):
    """One more consumer of every message, fed synchronously (the MQTT uplink)."""

    json: bool

    def publish(self, port: int, name: str | None, payloads: list[bytes]) -> None: ...


class HubFull(Exception):
    pass


class HubClosed(Exception):
    pass


class Subscription:
    """One client's bounded queue of encoded frames."""

    __slots__ = (
        "_hub",
        "sink",
        "ports",
        "json",
        "queue",
        "scheduled",
        "paused",
        "closed",
        "dropped",
        "replay",
        "batch",
        "batch_timer",
    )

    def __init__(
        self,
        hub: Hub,
        sink: Sink,
        ports: frozenset[int] | None,
        json: bool,
        batch: float = 0.0,
    ) -> None:
        self._hub = hub
        self.sink = sink
        self.ports = ports
        self.json = json
        self.queue: list[bytes] = []
        self.scheduled = False
        self.paused = False
        self.closed = False
        self.dropped = 0
        # Replayed history still to send, a chunk of frames at a time, ahead of ``queue``.
        self.replay: Iterator[list[bytes]] | None = None
        # ``?batch_ms=``: write at most once per ``batch`` seconds (a status page need
        # not be woken for every message); 0: at the end of every loop iteration.
        self.batch = batch
        self.batch_timer: asyncio.TimerHandle | None = None

    def pause(self) -> None:
        """The client's transport buffer is full: keep frames here, bounded."""
        self.paused = True

    def resume(self) -> None:
        self.paused = False
        if (self.queue or self.replay is not None) and not self.scheduled:
            self.flush()

    def flush(self) -> None:
        if self.replay is not None and self._flush_replay():
            return
        queue = self.queue
        if not queue:
            return
        if self.closed:
            queue.clear()
            return
        hub = self._hub
        if self.paused and not hub.closing:
            excess = len(queue) - hub.queue_size
            if excess > 0:
                self._overflow(excess)
            return
        if self.batch and not hub.closing and len(queue) < hub.queue_size:
            if self.batch_timer is None:
                self.batch_timer = hub._loop.call_later(self.batch, self._batch_due)
            return
        self.queue = []
        self._hub.messages_sent += len(queue)
        self.sink.send_frames(queue)

    def _batch_due(self) -> None:
        self.batch_timer = None
        batch, self.batch = self.batch, 0.0
        try:
            self.flush()
        finally:
            self.batch = batch

    def _flush_replay(self) -> bool:
        """Send the next chunk of the replay; True while some of it is left.

        One chunk per event-loop iteration, so a long replay never holds up the
        other clients; live frames wait in ``queue`` meanwhile, under the same
        bound and policy as a slow client's.
        """
        assert self.replay is not None
        hub = self._hub
        if self.closed:
            self.replay = None
            return False
        if hub.closing:  # the last flush before the close: everything, now
            frames = [frame for chunk in self.replay for frame in chunk]
            self.replay = None
            hub.messages_sent += len(frames)
            self.sink.send_frames(frames)
            return False
        excess = len(self.queue) - hub.queue_size
        if excess > 0:
            self._overflow(excess)
            if self.closed:
                return True
        if self.paused:
            return True
        chunk = next(self.replay, None)
        if chunk is None:
            self.replay = None
            return False
        hub.messages_sent += len(chunk)
        self.sink.send_frames(chunk)
        hub.schedule(self)
        return True

    def _overflow(self, excess: int) -> None:
        hub = self._hub
        if hub.slow_client == "drop":
            if self.dropped == 0:
                logger.warning("websocket client too slow: dropping its oldest messages")
            del self.queue[:excess]
            self.dropped += excess
            hub.dropped["queue_full"] += excess
        else:
            logger.warning("websocket client too slow: disconnecting it (1008)")
            hub.dropped["slow_client_disconnected"] += len(self.queue)
            self.queue.clear()
            self.close(CLOSE_POLICY_VIOLATION, "client too slow")

    def close(self, code: int, reason: str) -> None:
        if not self.closed:
            self.closed = True
            self._cancel_batch()
            self.sink.close(code, reason)

    def _cancel_batch(self) -> None:
        if self.batch_timer is not None:
            self.batch_timer.cancel()
            self.batch_timer = None


class Hub:
    def __init__(
        self,
        *,
        queue_size: int,
        slow_client: Literal["drop", "disconnect"],
        max_clients: int,
        epoch: str = "",
        history: int = 0,
        history_max_bytes: int = 0,
        on_change: Callable[[], None] = lambda: None,
        flush_interval: float = FLUSH_INTERVAL,
    ) -> None:
        self._loop = asyncio.get_running_loop()
        self._flush_interval = flush_interval
        self.epoch = epoch
        self.history = History(epoch, history, history_max_bytes)
        self._epoch_seq = b'", "epoch": ' + json.dumps(epoch).encode() + b', "seq": '
        self._on_change = on_change  # the set of clients changed (STATUS= is debounced there)
        self.tap: Tap | None = None  # the MQTT uplink, when [mqtt] is on
        self.rejected = 0  # subscriptions refused over max_clients
        self.queue_size = queue_size
        self.slow_client = slow_client
        self.max_clients = max_clients
        self.closing = False
        self.messages_sent = 0
        self.dropped: dict[str, int] = {"queue_full": 0, "slow_client_disconnected": 0}
        self._subs: set[Subscription] = set()
        self._targets: dict[int, tuple[list[Subscription], list[Subscription]]] = {}
        self._dirty: list[Subscription] = []  # to write in the next pass
        self._pass: list[Subscription] = []  # the pass under way, written up to _pass_at
        self._pass_at = 0
        self._flush_handle: asyncio.Handle | None = None
        self._next_pass = 0.0  # loop time before which no new pass starts
        self._empty = asyncio.Event()
        self._empty.set()

    def configure(
        self,
        *,
        queue_size: int,
        slow_client: Literal["drop", "disconnect"],
        max_clients: int,
        history: int | None = None,
        history_max_bytes: int | None = None,
    ) -> None:
        """Apply a reloaded ``[relay]`` section from now on (history limits: at once)."""
        self.queue_size = queue_size
        self.slow_client = slow_client
        self.max_clients = max_clients
        if history is not None and history_max_bytes is not None:
            self.history.configure(history, history_max_bytes)

    @property
    def clients(self) -> int:
        return len(self._subs)

    def subscribe(
        self, sink: Sink, ports: Iterable[int] | None, json: bool, batch: float = 0.0
    ) -> Subscription:
        """Register a client; call before the handshake completes so nothing is missed."""
        if self.closing:
            raise HubClosed
        if len(self._subs) >= self.max_clients:
            self.rejected += 1
            raise HubFull
        sub = Subscription(self, sink, frozenset(ports) if ports is not None else None, json, batch)
        self._subs.add(sub)
        self._targets.clear()
        self._empty.clear()
        self._on_change()
        return sub

    def unsubscribe(self, sub: Subscription) -> None:
        sub.closed = True
        sub.queue.clear()
        sub._cancel_batch()
        if sub in self._subs:
            self._subs.discard(sub)
            self._targets.clear()
            if not self._subs:
                self._empty.set()
            self._on_change()

    def _targets_for(self, port: int) -> tuple[list[Subscription], list[Subscription]]:
        targets = self._targets.get(port)
        if targets is None:
            subs = [s for s in self._subs if s.ports is None or port in s.ports]
            targets = ([s for s in subs if not s.json], [s for s in subs if s.json])
            self._targets[port] = targets
        return targets

    def publish(self, source: Source, messages: list[bytes], all_text: bool = False) -> None:
        """Queue ``messages`` for every subscriber of ``source.port``; never blocks.

        ``all_text``: the caller knows every message is valid UTF-8.
        """
        port = source.port
        ring = self.history.rings.get(port)
        if ring is None:
            ring = self.history.ring(port)
        first_seq = ring.seq + 1
        now = time.time()
        ring.add(messages, (now, source))
        bodies = None
        tap = self.tap
        if tap is not None:  # the MQTT uplink (relayd.mqtt): raw messages or envelopes
            if tap.json:
                bodies = self._envelope_bodies(source, now, first_seq, messages)
            tap.publish(port, source.name, messages if bodies is None else bodies)
        bare, envelope = self._targets_for(port)
        if not bare and not envelope:
            return
        dirty = self._dirty
        if bare:
            if all_text:
                headers = _TEXT_HEADERS
                frames = [
                    headers[len(m)] + m if len(m) < 126 else encode_frame(m, OP_TEXT)
                    for m in messages
                ]
            else:
                frames = [encode_frame(m, OP_TEXT if is_utf8(m) else OP_BINARY) for m in messages]
            for sub in bare:
                sub.queue += frames
                if not sub.scheduled:
                    sub.scheduled = True
                    dirty.append(sub)
        if envelope:
            if bodies is None:
                bodies = self._envelope_bodies(source, now, first_seq, messages)
            frames = [encode_frame(body, OP_TEXT) for body in bodies]
            for sub in envelope:
                sub.queue += frames
                if not sub.scheduled:
                    sub.scheduled = True
                    dirty.append(sub)
        if self._flush_handle is None:
            self._wake()

    def _envelopes(
        self, source: Source, ts: float, first_seq: int, messages: Iterable[bytes]
    ) -> list[bytes]:
        bodies = self._envelope_bodies(source, ts, first_seq, messages)
        return [encode_frame(body, OP_TEXT) for body in bodies]

    def _envelope_bodies(
        self, source: Source, ts: float, first_seq: int, messages: Iterable[bytes]
    ) -> list[bytes]:
        """The JSON envelopes (relayd(8), JSON ENVELOPE), encoded once per batch."""
        head = source.json_prefix + _ts_text(ts) + self._epoch_seq
        bodies = []
        for seq, m in enumerate(messages, first_seq):
            try:
                body = b', "data": ' + json.dumps(m.decode("utf-8")).encode() + b"}"
            except UnicodeDecodeError:
                body = b', "data_b64": "' + base64.b64encode(m) + b'"}'
            bodies.append(head + str(seq).encode() + body)
        return bodies

    # Replay

    def replay(self, sub: Subscription, request: Replay) -> None:
        """Send ``request``'s kept messages to ``sub`` before any live frame.

        Call right after ``subscribe``, in the same callback: ``publish`` is
        synchronous, so no message falls between the replay and the live
        frames, and none is sent twice (relayd(8), HISTORY AND RECOVERY). What
        to replay is fixed here (references to the kept bytes); it is encoded
        and sent a chunk at a time by the subscription's flushes.
        """
        since = {port: (epoch, seq) for port, epoch, seq in request.since}
        if not since and request.last <= 0:
            return
        if sub.ports is not None:
            ports: Iterable[int] = sub.ports
        else:
            ports = sorted(set(self.history.rings) | set(since))
        plan: list[tuple[bytes | None, Snapshot]] = []
        for port in ports:
            ring = self.history.peek(port)
            status = None
            if port in since:
                epoch, seq = since[port]
                if epoch == self.epoch and ring.first_seq - 1 <= seq <= ring.seq:
                    fields: dict[str, object] = {"port": port, "recovered": True}
                else:
                    fields = {
                        "port": port,
                        "recovered": False,
                        "epoch": self.epoch,
                        "first_seq": ring.first_seq,
                    }
                    seq = ring.first_seq - 1
                status = encode_frame(json.dumps(fields).encode(), OP_TEXT)
            elif request.last > 0:
                seq = ring.seq - min(request.last, len(ring))
            else:
                continue
            plan.append((status, ring.snapshot(seq)))
        if plan:
            sub.replay = self._replay_chunks(plan, sub.json)
            self.schedule(sub)

    def _replay_chunks(
        self, plan: list[tuple[bytes | None, Snapshot]], as_json: bool
    ) -> Iterator[list[bytes]]:
        """The replay's frames, as they were sent live, ``REPLAY_CHUNK`` messages at a time."""
        for status, (first_seq, messages, metas) in plan:
            chunk = [status] if status is not None else []
            for start in range(0, len(messages), REPLAY_CHUNK):
                batch = messages[start : start + REPLAY_CHUNK]
                if as_json:
                    chunk += self._replay_envelopes(
                        first_seq + start, batch, metas[start : start + REPLAY_CHUNK]
                    )
                else:
                    chunk += [encode_frame(m, OP_TEXT if is_utf8(m) else OP_BINARY) for m in batch]
                yield chunk
                chunk = []
            if chunk:
                yield chunk

    def _replay_envelopes(self, seq: int, messages: list[bytes], metas: list[Meta]) -> list[bytes]:
        """Envelopes of consecutive messages, one ``_envelopes`` call per published batch."""
        frames: list[bytes] = []
        start = 0
        for i in range(1, len(messages) + 1):
            if i == len(messages) or metas[i] is not metas[start]:
                ts, source = metas[start]
                frames += self._envelopes(source, ts, seq + start, messages[start:i])
                start = i
        return frames

    def schedule(self, sub: Subscription) -> None:
        """Flush ``sub`` at the end of this event-loop iteration."""
        if not sub.scheduled:
            sub.scheduled = True
            self._dirty.append(sub)
        if self._flush_handle is None:
            self._wake()

    def _wake(self) -> None:
        """Schedule the next flush: a pass under way goes on, a new one waits its turn."""
        due = 0.0 if self._pass else self._next_pass
        self._flush_handle = call_when_due(self._loop, due, self._flush)

    def _flush(self) -> None:
        """Write the next ``FLUSH_CHUNK`` clients of the pass; start a pass when none is left.

        A client whose frames this pass has not written yet is still ``scheduled``:
        what is published in between lands in its queue and goes out with this
        pass's write. One already written gets a place in the next pass.
        """
        self._flush_handle = None
        todo, start = self._pass, self._pass_at
        if start >= len(todo):
            todo, self._dirty, start = self._dirty, [], 0
            self._pass = todo
            self._next_pass = self._loop.time() + self._flush_interval
        end = start + FLUSH_CHUNK
        self._pass_at = end
        for sub in todo[start:end]:
            sub.scheduled = False
            sub.flush()
        if end >= len(todo):
            self._pass, self._pass_at = [], 0
        if (self._pass or self._dirty) and self._flush_handle is None:
            self._wake()

    async def close(self, timeout: float) -> None:
        """Flush every client's queue, close each with 1001, wait up to ``timeout`` for them."""
        self.closing = True
        if self._flush_handle is not None:
            self._flush_handle.cancel()
            self._flush_handle = None
        for sub in (*self._pass[self._pass_at :], *self._dirty):
            sub.scheduled = False
        self._pass, self._pass_at, self._dirty = [], 0, []
        for sub in list(self._subs):
            sub.flush()
            sub.close(CLOSE_GOING_AWAY, "relayd is stopping")
        try:
            async with asyncio.timeout(timeout):
                await self._empty.wait()
        except TimeoutError:
            logger.warning("%d websocket client(s) did not close in time", len(self._subs))
            for sub in list(self._subs):
                sub.sink.abort()
