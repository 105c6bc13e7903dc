"""The image cache's file format, its writer (:class:`CacheWriter`) and its reader (:class:`CachedSource`);
building is in :mod:`aivh_ens.data.cache`.

One file per (data folder, storage step, decoder versions): ``<cache_dir>/<data>-<tag>-<hash>.imgcache``::

    [images: C-order (h, w, 3) uint8, back to back][index: UTF-8 JSON][offset: u64][length: u64][magic: 8 B]

The index holds, per image path (relative to the data folder): byte offset, shape, file size and mtime (ns)
at decode time, or the reason the image could not be decoded.

- A reader keeps the version of the file its index came from (an open descriptor, inherited by forked
  workers), so a rebuild by another process never pairs one version's offsets with another's pixels.
- Readers map the file lazily in each process (a dataset sent to a worker carries no array), copy one
  image out per read and give the mapped pages back every ``RELEASE_BYTES`` (``MADV_DONTNEED``): resident
  memory stays bounded by the batches in flight, whatever the data set's size."""

from __future__ import annotations

import contextlib
import hashlib
import json
import mmap
import os
import struct
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


def cache_file(cache_dir: str | Path, root: str | Path, storage: StorageStep) -> Path:
    """The cache file for a data folder and storage step."""
    key = cache_key(root, storage)
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:12]
    stem = "".join(c if c.isalnum() or c in "-_." else "-" for c in Path(key["data"]).name) or "data"
    return Path(cache_dir) / f"{stem}-{storage.tag}-{digest}{SUFFIX}"


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
    """The index of the cache file at ``path``; None if it is missing, incomplete, corrupt or another key's."""
    opened = _open_index(path, key)
    if opened is None:
        return None
    os.close(opened[0])
    return opened[1]


def _open_index(path: str | Path, key: dict[str, Any]) -> tuple[int, CacheIndex] | None:
    """An open file descriptor of the cache file and the index read through it (None as for read_index).

    Index and pixels must come from one version of the file: a rebuild may rename a new one over the path
    at any time, so the reader keeps this descriptor (see :class:`CachedSource`).
    """
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return None
    try:
        idx = _parse_index(fd, key)
    except BaseException:
        os.close(fd)
        raise
    if idx is None:
        os.close(fd)
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
            (int(st.st_dev), int(st.st_ino)),
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
    """An :class:`~aivh_ens.data.loader.ImageSource` over a cache file, in the caller's order of images.

    It reads the version of the file its index came from: it owns an open descriptor of it (inherited by
    forked workers), so a rebuild renamed over the path meanwhile changes nothing here. The file is mapped
    lazily, once per process; pickling (to a spawned worker) carries neither the mapping nor the descriptor,
    and the worker reopens the path, refusing a file other than the one the index came from. ``get`` returns
    a writable copy, ``view`` a read-only view; mapped pages are given back every ``RELEASE_BYTES`` (see
    :meth:`release`).
    """

    def __init__(self, path: str | Path, root: str | Path, names: Sequence[str], index: CacheIndex, fd: int):
        self.path = Path(path)
        self.root = Path(root)
        self.names = list(names)
        pos = np.array([index.pos[n] for n in self.names], dtype=np.int64)  # (N,) rows of the index
        self.offsets = index.offsets[pos] if len(pos) else np.zeros(0, np.int64)  # (N,)
        self.shapes = index.shapes[pos] if len(pos) else np.zeros((0, 3), np.int64)  # (N, 3)
        self.reasons = {i: index.bad[n] for i, n in enumerate(self.names) if n in index.bad}
        self.data_bytes = index.data_bytes
        self.identity = index.identity
        self._fd = fd  # owned: closed when this object goes
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
        if getattr(self, "_fd", -1) >= 0 and self._fd_pid == os.getpid():
            with contextlib.suppress(OSError):
                os.close(self._fd)

    def __len__(self) -> int:
        return len(self.names)

    @property
    def array(self) -> np.ndarray:
        """The whole image area of the file: a read-only (data_bytes,) uint8 memory map."""
        if self._arr is None or self._pid != os.getpid():
            if self._fd >= 0:  # this process or a fork of it: the very file the index came from
                self._mm = mmap.mmap(self._fd, 0, access=mmap.ACCESS_READ)
            else:
                with open(self.path, "rb") as f:
                    st = os.fstat(f.fileno())
                    if (int(st.st_dev), int(st.st_ino)) != self.identity:
                        raise UserError(
                            f"image cache {self.path} was rebuilt while this run was reading it; "
                            "run the command again"
                        )
                    self._mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
            self._arr = np.frombuffer(self._mm, dtype=np.uint8, count=self.data_bytes)
            self._pid = os.getpid()
        return self._arr

    def get(self, i: int) -> np.ndarray:
        return self.view(i).copy()

    def view(self, i: int) -> np.ndarray:
        """Image ``i`` as a read-only (h, w, 3) uint8 view of the mapping, for readers that only read it
        (valid while this object lives: a released page faults back in from the page cache)."""
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

    def finish(self) -> None:
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
