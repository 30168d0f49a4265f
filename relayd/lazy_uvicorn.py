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

import importlib.util
import sys
import threading
from types import ModuleType
from typing import Any


def install() -> None:
    """Make ``uvicorn`` a lazily initialised package, unless it is imported already."""
    if "uvicorn" in sys.modules:
        return
    spec = importlib.util.find_spec("uvicorn")
    if spec is None or spec.loader is None or spec.submodule_search_locations is None:
        return
    module = importlib.util.module_from_spec(spec)
    loader = spec.loader
    lock = threading.Lock()  # two threads' first uses run __init__ once

    def first_use(name: str) -> Any:
        if name == "Config":  # `from uvicorn import Config` in uvicorn.lifespan
            from uvicorn.config import Config

            return Config
        if name.startswith("__") and name.endswith("__"):
            # probes for optional dunders (__path__ is set; __all__, __version__ are not)
            if name not in ("__all__", "__version__"):
                raise AttributeError(name)
        with lock:
            if not initialised(module):
                del module.__dict__["__getattr__"]  # from now on, plain attributes
                loader.exec_module(module)
        return getattr(module, name)

    module.__dict__["__getattr__"] = first_use
    sys.modules["uvicorn"] = module


def initialised(module: ModuleType) -> bool:
    """Whether the package's own ``__init__`` has run (for the tests)."""
    return "__getattr__" not in module.__dict__


install()
