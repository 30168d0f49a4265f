"""The idle footprint: what relayd's libraries build or import that it never uses (relayd(8)).

Imported first by relayd.daemon, before pydantic, uvicorn or starlette (figures
from the packaged relayd.service on Debian 13, bench/RESULTS.md):

- pydantic before 2.11 checks every core schema it generates against
  pydantic-core's schema of all schemas: a validator of that schema, built on
  the first model, that stays (1.8 MB). It checks pydantic's own output, not
  relayd.toml (each model validates the config as before); pydantic 2.11
  dropped the check. ``PYDANTIC_SKIP_VALIDATING_CORE_SCHEMAS`` turns it off.
- pydantic looks for plugins (entry points of every installed distribution)
  on the first model, which imports importlib.metadata (zipfile, email,
  tempfile: 1.7 MB). relayd uses none: ``PYDANTIC_DISABLE_PLUGINS``.
- click (Debian 13's uvicorn 0.32 imports it in uvicorn.config, .logging and
  .server, for colours relayd never logs), logging.config (uvicorn.config, for
  ``log_config``, which relayd sets to None) and importlib.metadata (pydantic's
  plugin loader; websockets.version) wait for their first use.

Either variable set in the environment already is left as it is.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import sys
import threading
from collections.abc import Callable
from types import ModuleType
from typing import Any

ENVIRONMENT = {"PYDANTIC_SKIP_VALIDATING_CORE_SCHEMAS": "1", "PYDANTIC_DISABLE_PLUGINS": "1"}
DEFERRED = ("click", "logging.config", "importlib.metadata")


def defer(name: str, provided: dict[str, Callable[[], Any]] | None = None) -> None:
    """Put module ``name`` in ``sys.modules`` without running it, unless it is imported already.

    The module object is the real one (its spec, ``__path__``, ``__file__``):
    submodules import as usual, and the first access to any other name runs
    the module's code then, once, so every user of the module sees all of it.
    ``provided`` names are served by their function without that.
    """
    if name in sys.modules:
        return
    parent_name, _, child = name.rpartition(".")
    parent = importlib.import_module(parent_name) if parent_name else None
    spec = importlib.util.find_spec(name)
    if spec is None or spec.loader is None:
        return
    module = importlib.util.module_from_spec(spec)
    loader = spec.loader
    lock = threading.Lock()  # two threads' first uses run the module once

    def first_use(attr: str) -> Any:
        if provided and attr in provided:
            return provided[attr]()
        if attr.startswith("__") and attr.endswith("__"):
            # probes for optional dunders (__path__ is set; __all__, __version__ are not)
            if attr not in ("__all__", "__version__"):
                raise AttributeError(attr)
        with lock:
            if not initialised(module):
                del module.__dict__["__getattr__"]  # from now on, plain attributes
                loader.exec_module(module)
        return getattr(module, attr)

    module.__dict__["__getattr__"] = first_use
    sys.modules[name] = module
    if parent is not None:
        setattr(parent, child, module)  # `import a.b` binds a, then reads a.b


def initialised(module: ModuleType) -> bool:
    """Whether a module's own code has run: False only for one ``defer`` holds back."""
    return getattr(module.__dict__.get("__getattr__"), "__module__", None) != __name__


def install() -> None:
    for key, value in ENVIRONMENT.items():
        os.environ.setdefault(key, value)
    for name in DEFERRED:
        defer(name)


install()
