"""uvicorn's package ``__init__`` deferred to its first use (the idle footprint, relayd(8)).

``import uvicorn.config`` runs ``uvicorn/__init__.py`` first, and that imports
``uvicorn.main``: click, multiprocessing, tempfile, configparser's users, the
reloader and worker supervisors, about 2 MB of an idle relayd that it never
uses (relayd drives ``uvicorn.config``, ``uvicorn.server`` and the protocols
itself). ``install()`` puts the real package in ``sys.modules`` (its spec, path
and file) without running its ``__init__``: submodules import as usual, and
the first access to a name the package defines (``uvicorn.run``,
``uvicorn.__version__``, ...) runs the real ``__init__`` then, so every other
``import uvicorn`` in the process still sees the whole package.
``uvicorn.Config``, which uvicorn's lifespan imports from the package, comes
from ``uvicorn.config`` without it.
"""

from __future__ import annotations

from relayd import lean


def install() -> None:
    """Make ``uvicorn`` a lazily initialised package, unless it is imported already."""
    lean.defer("uvicorn", {"Config": _config})


def _config() -> type:
    # `from uvicorn import Config` in uvicorn.lifespan
    from uvicorn.config import Config

    return Config


install()
