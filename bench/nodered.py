"""Node-RED as a reference relay (issue 17 part 3): relay "nodered" in bench/run.py.

The flow is bench/node-red-flow.json (tcp in, "stream of String delimited by
\\n", delimiter not kept -> websocket out on /ws, broadcast), the settings
bench/node-red-settings.js; `make bench-deps` installs the pinned npm package
into bench/node-red/ (ignored by git). Node-RED sends no READY=1: it is ready
once both ports accept connections.
"""

from __future__ import annotations

import asyncio
import contextlib
import shutil
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
NODERED = "nodered"
VERSION = "4.1.8"  # the newest release that runs on Node.js 20 (5.x needs >= 22.9)
RED_JS = ROOT / "bench" / "node-red" / "node_modules" / "node-red" / "red.js"
FLOW = ROOT / "bench" / "node-red-flow.json"
SETTINGS = ROOT / "bench" / "node-red-settings.js"


def installed() -> bool:
    return RED_JS.exists() and shutil.which("node") is not None


def command(
    workdir: Path, host: str, ws_port: int, tcp_port: int
) -> tuple[list[str], dict[str, str]]:
    """The command line and the environment of one Node-RED run in `workdir`."""
    if not installed():
        raise RuntimeError("Node-RED is not installed: run `make bench-deps` (needs node, npm)")
    flow = workdir / "flows.json"  # a copy: Node-RED may write next to its flow file
    flow.write_bytes(FLOW.read_bytes())
    env = {
        "RELAY_HOST": host,
        "RELAY_WS_PORT": str(ws_port),
        "RELAY_TCP_PORT": str(tcp_port),
        "RELAY_USER_DIR": str(workdir),
        "RELAY_FLOW_FILE": str(flow),
        "NODE_ENV": "production",
    }
    node = shutil.which("node") or "node"
    return [node, str(RED_JS), "--settings", str(SETTINGS)], env


async def wait_ready(
    proc: asyncio.subprocess.Process, host: str, ports: list[int], timeout: float
) -> None:
    """Until every port accepts a connection (the flow is deployed), or fail."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    pending = list(ports)
    while pending:
        if proc.returncode is not None:
            raise RuntimeError(f"{NODERED} exited with {proc.returncode} at start")
        if loop.time() > deadline:
            raise RuntimeError(f"{NODERED}: ports {pending} not open within {timeout} s")
        try:
            _, w = await asyncio.wait_for(asyncio.open_connection(host, pending[0]), 1.0)
        except (OSError, TimeoutError):
            await asyncio.sleep(0.1)
            continue
        w.close()
        with contextlib.suppress(OSError):
            await w.wait_closed()
        pending.pop(0)


# Lines a device sends, and the text frames every relay under comparison must turn
# them into: one frame per line, the newline not in it (relayd's contract, see
# relayd.toml(5), framing "lines"). Sent in odd-sized writes that split lines.
PAYLOAD_LINES = [
    b"plain",
    b"sensor-7 t=21.5 h=40",
    "wägt 21,5 kg €".encode(),
    b"x" * 200,  # over 125 bytes: the 16-bit length form
    b'{"json": [1, 2, 3]}',
    b"last",
]


async def same_payload(r: Any, P: Any, hooks: Any) -> dict[str, Any]:
    """Do the relay's WebSocket frames carry exactly the device's lines? (text, no newline)"""
    from websockets.asyncio.client import connect

    stream = b"".join(line + b"\n" for line in PAYLOAD_LINES)
    want = [line.decode() for line in PAYLOAD_LINES]
    got: list[str | bytes] = []
    async with connect(f"ws://{r.host}:{r.ws_port}/ws", max_queue=None) as ws:
        _, w = await asyncio.open_connection(r.host, r.tcp_port)
        await asyncio.sleep(0.5)  # the device's connection is accepted and subscribed
        for i in range(0, len(stream), 7):
            w.write(stream[i : i + 7])
            await w.drain()
        with contextlib.suppress(TimeoutError):
            while len(got) < len(want):
                got.append(await asyncio.wait_for(ws.recv(), 5.0))
        w.close()
    first_diff = next(
        (
            f"{i}: {g!r:.60} != {x!r:.60}"
            for i, (g, x) in enumerate(zip(got, want, strict=False))
            if g != x
        ),
        None,
    )
    return {
        "frames_match": got == want,
        "frames_seen": len(got),
        "frames_expected": len(want),
        "first_difference": first_diff,
    }
