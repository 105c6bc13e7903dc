"""The image cache's file format, its versions, its writer (:class:`CacheWriter`) and its reader
(:class:`CachedSource`); building is in :mod:`aivh_ens.data.cache`.

A cache holds one data folder's images after one storage step, decoded by given decoder versions (its key,
named ``<data>-<tag>-<hash>``, the stem). Each build writes a new version, an immutable file named after the
sha256 of its index, ``<cache_dir>/<stem>-<digest12>.imgcache``::

    [images: C-order (h, w, 3) uint8, back to back][index: UTF-8 JSON][offset: u64][length: u64][magic: 8 B]

The index holds, per image path (relative to the data folder): byte offset, shape, file size and mtime (ns)
at decode time, or the reason the image could not be decoded. Versions with the same index have the same
name; a version, once in place, is never renamed over or modified, only removed when nobody reads it.

- A reader holds a shared ``flock`` on the descriptor it keeps (inherited by forked workers; the lock
  belongs to the open file description, so it lasts while any process keeps the descriptor). A builder
  removes an older version only when it gets an exclusive lock on it without waiting. On Linux NFS, flock
  is emulated with POSIX byte-range locks: it is honoured across hosts where the NFS lock manager runs, a
  lock is the process's (a forked worker relies on its parent's), and closing any descriptor of the file
  drops it, so a process keeps one descriptor and one mapping per version (:func:`_hold`).
- Readers map the file lazily in each process (a dataset sent to a worker carries no array), copy one
  image out per read and give the mapped pages back every ``RELEASE_BYTES`` (``MADV_DONTNEED``): resident
  memory stays bounded by the batches in flight, whatever the data set's size."""

from __future__ import annotations

import contextlib
import fcntl
import glob
import hashlib
import json
import mmap
import os
import re
import struct
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

from aivh_ens.data.images import BadImageError
from aivh_ens.data.transforms import StorageStep
from aivh_ens.errors import UserError

SUFFIX = ".imgcache"


MAGIC = b"AIVHIMC1"


FORMAT = 1


DIGEST_CHARS = 12  # hex digits of the index's sha256 in a version's name


_TRAILER = struct.Struct("<QQ8s")  # index offset, index length, magic


RELEASE_BYTES = 32 << 20  # a reader gives its mapped pages back after this many bytes (bounds its RSS)


_MISSING = (-1, -1)  # (size, mtime_ns) recorded for a file that could not be stat'ed


def cache_key(root: str | Path, storage: StorageStep) -> dict[str, Any]:
    """What a cache file's pixels depend on besides the images themselves (compared as a whole)."""
    import cv2
    import PIL

    return {
        "format": FORMAT,
        "data": os.path.realpath(root),
        "storage": storage.describe(),
        "decoders": {"opencv": cv2.__version__, "pillow": PIL.__version__},
    }


def cache_stem(cache_dir: str | Path, root: str | Path, storage: StorageStep) -> Path:
    """``<cache_dir>/<data>-<tag>-<hash>``: the common start of the names of a cache's versions (and lock)."""
    key = cache_key(root, storage)
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:12]
    stem = "".join(c if c.isalnum() or c in "-_." else "-" for c in Path(key["data"]).name) or "data"
    return Path(cache_dir) / f"{stem}-{storage.tag}-{digest}"


def version_file(stem: Path, digest: str) -> Path:
    """The file of the version whose index has the sha256 ``digest`` (hex)."""
    return stem.with_name(f"{stem.name}-{digest[:DIGEST_CHARS]}{SUFFIX}")


def versions(stem: Path) -> list[Path]:
    """The version files of a cache, newest (last modified) first; complete or not."""
    name = re.compile(re.escape(stem.name) + f"-[0-9a-f]{{{DIGEST_CHARS}}}" + re.escape(SUFFIX))
    found = []
    for p in stem.parent.glob(glob.escape(stem.name) + "-*" + SUFFIX):
        with contextlib.suppress(OSError):  # removed meanwhile
            if name.fullmatch(p.name):
                found.append((os.stat(p).st_mtime_ns, p.name, p))
    return [p for *_, p in sorted(found, reverse=True)]


Identity = tuple[int, int]  # (st_dev, st_ino): one version of a cache, whatever its name


def _identity(path: str | Path) -> Identity | None:
    try:
        return _st_identity(os.stat(path))
    except OSError:
        return None


def _st_identity(st: os.stat_result) -> Identity:
    return int(st.st_dev), int(st.st_ino)


_held: dict[Identity, list[Any]] = {}  # identity -> [fd, readers, mmap | None]: versions this process reads
_held_pid = os.getpid()
_guard = threading.Lock()  # over _held: loader threads may open sources
os.register_at_fork(after_in_child=lambda: globals().update(_guard=threading.Lock()))


def _this_process() -> dict[Identity, list[Any]]:
    """The versions this process holds; a forked child starts with none (its parent's are not its own)."""
    global _held_pid
    if _held_pid != os.getpid():
        _held.clear()
        _held_pid = os.getpid()
    return _held


def _hold(path: str | Path) -> tuple[int, Identity] | None:
    """A descriptor of the version at ``path``, under a shared lock, and its identity; None if it is missing
    or was removed while this waited for the lock. One descriptor per process and version, counted: give each
    hold back with :func:`_let_go`."""
    with _guard:
        held = _this_process()
        ident = _identity(path)
        if ident is not None and ident in held:
            held[ident][1] += 1
            return held[ident][0], ident
        try:
            fd = os.open(path, os.O_RDONLY)
        except OSError:
            return None
        try:
            with contextlib.suppress(OSError):  # a file system without locks: read unlocked (none removes it)
                fcntl.flock(fd, fcntl.LOCK_SH)
            if _st_identity(os.fstat(fd)) == ident == _identity(path):  # not removed meanwhile
                held[ident] = [fd, 1, None]
                return fd, ident
        except OSError:
            pass
        os.close(fd)
        return None


def _let_go(ident: Identity) -> None:
    """Give back one hold of a version; the last closes this process's mapping and descriptor (and lock)."""
    with _guard:
        held = _this_process()
        entry = held.get(ident)
        if entry is None:
            return
        entry[1] -= 1
        if entry[1] > 0:
            return
        del held[ident]
        if entry[2] is not None:
            with contextlib.suppress(BufferError):  # a view is still out: the mapping closes when it goes
                entry[2].close()
        os.close(entry[0])


def _mapping(ident: Identity) -> mmap.mmap:
    """This process's one read-only mapping of a held version (one: closing a copy would drop an NFS lock)."""
    with _guard:
        entry = _this_process()[ident]
        if entry[2] is None:
            entry[2] = mmap.mmap(entry[0], 0, access=mmap.ACCESS_READ)
        return entry[2]


def remove_unused(stem: Path, keep: Path) -> list[Path]:
    """Remove the versions of a cache other than ``keep`` that nobody reads: those this process does not hold
    and on which an exclusive lock is free at once. The others stay for a later build. Returns the removed."""
    removed = []
    for p in versions(stem):
        ident = _identity(p)
        with _guard:
            if p == keep or ident is None or ident in _this_process():
                continue
        try:  # NFS grants an exclusive (POSIX write) lock only through a descriptor open for writing
            fd = os.open(p, os.O_RDWR)
        except OSError:
            try:
                fd = os.open(p, os.O_RDONLY)
            except OSError:
                continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            if _st_identity(os.fstat(fd)) == ident == _identity(p):
                os.unlink(p)
                removed.append(p)
        except OSError:
            pass  # a reader holds it (or locks are not supported here): it stays
        finally:
            os.close(fd)
    return removed


@dataclass
class CacheIndex:
    """The index of a complete cache file."""

    names: list[str]
    offsets: np.ndarray  # (N,) int64 byte offsets; -1 for bad images
    shapes: np.ndarray  # (N, 3) int64
    stats: np.ndarray  # (N, 2) int64 (file size, mtime_ns) when decoded
    bad: dict[str, str]  # name -> reason
    data_bytes: int
    identity: tuple[int, int] = (0, 0)  # (st_dev, st_ino) of the file read: one version of the cache

    def __post_init__(self) -> None:
        self.pos = {n: i for i, n in enumerate(self.names)}

    def fresh(self, name: str, stat: tuple[int, int]) -> bool:
        """True if ``name`` is in the cache and its file still has the recorded size and mtime."""
        i = self.pos.get(name)
        return i is not None and tuple(self.stats[i]) == stat

    def nbytes(self, i: int) -> int:
        return int(np.prod(self.shapes[i])) if self.offsets[i] >= 0 else 0


def read_index(path: str | Path, key: dict[str, Any]) -> CacheIndex | None:
    """The index of the version at ``path``; None if it is missing, incomplete, corrupt or another key's."""
    opened = _open_index(path, key)
    if opened is None:
        return None
    _let_go(opened[1].identity)
    return opened[1]


def _open_index(path: str | Path, key: dict[str, Any]) -> tuple[int, CacheIndex] | None:
    """A held descriptor of the version at ``path`` (see :func:`_hold`) and the index read through it (None as
    for read_index). Index and pixels come from that one file: a reader keeps the descriptor
    (:class:`CachedSource`), and a builder removes no version a reader holds.
    """
    held = _hold(path)
    if held is None:
        return None
    fd, ident = held
    try:
        idx = _parse_index(fd, key)
    except BaseException:
        _let_go(ident)
        raise
    if idx is None:
        _let_go(ident)
        return None
    return fd, idx


def _parse_index(fd: int, key: dict[str, Any]) -> CacheIndex | None:
    try:
        st = os.fstat(fd)
        if st.st_size < _TRAILER.size:
            return None
        offset, length, magic = _TRAILER.unpack(os.pread(fd, _TRAILER.size, st.st_size - _TRAILER.size))
        if magic != MAGIC or offset + length + _TRAILER.size != st.st_size:
            return None
        doc = json.loads(os.pread(fd, length, offset))
    except (OSError, ValueError, UnicodeDecodeError, struct.error):
        return None
    if not isinstance(doc, dict) or doc.get("key") != key:
        return None
    try:
        idx = CacheIndex(
            list(doc["names"]),
            np.asarray(doc["offsets"], np.int64).reshape(-1),
            np.asarray(doc["shapes"], np.int64).reshape(-1, 3),
            np.asarray(doc["stats"], np.int64).reshape(-1, 2),
            dict(doc["bad"]),
            int(offset),
            _st_identity(st),
        )
    except (KeyError, TypeError, ValueError):
        return None
    ends = idx.offsets + idx.shapes.prod(axis=1)
    good = idx.offsets >= 0
    if not (len(idx.names) == len(idx.offsets) == len(idx.shapes) == len(idx.stats)) or (
        good.any() and (ends[good].max() > offset or idx.offsets[good].min() < 0)
    ):
        return None
    return idx


def _stat(path: Path) -> tuple[int, int]:
    try:
        st = os.stat(path)
    except OSError:
        return _MISSING
    return int(st.st_size), int(st.st_mtime_ns)


class CachedSource:
    """An :class:`~aivh_ens.data.loader.ImageSource` over a cache version, in the caller's order of images.

    It holds the version its index came from (a descriptor under a shared lock, inherited by forked workers)
    until it is closed or goes, so no build removes that file meanwhile. The file is mapped lazily, once per
    process; pickling (to a spawned worker) carries neither the mapping nor the descriptor, and the worker
    reopens the path, refusing a file other than the one the index came from. ``get`` returns a writable
    copy, ``view`` a read-only view; mapped pages are given back every ``RELEASE_BYTES`` (:meth:`release`).
    """

    def __init__(self, path: str | Path, root: str | Path, names: Sequence[str], index: CacheIndex, fd: int):
        """``fd``: one hold of the version (from :func:`_open_index`), given back by :meth:`close`."""
        self.path = Path(path)
        self.root = Path(root)
        self.names = list(names)
        pos = np.array([index.pos[n] for n in self.names], dtype=np.int64)  # (N,) rows of the index
        self.offsets = index.offsets[pos] if len(pos) else np.zeros(0, np.int64)  # (N,)
        self.shapes = index.shapes[pos] if len(pos) else np.zeros((0, 3), np.int64)  # (N, 3)
        self.reasons = {i: index.bad[n] for i, n in enumerate(self.names) if n in index.bad}
        self.data_bytes = index.data_bytes
        self.identity = index.identity
        self._fd = fd  # held: given back when this object is closed or goes
        self._fd_pid = os.getpid()
        self.nbytes = int(
            sum(int(np.prod(s)) for s, o in zip(self.shapes, self.offsets, strict=True) if o >= 0)
        )
        self._mm: mmap.mmap | None = None
        self._arr: np.ndarray | None = None
        self._pid = -1
        self._unreleased = 0  # bytes read since the last release()

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state.update(_mm=None, _arr=None, _pid=-1, _unreleased=0, _fd=-1, _fd_pid=-1)
        return state

    def __del__(self) -> None:
        with contextlib.suppress(Exception):  # at interpreter exit the module may be gone: the OS closes it
            self.close()

    def close(self) -> None:
        """Give back this process's hold of the version (views from :meth:`view` become invalid)."""
        if getattr(self, "_fd", -1) >= 0 and self._fd_pid == os.getpid():
            self._arr = self._mm = None
            self._pid = -1
            self._fd = -1
            _let_go(self.identity)

    def __len__(self) -> int:
        return len(self.names)

    @property
    def array(self) -> np.ndarray:
        """The whole image area of the file: a read-only (data_bytes,) uint8 memory map."""
        if self._arr is None or self._pid != os.getpid():
            if self._fd >= 0 and self._fd_pid == os.getpid():
                self._mm = _mapping(self.identity)
            elif self._fd >= 0:  # a forked worker: the inherited descriptor of the file the index came from
                self._mm = mmap.mmap(self._fd, 0, access=mmap.ACCESS_READ)
            else:
                held = _hold(self.path)
                if held is None or held[1] != self.identity:
                    if held is not None:
                        _let_go(held[1])
                    raise UserError(
                        f"image cache {self.path} was removed or replaced while this run was reading it; "
                        "run the command again"
                    )
                self._fd, self._fd_pid = held[0], os.getpid()
                self._mm = _mapping(self.identity)
            self._arr = np.frombuffer(self._mm, dtype=np.uint8, count=self.data_bytes)
            self._pid = os.getpid()
        return self._arr

    def get(self, i: int) -> np.ndarray:
        return self.view(i).copy()

    def view(self, i: int) -> np.ndarray:
        """Image ``i`` as a read-only (h, w, 3) uint8 view of the mapping, for readers that only read it
        (valid while this object is open: a released page faults back in from the page cache)."""
        if i in self.reasons:
            raise BadImageError(self.root / self.names[i], self.reasons[i])
        off = int(self.offsets[i])
        h, w, c = (int(v) for v in self.shapes[i])
        img = self.array[off : off + h * w * c].reshape(h, w, c)  # (h, w, 3) uint8
        self._unreleased += h * w * c
        if self._unreleased >= RELEASE_BYTES:
            self.release()
        return img

    def release(self) -> None:
        """Give the mapped pages back (``MADV_DONTNEED``): they stay in the page cache, out of this RSS.

        Pages of a shared file mapping count towards a process's resident memory until it gives them back,
        so without this a pass over the cache would look like it loads the whole file. Done every
        ``RELEASE_BYTES`` read, over the whole mapping (which also drops the pages the kernel mapped around
        each read); a later read of a released page costs a minor fault, not disk I/O.
        """
        self._unreleased = 0
        if self._mm is not None and hasattr(mmap, "MADV_DONTNEED"):
            with contextlib.suppress(OSError):  # not supported here: only the RSS accounting differs
                self._mm.madvise(mmap.MADV_DONTNEED)

    def describe(self, i: int) -> str:
        return self.names[i]


class CacheWriter:
    """Appends images to an open file in this format and records the index; ``finish`` writes index and trailer."""

    def __init__(self, f: BinaryIO, key: dict[str, Any]):
        self.f, self.key, self.offset = f, key, 0
        self.names: list[str] = []
        self.offsets: list[int] = []
        self.shapes: list[list[int]] = []
        self.stats: list[list[int]] = []
        self.bad: dict[str, str] = {}

    def add(
        self, name: str, img: np.ndarray | memoryview, shape: tuple[int, ...], stat: tuple[int, int]
    ) -> None:
        """Append one image's bytes (an (h, w, 3) uint8 array, or its raw bytes with ``shape``)."""
        data = memoryview(np.ascontiguousarray(img, dtype=np.uint8)).cast("B")
        if data.nbytes != int(np.prod(shape)):
            raise ValueError(f"{name}: {data.nbytes} bytes do not make shape {shape}")
        self.f.write(data)
        self._record(name, self.offset, shape, stat)
        self.offset += data.nbytes

    def add_bad(self, name: str, reason: str, stat: tuple[int, int]) -> None:
        self._record(name, -1, (0, 0, 3), stat)
        self.bad[name] = reason

    def _record(self, name: str, offset: int, shape: Sequence[int], stat: Sequence[int]) -> None:
        self.names.append(name)
        self.offsets.append(int(offset))
        self.shapes.append([int(v) for v in shape])  # plain ints: numpy's do not serialise to JSON
        self.stats.append([int(v) for v in stat])

    def finish(self) -> str:
        """Write the index and the trailer; returns the index's sha256 (hex), which names the version."""
        doc = {
            "key": self.key,
            "names": self.names,
            "offsets": self.offsets,
            "shapes": self.shapes,
            "stats": self.stats,
            "bad": self.bad,
        }
        index = json.dumps(doc, separators=(",", ":")).encode()
        self.f.write(index)
        self.f.write(_TRAILER.pack(self.offset, len(index), MAGIC))
        return hashlib.sha256(index).hexdigest()
