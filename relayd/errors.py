"""Errors relayd raises on purpose.

Hierarchy::

    RelaydError               base of everything below
    ├── ConfigError           the configuration (file, flags or state) is invalid
    ├── ListenerExists        a listener on that port already exists
    ├── ListenerNotFound      no listener on that port
    ├── BindError             a listener's socket could not be bound
    ├── StateError            the runtime state file (or tokens file) could not be written
    ├── Stopping              relayd is stopping: no more changes are accepted
    ├── TokenExists           a token with that name already exists
    └── TokenNotFound         no token with that name

Each message is one sentence an operator can act on; ``str(exc)`` is what the
admin API puts in ``detail`` and what the daemon logs.
"""

from __future__ import annotations


class RelaydError(Exception):
    """Base class of relayd's own errors."""


class ConfigError(RelaydError):
    """Invalid configuration; ``problems`` holds one line per problem."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("; ".join(problems))
        self.problems = problems


class ListenerExists(RelaydError):
    def __init__(self, port: int) -> None:
        super().__init__(f"port {port} is already a listener")
        self.port = port


class ListenerNotFound(RelaydError):
    def __init__(self, port: int) -> None:
        super().__init__(f"port {port} is not a listener")
        self.port = port


class BindError(RelaydError):
    def __init__(self, port: int, host: str, reason: str) -> None:
        super().__init__(f"port {port}: {reason}")
        self.port = port
        self.host = host
        self.reason = reason


class StateError(RelaydError):
    """The state file could not be written; nothing was changed."""


class Stopping(RelaydError):
    """relayd is draining for a stop: ports and configuration no longer change."""

    def __init__(self) -> None:
        super().__init__("relayd is stopping; no changes are accepted")


class TokenExists(RelaydError):
    def __init__(self, name: str) -> None:
        super().__init__(f"token {name} already exists")
        self.name = name


class TokenNotFound(RelaydError):
    def __init__(self, name: str) -> None:
        super().__init__(f"token {name} does not exist")
        self.name = name
