"""Atomic replacement of small files: ``ports.json`` and ``tokens.json``.

``write_atomic`` writes a temp file beside the target (``.<name>.tmp-<pid>``),
fsyncs it, renames it over the target and fsyncs the directory, so after a
crash the target holds either the old or the new content, never a mix. A save
killed before its rename leaves only the temp file; ``remove_leftovers``
deletes such files when the owner next loads the target.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

logger = logging.getLogger(__name__)


def temp_path(path: Path) -> Path:
    return path.with_name(f".{path.name}.tmp-{os.getpid()}")


def write_atomic(path: Path, data: bytes, mode: int) -> None:
    """Replace ``path`` with ``data``; OSError (and the old content intact) on failure.

    The temp file is created with ``mode`` from the start (O_EXCL, so never
    through a symlink or a file someone else opened), so a secret is never
    readable by others, not even for a moment; the umask can only narrow it.
    """
    tmp = temp_path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp.unlink(missing_ok=True)  # a leftover of a killed process with our pid
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, mode)
        with open(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        dir_fd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except OSError:
        try:
            tmp.unlink(missing_ok=True)
        except OSError:
            pass
        raise


def remove_leftovers(path: Path) -> None:
    """Delete temp files of saves of ``path`` that were killed before their rename."""
    try:
        leftovers = list(path.parent.glob(f".{path.name}.tmp-*"))
    except OSError:  # pragma: no cover - an unreadable directory fails the owner's read
        return
    for tmp in leftovers:
        try:
            tmp.unlink()
        except OSError as exc:
            logger.warning("cannot remove %s: %s", tmp, (exc.strerror or str(exc)).lower())
        else:
            logger.info("removed %s, left by a save that did not finish", tmp.name)
