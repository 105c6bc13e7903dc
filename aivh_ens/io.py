"""Atomic file writes and content hashes shared by every stage.

Every file a stage produces is written to a temporary name in the same folder, flushed, fsynced and renamed
over the target, so a reader (or a process killed mid-write) never sees a half-written file. The temporary
name carries the writer's process space (a digest of host name, boot id and PID namespace) and PID
(``.<name>.<space>-<pid>.<random>.tmp``): a later successful write of the same file removes the ones left by
dead processes of this process space, never those of a live writer or of another container that shares the
host name. After the rename the folder itself is fsynced, so the new name survives a power loss.

JSON records are NaN-safe: a float that JSON cannot hold (NaN, an infinity: the AUC of a validation fold with
one class) is written as ``null``, and the record's ``nulls`` field says which key held what and why.
"""

from __future__ import annotations

import contextlib
import glob
import hashlib
import json
import math
import os
import socket
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any

import pandas as pd

from aivh_ens import faults
from aivh_ens.liveness import boot_id, pid_alive, pid_namespace


def _read_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


_UMASK = _read_umask()  # read once at import: os.umask is process-wide and not thread-safe to probe
_SPACE = f"{socket.gethostname()}/{boot_id()}/{pid_namespace()}"  # where a PID means one process
_HOST = hashlib.sha256(_SPACE.encode()).hexdigest()[:8]  # folders may be shared between hosts and containers


_guards: dict[Path, Callable[[], None]] = {}  # folder -> check run before any file under it is put in place


@contextlib.contextmanager
def guarded(folder: str | os.PathLike, check: Callable[[], None]) -> Iterator[None]:
    """While inside, every atomic write under ``folder`` calls ``check`` just before the file is renamed into
    place; ``check`` raises to refuse it (a job that lost its fold's lock writes no further checkpoint)."""
    key = Path(folder).resolve()
    _guards[key] = check
    try:
        yield
    finally:
        _guards.pop(key, None)


def _check_guards(path: Path) -> None:
    for folder in path.resolve().parents:
        check = _guards.get(folder)
        if check is not None:
            check()


def _sweep_orphans(path: Path) -> None:
    """Remove temporary files of ``path`` left by processes of this host that died mid-write."""
    for tmp in path.parent.glob(f".{glob.escape(path.name)}.{_HOST}-*.tmp"):
        pid = tmp.name[len(path.name) + len(_HOST) + 3 :].split(".", 1)[0]
        if pid.isdigit() and int(pid) != os.getpid() and not pid_alive(int(pid)):
            tmp.unlink(missing_ok=True)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, digests: dict[str, str] | None = None) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; on success it is renamed over ``path``, on error removed.

    ``digests``: gets ``{file name: sha256}`` of the bytes this call wrote, taken from its own temporary file
    before the rename (a record vouching for the file must not hash whatever a late writer left there)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.{_HOST}-{os.getpid()}.", suffix=".tmp", dir=path.parent)
    os.fchmod(fd, 0o666 & ~_UMASK)  # mkstemp makes 0600; outputs get the usual permissions
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        with open(tmp_path, "rb+") as f:
            os.fsync(f.fileno())
        if digests is not None:
            digests[path.name] = sha256_file(tmp_path)
        faults.point(f"write:{path.name}")
        _land(tmp_path, path)
        _sweep_orphans(path)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def promote(src: str | os.PathLike, dst: str | os.PathLike) -> None:
    """Rename a whole file written earlier (by :func:`atomic_path`) over ``dst``, under ``dst``'s folder's write
    guard: the second step of a two-step commit (a staged checkpoint made current once the state that names it
    is saved)."""
    dst = Path(dst)
    faults.point(f"promote:{dst.name}")
    _land(Path(src), dst)


def _land(src: Path, dst: Path) -> None:
    """Rename ``src`` over ``dst`` once the folder's write guard allows it, then sync the folder's entries. The
    guard is asked again after the rename: a writer whose rename was delayed past the loss of its lock stops
    there (the file it landed is one that the newer holder's record does not vouch for)."""
    guarded_now = bool(_guards)
    if guarded_now:
        _check_guards(dst)
    faults.point(f"land:{dst.name}")
    os.replace(src, dst)
    fsync_dir(dst.parent)
    if guarded_now:
        _check_guards(dst)


def fsync_dir(folder: str | os.PathLike) -> None:
    """Flush a folder's entries (a rename into it) to disk; a no-op where folders cannot be opened."""
    try:
        fd = os.open(folder, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:  # some filesystems (and all of Windows) refuse to fsync a folder
        pass
    finally:
        os.close(fd)


def _write_with(
    path: str | os.PathLike,
    mode: str,
    writer: Callable[[IO[Any]], None],
    digests: dict[str, str] | None = None,
) -> Path:
    with atomic_path(path, digests) as tmp, open(tmp, mode, newline="" if "b" not in mode else None) as f:
        writer(f)
    return Path(path)


def write_text(path: str | os.PathLike, text: str, digests: dict[str, str] | None = None) -> Path:
    """Atomically write ``text`` (UTF-8) to ``path`` (``digests``: see :func:`atomic_path`)."""
    return _write_with(path, "w", lambda f: f.write(text), digests)


NAN_REASON = "not a finite number (a metric undefined on this data, e.g. the AUC of a fold with one class)"


def finite(obj: Any, where: str = "", nulls: dict[str, str] | None = None) -> Any:
    """``obj`` with every NaN or infinite float replaced by None; ``nulls`` collects ``{key path: reason}``."""
    if isinstance(obj, float) and not math.isfinite(obj):
        if nulls is not None:
            nulls[where or "."] = f"{obj!r}: {NAN_REASON}"
        return None
    if isinstance(obj, dict):
        return {k: finite(v, f"{where}.{k}" if where else str(k), nulls) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [finite(v, f"{where}[{i}]", nulls) for i, v in enumerate(obj)]
    return obj


def write_json(path: str | os.PathLike, obj: Any) -> Path:
    """Atomically write ``obj`` as indented, key-sorted JSON; NaN and infinities become null, and a dict
    record's ``nulls`` field names each of them and why (a strict JSON write would fail at the very end)."""
    nulls: dict[str, str] = {}
    obj = finite(obj, nulls=nulls)
    if nulls and isinstance(obj, dict):
        obj = {**obj, "nulls": {**(obj.get("nulls") or {}), **nulls}}
    return write_text(path, json.dumps(obj, indent=2, sort_keys=True, allow_nan=False) + "\n")


def write_csv(
    path: str | os.PathLike,
    df: pd.DataFrame,
    float_format: str | None = None,
    digests: dict[str, str] | None = None,
) -> Path:
    """Atomically write a DataFrame as CSV without its index (``digests``: see :func:`atomic_path`)."""
    return _write_with(path, "w", lambda f: df.to_csv(f, index=False, float_format=float_format), digests)


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def sha256_text(text: str) -> str:
    """Hex sha256 of a string's UTF-8 bytes."""
    return hashlib.sha256(text.encode()).hexdigest()
