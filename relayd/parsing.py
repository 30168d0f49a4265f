"""Values an operator types or a client sends: durations, port lists, token names.

Shared by relayctl, the admin API and the token store; imports nothing beyond
the standard library, so relayctl stays quick to start.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import Final, Literal, TypeAlias

ALL: Final = "*"
"""Every port, current and future (relayd.toml(5), relayctl(1) ``all``)."""

Ports: TypeAlias = frozenset[int] | Literal["*"]
"""A set of ports, or ALL."""

NONE: Final[Ports] = frozenset()

MAX_DURATION = 100 * 365 * 86400  # a century: anything longer is a typo
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}
_DURATION = re.compile(r"([0-9]{1,12})([smhd])")
_NAME = re.compile(r"[A-Za-z0-9._-]{1,64}")


def parse_duration(text: str) -> int:
    """``"90s"``, ``"15m"``, ``"12h"``, ``"30d"`` -> seconds; ValueError otherwise."""
    match = _DURATION.fullmatch(text.strip())
    if match is None:
        raise ValueError(
            f"invalid duration {text[:40]!r}: a positive number with a unit s, m, h or d "
            "(90s, 15m, 12h, 30d)"
        )
    seconds = int(match[1]) * _UNITS[match[2]]
    if not 0 < seconds <= MAX_DURATION:
        raise ValueError(f"invalid duration {text[:40]!r}: between 1s and 36500d")
    return seconds


def valid_port(value: object) -> bool:
    return type(value) is int and 1 <= value <= 65535


def parse_ports(text: str) -> Ports:
    """``"8001,8002"`` -> those ports; ``"all"`` or ``"*"`` -> ALL; ``""`` -> none.

    ValueError with one sentence for anything else.
    """
    text = text.strip()
    if text.lower() in ("all", ALL):
        return ALL
    ports: set[int] = set()
    for item in text.split(",") if text else ():
        item = item.strip()
        if not (item.isascii() and item.isdigit() and len(item) <= 5 and valid_port(int(item))):
            raise ValueError(
                f"invalid port {item[:20]!r}: ports are comma-separated numbers "
                "from 1 to 65535, or all"
            )
        ports.add(int(item))
    return frozenset(ports)


def ports_from_json(value: object) -> Ports:
    """A JSON port list or ``"*"`` (API, tokens.json, JWT claims); ValueError otherwise."""
    if value == ALL:
        return ALL
    if not isinstance(value, list) or not all(valid_port(p) for p in value):
        raise ValueError('expected a list of ports (1-65535) or "*"')
    return frozenset(value)


def ports_to_json(ports: Ports) -> list[int] | Literal["*"]:
    return ALL if ports == ALL else sorted(ports)


def union(a: Ports, b: Ports) -> Ports:
    return ALL if a == ALL or b == ALL else a | b


def check_token_name(name: object) -> str:
    """A token name: 1-64 of ``A-Z a-z 0-9 . _ -``; ValueError otherwise."""
    if not isinstance(name, str) or _NAME.fullmatch(name) is None:
        raise ValueError("invalid token name: 1 to 64 characters, letters, digits, '.', '_' or '-'")
    return name


def ports_text(ports: Iterable[int] | Literal["*"]) -> str:
    """The relayctl form of a port set: ``8001,8002``, ``all`` or ``-`` for none."""
    if ports == ALL:
        return "all"
    return ",".join(str(p) for p in sorted(ports)) or "-"
