"""Fault injection for crash tests: ``AIVH_ENS_KILL_AT=point[@n]`` SIGKILLs this process at the n-th hit.

Points: ``batch`` (inside a training epoch), ``epoch-done`` (after a fold's epoch is saved), ``write:<file
name>`` (a temp file fully written, not yet renamed into place), ``land:<file name>`` (its folder's write
guard passed, the rename not yet made), ``fold-done`` (between folds), ``job:<run>:<fold>`` (a sweep job,
once it holds its lock), ``trial`` (inside a blend search trial) and ``infer-batch`` (inside test or OOF
inference) and ``timing:<candidate>`` (``auto``'s probe of a candidate, before each batch size it tries).
``AIVH_ENS_FAULT=raise`` raises a RuntimeError there instead, ``oom`` torch's out-of-memory error (what a
batch too large for the GPU raises), ``hang`` sleeps until a signal arrives (a job that runs into its time
limit), ``pause:<s>`` sleeps that many seconds and goes on (a stalled write or mount), ``stop`` stops the
whole process (SIGSTOP: every thread, the lock's heartbeat included, as an NFS stall does) until a SIGCONT.
``AIVH_ENS_FAULT_ONCE=<file>`` fires only while that file does not exist and creates it first (holding the
firing process's PID), so a retried or requeued job gets past the point. Unset (always, outside tests) this is
one dict lookup.
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

_hits: dict[str, int] = {}


def point(name: str) -> None:
    """Fail here if the environment asks for it (simulates a crash, power loss, OOM kill, bug or hang)."""
    spec = os.environ.get("AIVH_ENS_KILL_AT")
    if not spec:
        return
    target, _, nth = spec.partition("@")
    if target != name:
        return
    _hits[name] = _hits.get(name, 0) + 1
    if _hits[name] < int(nth or 1):
        return
    once = os.environ.get("AIVH_ENS_FAULT_ONCE")
    if once:
        try:
            with Path(once).open("x") as f:
                f.write(str(os.getpid()))
        except FileExistsError:
            return
    action = os.environ.get("AIVH_ENS_FAULT", "kill")
    if action == "raise":
        raise RuntimeError(f"injected fault at {name}")
    if action == "oom":
        import torch

        raise torch.OutOfMemoryError(f"CUDA out of memory (injected at {name})")
    if action.startswith("pause:"):
        time.sleep(float(action.removeprefix("pause:")))
        return
    if action == "stop":
        os.kill(os.getpid(), signal.SIGSTOP)
        return
    if action == "hang":
        while True:
            time.sleep(3600)
    os.kill(os.getpid(), signal.SIGKILL)
