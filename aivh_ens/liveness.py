"""Who a process is, and whether it still runs: host name, boot id, PID namespace, PID and start time.

A PID alone names nothing for long: a restarted container with the same host name reuses PIDs, and
containers that share a host name but not a PID namespace see each other's PIDs as someone else's (or as no
one's). A process is therefore recorded as its host name, the kernel's boot id, its PID namespace, its PID
and its start time (clock ticks since boot, from ``/proc``). Another process can judge that record only
when it runs in the same process space (same host, boot and PID namespace); then the owner is alive when a
process with that PID exists and started at that very tick. Anything else is for a heartbeat to decide.
"""

from __future__ import annotations

import functools
import os
import socket
from pathlib import Path
from typing import Any


def pid_alive(pid: int) -> bool:
    """Whether a process with this PID exists in this PID namespace."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    except OverflowError:
        return False
    return True


@functools.cache
def boot_id() -> str:
    """The kernel's boot id (new at every boot), or "" where the system does not expose one."""
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return ""


@functools.cache
def pid_namespace() -> str:
    """This process's PID namespace (``pid:[4026531836]``), or "" where the system does not expose it."""
    try:
        return os.readlink("/proc/self/ns/pid")
    except OSError:
        return ""


def start_time(pid: int) -> int | None:
    """When process ``pid`` started, in clock ticks since boot (``/proc/<pid>/stat`` field 22), or None."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (OSError, ValueError):
        return None
    fields = stat.rpartition(")")[2].split()  # the command name may hold spaces and parentheses
    try:
        return int(fields[19])
    except (IndexError, ValueError):
        return None


def this_process(host: str | None = None) -> dict[str, Any]:
    """The record naming this process: ``host``, ``boot_id``, ``pidns``, ``pid``, ``start``."""
    return {
        "host": host or socket.gethostname(),
        "boot_id": boot_id(),
        "pidns": pid_namespace(),
        "pid": os.getpid(),
        "start": start_time(os.getpid()),
    }


def same_space(record: dict[str, Any], host: str | None = None) -> bool:
    """Whether this process can judge ``record``'s PID: same host name, and (where recorded) same boot and
    PID namespace. Records of older versions name only host and PID; they are judged by the PID alone."""
    if record.get("host") != (host or socket.gethostname()):
        return False
    for key, mine in (("boot_id", boot_id()), ("pidns", pid_namespace())):
        theirs = record.get(key)
        if theirs is not None and theirs != mine:
            return False
    return True


def record_alive(record: dict[str, Any]) -> bool:
    """Whether the process a record of this process space names still runs (same PID, same start time)."""
    try:
        pid = int(record.get("pid", -1))
    except (TypeError, ValueError):
        return False
    if not pid_alive(pid):
        return False
    start = record.get("start")
    return start is None or start_time(pid) in (None, start)
