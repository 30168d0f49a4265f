"""The harness itself: what `make test` relies on to keep timed tests apart."""

from __future__ import annotations

import pytest


@pytest.mark.xdist_group("harness")
def test_xdist_group_marks_take_effect(request: pytest.FixtureRequest) -> None:
    """Under ``--dist loadgroup`` a grouped test carries its group, so xdist keeps the
    group on one worker (pytest 9.2 silently lost it: see tests/conftest.py)."""
    if not getattr(request.config.option, "loadgroup", False):
        pytest.skip("not on an xdist worker with --dist loadgroup (PYTEST_JOBS=0)")
    assert request.node.nodeid.endswith("::test_xdist_group_marks_take_effect@harness")
