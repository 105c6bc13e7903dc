"""Assertions shared by the CLI tests."""

from __future__ import annotations


def assert_user_error(res, *needles: str) -> None:
    """Exit 2, exactly one line starting with 'error:', no traceback, each needle in it."""
    assert res.exit_code == 2, res.output
    lines = [ln for ln in res.output.strip().splitlines() if ln.startswith("error:")]
    assert len(lines) == 1, res.output
    assert "Traceback" not in res.output
    for n in needles:
        assert n in lines[0], lines[0]
