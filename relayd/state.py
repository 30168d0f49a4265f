"""Runtime port changes that survive a restart: ``<state-dir>/ports.json``.

The file records what the admin API changed relative to the config file:
ports added at runtime (with their settings) and config ports removed at
runtime. Writes are atomic (``relayd.atomicfile``): temp file, fsync, rename,
fsync of the directory.
"""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, ValidationError

from relayd.atomicfile import remove_leftovers, write_atomic
from relayd.config import PortSettings
from relayd.errors import ConfigError, StateError
from relayd.listeners import Origin

logger = logging.getLogger(__name__)

STATE_FILE = "ports.json"
FORMAT_VERSION = 1  # of ports.json; a file from a newer relayd is refused, never misread


class _StateModel(BaseModel):
    model_config = ConfigDict(extra="forbid")
    version: int = 1
    added: list[PortSettings] = []
    removed: list[int] = []


class PortState:
    def __init__(self, directory: Path) -> None:
        self.path = directory / STATE_FILE
        self.added: dict[int, PortSettings] = {}
        self.removed: set[int] = set()

    def load(self) -> None:
        """Read the file; a corrupt one is moved aside and logged.

        A file written by a newer relayd (a higher ``version``) is a ConfigError:
        reading it with this version's rules could lose ports, and the next save
        would overwrite it, so the daemon does not start until an operator
        decides (upgrade relayd again, or move the file aside).
        """
        remove_leftovers(self.path)
        try:
            text = self.path.read_bytes()
        except FileNotFoundError:
            return
        except OSError as exc:
            logger.error("state file %s unreadable (%s): starting from the config", self.path, exc)
            return
        version = _format_version(text)
        if version is not None and version > FORMAT_VERSION:
            raise ConfigError(
                [
                    f"state file {self.path} has format version {version}, newer than this "
                    f"relayd understands ({FORMAT_VERSION}); upgrade relayd, or move the file "
                    "aside to start from the config"
                ]
            )
        try:
            model = _StateModel.model_validate_json(text)
            if model.version != FORMAT_VERSION:
                raise ValueError(f"unknown format version {model.version}")
        except (ValidationError, ValueError) as exc:
            aside = self.path.with_name(f"{STATE_FILE}.corrupt-{time.strftime('%Y%m%dT%H%M%S')}")
            try:
                os.replace(self.path, aside)
            except OSError as move_exc:
                logger.error("cannot move corrupt state file aside: %s", move_exc)
            logger.error(
                "state file %s is corrupt (%s); moved to %s, starting from the config",
                self.path,
                _first_problem(exc),
                aside.name,
            )
            return
        self.added = {p.port: p for p in model.added}
        self.removed = set(model.removed)

    def apply(self, config_ports: list[PortSettings]) -> dict[int, tuple[PortSettings, Origin]]:
        """Config ports minus runtime removals plus runtime additions, by port number."""
        desired: dict[int, tuple[PortSettings, Origin]] = {
            p.port: (p, "config") for p in config_ports if p.port not in self.removed
        }
        desired.update((port, (p, "runtime")) for port, p in self.added.items())
        return desired

    def with_added(self, settings: PortSettings) -> PortState:
        new = self._copy()
        new.added[settings.port] = settings
        new.removed.discard(settings.port)
        return new

    def with_removed(self, port: int, *, in_config: bool) -> PortState:
        new = self._copy()
        new.added.pop(port, None)
        if in_config:
            new.removed.add(port)
        return new

    def _copy(self) -> PortState:
        new = PortState(self.path.parent)
        new.added = dict(self.added)
        new.removed = set(self.removed)
        return new

    def save(self) -> None:
        """Write atomically; StateError (nothing changed on disk) when that fails."""
        data: dict[str, Any] = {
            "version": FORMAT_VERSION,
            "added": [p.model_dump() for _, p in sorted(self.added.items())],
            "removed": sorted(self.removed),
        }
        payload = (json.dumps(data, indent=2) + "\n").encode()
        try:
            # 0644 (the umask may narrow it): the state holds no secret.
            write_atomic(self.path, payload, 0o644)
        except OSError as exc:
            raise StateError(
                f"cannot write state file {self.path}: {(exc.strerror or str(exc)).lower()}"
            ) from None


def _format_version(text: bytes) -> int | None:
    """The ``version`` of a state file, when it is a JSON object with an integer one."""
    try:
        data = json.loads(text)
    except ValueError:
        return None
    version = data.get("version") if isinstance(data, dict) else None
    return version if isinstance(version, int) and not isinstance(version, bool) else None


def _first_problem(exc: Exception) -> str:
    if isinstance(exc, ValidationError):
        return f"{exc.error_count()} problem(s)"
    return str(exc)
