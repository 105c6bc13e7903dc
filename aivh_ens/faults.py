"""Fault injection for crash tests: ``AIVH_ENS_KILL_AT=point[@n]`` SIGKILLs this process at the n-th hit.

Points: ``batch`` (inside a training epoch), ``write:<file name>`` (a temp file fully written, not yet
renamed into place), ``fold-done`` (between folds), ``trial`` (inside a blend search trial) and
``infer-batch`` (inside test or OOF inference). Unset (always, outside tests) this is one dict lookup.
"""

from __future__ import annotations

import os
import signal

_hits: dict[str, int] = {}


def point(name: str) -> None:
    """Kill the process here if the environment asks for it (simulates a crash, power loss or OOM kill)."""
    spec = os.environ.get("AIVH_ENS_KILL_AT")
    if not spec:
        return
    target, _, nth = spec.partition("@")
    if target != name:
        return
    _hits[name] = _hits.get(name, 0) + 1
    if _hits[name] >= int(nth or 1):
        os.kill(os.getpid(), signal.SIGKILL)
