"""Host-side device and WebSocket client for packaging/e2e/run.sh.

Runs in the container's network namespace (``nsenter -t PID -n``) with any
Python that has the ``websockets`` library (the repository's .venv).

    probe.py [--bearer TOKEN] COMMAND ARGS...

    --bearer TOKEN                        send "Authorization: Bearer TOKEN"
                                          with the HTTP and WebSocket requests
    probe.py accept HOST:PORT...          every port accepts a TCP connection
    probe.py http URL [STATUS]            GET URL answers STATUS (default 200)
    probe.py body URL                     GET URL answers 200; print all of it
    probe.py refused WS_URL STATUS        the WebSocket handshake is refused
                                          with HTTP STATUS, before the upgrade
    probe.py relay WS_URL HOST:PORT TEXT  a line sent by a device reaches a
                                          WebSocket client subscribed first
    probe.py closed WS_URL CODE REASON    subscribe, print READY, then expect
                                          the daemon to close the WebSocket
                                          with CODE and REASON; print the
                                          wall-clock time it did (CLOSED_AT=)
    probe.py drain WS_URL HOST:PORT       subscribe, connect a device, relay a
                                          line, send a partial line, print
                                          READY; then (while the daemon is
                                          stopped) expect the partial line,
                                          the device closed by the daemon and
                                          the WebSocket closed with 1001
    probe.py expect WS_URL TEXT           subscribe, print READY, then expect
                                          TEXT as the next message (a device
                                          outside the probe's reach sends it,
                                          e.g. on a serial line)

Exit status 0 when the expectation holds, 1 otherwise, with one line saying why.
"""

from __future__ import annotations

import asyncio
import sys
import time
import urllib.error
import urllib.request

from websockets.asyncio.client import ClientConnection, connect  # websockets >= 13
from websockets.exceptions import ConnectionClosed, InvalidStatus

TIMEOUT = 15.0
Headers = dict[str, str]  # --bearer: the Authorization header of every request


def ws_connect(url: str, headers: Headers) -> connect:
    return connect(url, additional_headers=headers, proxy=None, open_timeout=TIMEOUT)


def hostport(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    return host, int(port)


async def accept(targets: list[str]) -> str:
    for target in targets:
        host, port = hostport(target)
        async with asyncio.timeout(5):
            _, writer = await asyncio.open_connection(host, port)
        writer.close()
        await writer.wait_closed()
    return "accepted on " + " ".join(targets)


def get(url: str, status: int, headers: Headers) -> bytes:
    request = urllib.request.Request(url, headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=5) as answer:
            got, body = answer.status, answer.read()
    except urllib.error.HTTPError as error:
        got, body = error.code, error.read()
    if got != status:
        raise AssertionError(f"GET {url}: {got}, expected {status}: {body[:200]!r}")
    return bytes(body)


def http(url: str, status: int, headers: Headers) -> str:
    body = get(url, status, headers)
    return f"GET {url}: {status} {body[:200].decode(errors='replace')}"


def shown(url: str) -> str:
    """The URL without the secret, for the output."""
    if "access_token=" not in url:
        return url
    head, _, tail = url.partition("access_token=")
    return head + "access_token=***" + ("&" + tail.split("&", 1)[1] if "&" in tail else "")


async def refused(ws_url: str, status: int, headers: Headers) -> str:
    try:
        async with asyncio.timeout(TIMEOUT), ws_connect(ws_url, headers) as ws:
            await ws.close()
    except InvalidStatus as error:
        got = error.response.status_code
        body = error.response.body or b""
        if got != status:
            raise AssertionError(
                f"{shown(ws_url)}: refused with {got}, expected {status}: {body[:200]!r}"
            ) from None
        return f"{shown(ws_url)}: refused with {got} {body[:200].decode(errors='replace').strip()}"
    raise AssertionError(f"{shown(ws_url)}: upgraded, expected a refusal with {status}")


async def relay(ws_url: str, device: str, text: str, headers: Headers) -> str:
    async with asyncio.timeout(TIMEOUT), ws_connect(ws_url, headers) as ws:
        host, port = hostport(device)
        _, writer = await asyncio.open_connection(host, port)
        writer.write(text.encode() + b"\r\n")
        await writer.drain()
        got = await ws.recv()
        writer.close()
        await writer.wait_closed()
    if got != text:
        raise AssertionError(f"WebSocket got {got!r}, expected {text!r}")
    via = " (Authorization: Bearer)" if headers else ""
    return f"device -> {device} -> {shown(ws_url)}{via}: {got!r}"


async def closed(ws_url: str, code: int, reason: str, headers: Headers) -> str:
    ws: ClientConnection
    async with ws_connect(ws_url, headers) as ws:
        sys.stdout.write("READY\n")
        sys.stdout.flush()
        messages: list[str | bytes] = []
        async with asyncio.timeout(30):
            try:
                while True:
                    messages.append(await ws.recv())
            except ConnectionClosed:
                pass
        closed_at = time.time()
    got = (ws.close_code, ws.close_reason)
    if got != (code, reason):
        raise AssertionError(f"WebSocket closed with {got!r}, expected {(code, reason)!r}")
    return f"CLOSED_AT={closed_at:.3f} closed with {code} {reason!r}"


async def drain(ws_url: str, device: str, headers: Headers) -> str:
    async with ws_connect(ws_url, headers) as ws:
        host, port = hostport(device)
        reader, writer = await asyncio.open_connection(host, port)
        writer.write(b"before-stop\n")
        await writer.drain()
        async with asyncio.timeout(TIMEOUT):
            first = await ws.recv()
        if first != "before-stop":
            raise AssertionError(f"WebSocket got {first!r}, expected 'before-stop'")
        writer.write(b"partial-line-without-newline")
        await writer.drain()
        await asyncio.sleep(0.2)
        sys.stdout.write("READY\n")
        sys.stdout.flush()
        started = time.monotonic()

        async def device_closed() -> float:
            await reader.read()  # relayd closes the device after the drain
            return time.monotonic() - started

        device_task = asyncio.create_task(device_closed())
        messages: list[str | bytes] = []
        async with asyncio.timeout(30):
            try:
                while True:
                    messages.append(await ws.recv())
            except ConnectionClosed:
                pass
            closed_ws = time.monotonic() - started
            closed_dev = await device_task
        code = ws.close_code
        writer.close()
    if messages != ["partial-line-without-newline"]:
        raise AssertionError(f"messages during the drain: {messages!r}")
    if code != 1001:
        raise AssertionError(f"WebSocket closed with {code}, expected 1001")
    return (
        f"partial line delivered, device closed by relayd after {closed_dev:.1f} s,"
        f" WebSocket closed with {code} after {closed_ws:.1f} s"
    )


# --- serial source (issue 14): the line is written by run.sh in the container --


async def expect(ws_url: str, text: str, headers: Headers) -> str:
    async with ws_connect(ws_url, headers) as ws:
        sys.stdout.write("READY\n")
        sys.stdout.flush()
        async with asyncio.timeout(TIMEOUT):
            got = await ws.recv()
    if got != text:
        raise AssertionError(f"WebSocket got {got!r}, expected {text!r}")
    return f"{shown(ws_url)}: {got!r}"


def main(argv: list[str]) -> int:
    headers: Headers = {}
    if argv[:1] == ["--bearer"]:
        headers["Authorization"] = f"Bearer {argv[1]}"
        argv = argv[2:]
    command, args = argv[0], argv[1:]
    try:
        if command == "accept":
            result = asyncio.run(accept(args))
        elif command == "http":
            result = http(args[0], int(args[1]) if len(args) > 1 else 200, headers)
        elif command == "body":
            result = get(args[0], 200, headers).decode(errors="replace").rstrip("\n")
        elif command == "refused":
            result = asyncio.run(refused(args[0], int(args[1]), headers))
        elif command == "closed":
            result = asyncio.run(closed(args[0], int(args[1]), args[2], headers))
        elif command == "relay":
            result = asyncio.run(relay(args[0], args[1], args[2], headers))
        elif command == "drain":
            result = asyncio.run(drain(args[0], args[1], headers))
        elif command == "expect":
            result = asyncio.run(expect(args[0], args[1], headers))
        else:
            sys.stderr.write(f"probe: unknown command {command}\n")
            return 2
    except (AssertionError, OSError, TimeoutError, ConnectionClosed) as error:
        sys.stderr.write(f"probe {command}: {type(error).__name__}: {error}\n")
        return 1
    sys.stdout.write(result + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
