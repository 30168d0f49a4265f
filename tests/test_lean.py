"""relayd.lean.defer: a module in sys.modules whose code waits for its first use."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from relayd import lean

PACKAGE = "relayd_lean_probe"


@pytest.fixture
def package(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """A package whose __init__ counts its runs (in a list of the test's own module)."""
    root = tmp_path / PACKAGE
    root.mkdir()
    (root / "__init__.py").write_text(
        "import tests.test_lean as t\nt.RUNS.append('init')\nVALUE = 42\n__all__ = ['VALUE']\n"
    )
    (root / "sub.py").write_text("import tests.test_lean as t\nt.RUNS.append('sub')\nX = 1\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    RUNS.clear()
    yield root
    for name in [n for n in sys.modules if n == PACKAGE or n.startswith(PACKAGE + ".")]:
        del sys.modules[name]


RUNS: list[str] = []


def test_deferred_package_runs_once_on_first_use(package: Path) -> None:
    lean.defer(PACKAGE)
    module = sys.modules[PACKAGE]
    assert RUNS == [] and not lean.initialised(module)
    # `import x` of the deferred module reads its __spec__ and nothing else
    import relayd_lean_probe  # type: ignore[import-not-found]

    assert relayd_lean_probe is module and RUNS == []
    assert module.__path__ == [str(package)] and module.__file__ == str(package / "__init__.py")
    with pytest.raises(AttributeError):
        module.__wrapped__  # noqa: B018 (an optional dunder probe does not run it)
    assert RUNS == []
    assert module.VALUE == 42 and RUNS == ["init"] and lean.initialised(module)
    assert module.VALUE == 42 and RUNS == ["init"]


def test_deferred_package_submodule_and_from_import(package: Path) -> None:
    lean.defer(PACKAGE, {"PROVIDED": lambda: "served"})
    module = sys.modules[PACKAGE]
    from relayd_lean_probe import PROVIDED

    assert PROVIDED == "served" and RUNS == []
    from relayd_lean_probe import sub

    assert sub.X == 1 and RUNS == ["init", "sub"]  # asking the package for `sub` ran __init__
    from relayd_lean_probe import VALUE

    assert VALUE == 42 and RUNS == ["init", "sub"] and module.sub is sub


def test_defer_leaves_an_imported_module_alone(package: Path) -> None:
    import relayd_lean_probe

    lean.defer(PACKAGE)
    assert sys.modules[PACKAGE] is relayd_lean_probe and RUNS == ["init"]
    assert lean.initialised(relayd_lean_probe)


def test_defer_of_a_missing_module_does_nothing() -> None:
    lean.defer("relayd_lean_no_such_module")
    assert "relayd_lean_no_such_module" not in sys.modules
