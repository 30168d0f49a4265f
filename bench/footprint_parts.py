"""Idle RSS of relayd by part: VmRSS added by each group of imports (issue 17).

Imports relayd's dependencies group by group, in the order relayd needs them,
into one fresh interpreter and prints the VmRSS each group adds, then what
relayd's own modules add on top (``relayd.daemon`` and what it imports).

    python -m bench.footprint_parts [--relayd-from DIR]

``--relayd-from DIR``: another checkout's relayd (e.g. a ``git archive`` of an
older commit), with this venv's libraries; there uvicorn's package ``__init__``
runs as it did before ``relayd.lazy_uvicorn``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from importlib.util import find_spec
from pathlib import Path

GROUPS: list[tuple[str, list[str]]] = [
    (
        "asyncio, ssl, logging, socket, json, argparse, tomllib",
        ["asyncio", "ssl", "logging", "socket", "json", "argparse", "tomllib"],
    ),
    ("pydantic and pydantic_core", ["pydantic", "pydantic_core"]),
    ("relayd.config (its models)", ["relayd.config"]),
    ("uvicorn (config, server, h11 protocol)", ["uvicorn.config", "uvicorn.server"]),
    ("starlette, anyio", ["starlette.applications", "starlette.routing", "anyio"]),
    ("h11, websockets", ["h11", "websockets.server", "websockets.protocol"]),
    ("relayd's own modules, sdnotify", ["relayd.daemon"]),
]

PROBE = """
import importlib, json, sys
def rss():
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0
groups = json.loads(sys.argv[1])
out = [["the interpreter, site", rss()]]
for name, modules in groups:
    before = rss()
    for m in modules:
        importlib.import_module(m)
    out.append([name, rss() - before])
out.append(["total", rss()])
sys.stdout.write(json.dumps(out))
"""


def _has(directory: Path | None, module: str) -> bool:
    """Whether that relayd has ``relayd.<module>``: the checkout in ``directory``, or else
    this checkout's or the installed one (packaging/e2e/run.sh --footprint)."""
    if directory:
        return (directory / "relayd" / f"{module}.py").exists()
    return find_spec(f"relayd.{module}") is not None


def parts(directory: Path | None) -> list[tuple[str, int]]:
    env = dict(os.environ)
    first = ["relayd.lazy_uvicorn"] if _has(directory, "lazy_uvicorn") else []
    groups = [(n, first + m if n.startswith("uvicorn") else m) for n, m in GROUPS]
    if _has(directory, "lean"):
        # what relayd.daemon does first: pydantic's extras off, click & co. deferred
        groups.insert(1, ("relayd.lean", ["relayd.lean"]))
    if directory:
        env["PYTHONPATH"] = str(directory)
    result = subprocess.run(
        [sys.executable, "-c", PROBE, json.dumps(groups)],
        capture_output=True,
        text=True,
        check=True,
        env=env,
        cwd=directory,
    )
    return [(name, kib) for name, kib in json.loads(result.stdout)]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--relayd-from", type=Path, metavar="DIR", help="another checkout")
    args = parser.parse_args(argv)
    directory = args.relayd_from.resolve() if args.relayd_from else None
    for name, kib in parts(directory):
        sys.stdout.write(f"{kib / 1024:6.2f} MB  {name}\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
