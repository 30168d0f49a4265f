"""What relayd leaves unimported until it is used (the footprint of issue 17).

A fresh interpreter runs relayd in-process to READY and reports ``sys.modules``:
the admin API's FastAPI and prometheus_client come in with the first admin
request and the first ``/metrics`` scrape, PyJWT/cryptography only with JWTs
configured; relayctl's plain commands never load httpx or websockets.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

from tests.helpers import MS, config_text, free_port

# Never loaded by an idle daemon with a config like the packaged one (pyserial:
# serial sources; paho: [mqtt]).
HEAVY = (
    "fastapi",
    "prometheus_client",
    "jwt",
    "cryptography",
    "serial",
    "httpx",
    "paho",
    "typer",
    "rich",
    # uvicorn's package __init__ (relayd.lazy_uvicorn): uvicorn.main, multiprocessing (and
    # click, which uvicorn.config itself imports on older uvicorn, e.g. Debian 13's 0.32)
    "uvicorn.main",
    "multiprocessing",
    # relayd.lean: uvicorn 0.32 imports click for colours, uvicorn.config logging.config
    "click",
    "logging.config",
)

SCRIPT = """
import asyncio, json, sys
from pathlib import Path
from relayd import daemon, lean
from relayd.config import Settings

HEAVY = {heavy!r}
cfg, state, sock, timeout = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3], float(sys.argv[4])
report = {{}}
ready = asyncio.Event()

def loaded():  # a module relayd.lean holds back is in sys.modules, its code not run
    return sorted(m for m in HEAVY if m in sys.modules and lean.initialised(sys.modules[m]))

def on_runtime(runtime):
    set_ready = runtime.set_ready
    def and_tell():
        set_ready()
        ready.set()
    runtime.set_ready = and_tell

async def get(path):
    reader, writer = await asyncio.open_unix_connection(sock)
    request = f"GET {{path}} HTTP/1.1\\r\\nHost: relayd\\r\\nConnection: close\\r\\n\\r\\n"
    writer.write(request.encode())
    answer = await asyncio.wait_for(reader.read(), timeout)
    writer.close()
    return answer.split(b" ", 2)[1].decode()

async def trigger():
    await asyncio.wait_for(ready.wait(), timeout)
    report["ready"] = loaded()
    report["status"] = await get("/v1/status")
    report["after_admin"] = loaded()
    report["metrics"] = await get("/metrics")
    report["after_metrics"] = loaded()

settings = Settings.load(cfg, admin_socket=sock)
code = asyncio.run(daemon.serve(
    settings, load_settings=lambda: settings, state_dir=state, admin_token=None,
    shutdown_trigger=trigger, on_runtime=on_runtime,
))
report["code"] = code
sys.stdout.write(json.dumps(report))
"""


def run_python(
    script: str, *args: str, env: dict[str, str] | None = None, timeout: float = 30_000 * MS
) -> Any:
    """Run ``script`` in a fresh interpreter; what its last line of output says, as JSON."""
    proc = subprocess.run(
        [sys.executable, "-c", script, *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.splitlines()[-1])


def test_idle_daemon_loads_the_admin_api_and_metrics_on_first_use(tmp_path: Path) -> None:
    cfg = tmp_path / "relayd.toml"
    cfg.write_text(config_text(free_port(), [free_port(), free_port()]))
    timeout = 20_000 * MS
    env = {k: v for k, v in os.environ.items() if k != "NOTIFY_SOCKET"}
    report = run_python(
        SCRIPT.format(heavy=HEAVY),
        str(cfg),
        str(tmp_path / "state"),
        str(tmp_path / "admin.sock"),
        str(timeout),
        env=env,
        timeout=3 * timeout,
    )
    assert report["code"] == 0
    assert report["ready"] == []
    assert (report["status"], report["after_admin"]) == ("200", ["fastapi"])
    assert (report["metrics"], report["after_metrics"]) == ("200", ["fastapi", "prometheus_client"])


# typer itself imports rich on some versions (Debian 13's 0.15): that one is typer's, not ours.
RELAYCTL = """
import json, sys
import typer
HEAVY = ("httpx", "websockets", "rich", "fastapi")
typers = {m for m in HEAVY if m in sys.modules}
from relayd.cli import main
code = main(sys.argv[1:])
heavy = sorted(m for m in HEAVY if m in sys.modules and m not in typers)
sys.stdout.write(json.dumps({"code": code, "heavy": heavy}) + "\\n")
"""


def test_relayctl_plain_commands_do_not_import_httpx(tmp_path: Path) -> None:
    path = tmp_path / "admin.sock"
    requests: list[bytes] = []
    with socket.socket(socket.AF_UNIX) as server:
        server.bind(str(path))
        server.listen()
        server.settimeout(20_000 * MS)

        def answer_once() -> None:
            conn, _ = server.accept()
            with conn:
                requests.append(conn.recv(65536))
                conn.sendall(
                    b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                    b"Content-Length: 2\r\nConnection: close\r\n\r\n[]"
                )

        thread = threading.Thread(target=answer_once)
        thread.start()
        try:
            report = run_python(RELAYCTL, "--socket", str(path), "ports", "list", "--json")
        finally:
            thread.join(30_000 * MS)
    assert report == {"code": 0, "heavy": []}
    assert requests[0].startswith(b"GET /v1/ports HTTP/1.1\r\n")
    assert b"\r\nUser-Agent: relayctl/" in requests[0]


LAZY_UVICORN = """
import importlib.metadata, json, sys
from relayd import lazy_uvicorn, lean
import uvicorn, uvicorn.config, uvicorn.server
import uvicorn.lifespan.on  # does `from uvicorn import Config`
from uvicorn import Config
report = {"after_submodules": [m for m in ("uvicorn.main", "multiprocessing") if m in sys.modules]}
report["config_is_config"] = Config is uvicorn.config.Config
report["probe"] = hasattr(uvicorn, "__wrapped__")
report["initialised_early"] = lean.initialised(uvicorn)
report["version"] = uvicorn.__version__ == importlib.metadata.version("uvicorn")
from uvicorn.main import run
report["run"] = uvicorn.run is run and uvicorn.Server is uvicorn.server.Server
report["initialised"] = lean.initialised(uvicorn)
sys.stdout.write(json.dumps(report))
"""


def test_uvicorn_package_init_waits_for_its_first_use() -> None:
    """relayd imports uvicorn's submodules only; the package's own names still work."""
    assert run_python(LAZY_UVICORN) == {
        "after_submodules": [],
        "config_is_config": True,
        "probe": False,
        "initialised_early": False,
        "version": True,
        "run": True,
        "initialised": True,
    }


LEAN = """
import json, os, sys
before = {m: m in sys.modules for m in ("click", "logging.config", "importlib.metadata")}
os.environ.pop("PYDANTIC_SKIP_VALIDATING_CORE_SCHEMAS", None)
os.environ["PYDANTIC_DISABLE_PLUGINS"] = "true"
from pathlib import Path
from relayd import daemon, lean
from relayd.config import Settings
Settings.load(Path(sys.argv[1]))  # every config model is built and used
report = {"env": [os.environ.get(k) for k in lean.ENVIRONMENT]}
report["waiting"] = sorted(
    m for m in before if not before[m] and not lean.initialised(sys.modules[m])
)
report["preloaded"] = sorted(m for m in before if before[m])
report["pydantic"] = [int(n) for n in __import__("pydantic").VERSION.split(".")[:2]]
import click, logging.config, importlib.metadata  # first uses run them
report["used"] = [
    click.style("x", bold=True) == "\\x1b[1mx\\x1b[0m",
    callable(logging.config.dictConfig),
    importlib.metadata.version("pydantic") == __import__("pydantic").VERSION,
]
sys.stdout.write(json.dumps(report))
"""


def test_idle_daemon_leaves_what_it_never_uses_unrun(tmp_path: Path) -> None:
    """relayd.lean: click, logging.config, importlib.metadata wait; pydantic's extras are off."""
    cfg = tmp_path / "relayd.toml"
    cfg.write_text(config_text(free_port(), [free_port()]))
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYDANTIC_")}
    report = run_python(LEAN, str(cfg), env=env)
    # set by relayd.lean where unset; one set by the user is left as it is
    assert report["env"] == ["1", "true"]
    assert {"click", "logging.config"} <= set(report["waiting"])
    # pydantic < 2.11 (Debian 13's 2.10) imports importlib.metadata as a module and
    # scans it only for plugins; 2.11 and later import a name from it. (The editable
    # install's finder in a venv's site imports it before relayd does.)
    if report["pydantic"] < [2, 11] and "importlib.metadata" not in report["preloaded"]:
        assert "importlib.metadata" in report["waiting"]
    assert report["used"] == [True, True, True]
