"""Decode-once image cache: every image decoded and put through the storage step once, then read from a
memory-mapped uint8 file for every fold, model and epoch.

A cross-validation of M models x K folds x E epochs otherwise decodes (and resizes) each file K*M*E times.
The cache stores exactly what the storage step (:func:`aivh_ens.data.transforms.storage_step`) makes of each
image, and training without the cache runs that same step on the fly: a run gives the same results with or
without it.

Each build writes a new version, an immutable file named by the sha256 of its index
(:mod:`aivh_ens.data.cache_format`): ``<cache_dir>/<data>-<tag>-<hash>-<digest12>.imgcache``, where
``<data>-<tag>-<hash>`` names the data folder, storage step and decoder versions. The index holds, per image
path (relative to the data folder): byte offset, shape, file size and mtime (ns) at decode time, or the
reason the image could not be decoded. Any complete version that holds every wanted image unchanged serves
any subset of its images (``cv`` reads the train images while ``aivh-ens cache`` adds the test images in a
new version); the newest is tried first, and it is the one current.

Guarantees:

- A build writes a temporary file, fsyncs it and renames it to its version's name, which no file had: a
  reader sees complete versions only, and a version is never renamed over or modified (on shared storage,
  other hosts may map it). A file whose trailer or index does not check out is treated as absent.
- An image that is new, or whose size or mtime changed, is decoded again; the others are copied from the
  newest complete version. Decoding runs in parallel (joblib threads: OpenCV and Pillow release the GIL).
- One builder at a time per cache (a lock file naming its PID); another process that needs the same cache
  waits for it, then uses what it built. With ``build=False`` (a sweep's jobs), a process never builds: with
  no version to read, it decodes on the fly.
- The size is computed from the image headers and printed before a build. A build that would not leave
  ``DISK_MARGIN`` free stops with a :class:`UserError` (``cache="on"``), or falls back to decoding on the
  fly (``"auto"``).
- A reader keeps the version its index came from: it holds an open descriptor (inherited by forked
  workers) under a shared ``flock``. After a build, the builder removes each older version on which it gets
  an exclusive lock at once; one that is being read stays (on disk) until a later build finds it free. On
  Linux NFS, flock is emulated with POSIX byte-range locks, honoured across hosts where the NFS lock
  manager runs.
- Readers map the file lazily in each process (a dataset sent to a worker carries no array), copy one
  image out per read and give the mapped pages back every ``RELEASE_BYTES`` (``MADV_DONTNEED``): resident
  memory stays bounded by the batches in flight, whatever the data set's size.
"""

from __future__ import annotations

import glob
import os
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from aivh_ens import layout, system
from aivh_ens.config import RunConfig
from aivh_ens.data.cache_format import (
    _MISSING,
    CachedSource,
    CacheIndex,
    CacheWriter,
    _let_go,
    _open_index,
    _stat,
    cache_key,
    cache_stem,
    read_index,
    remove_unused,
    version_file,
    versions,
)
from aivh_ens.data.images import BadImageError, image_size
from aivh_ens.data.loader import FileSource, ImageSource
from aivh_ens.data.tables import read_test_table, read_train_table
from aivh_ens.data.transforms import StorageStep, storage_step
from aivh_ens.errors import UserError
from aivh_ens.io import atomic_path, promote
from aivh_ens.locks import FileLock, read_owner

Log = Callable[[str], None]


DISK_MARGIN = 512 << 20  # bytes a build leaves free on the cache's disk (checkpoints and logs need room too)


CHUNK = 32  # images per parallel task


def _decode(path: Path, storage: StorageStep) -> np.ndarray | str:
    """The stored image, or the reason it cannot be decoded."""
    try:
        return storage.load(path)
    except BadImageError as e:
        return e.reason


def _decode_chunk(root: Path, names: Sequence[str], storage: StorageStep) -> list[np.ndarray | str]:
    return [_decode(root / n, storage) for n in names]


def _decode_all(
    root: Path, names: Sequence[str], storage: StorageStep, jobs: int
) -> Iterator[np.ndarray | str]:
    """Stored images in ``names`` order, decoded by ``jobs`` threads (a bounded number in flight)."""
    chunks = [names[i : i + CHUNK] for i in range(0, len(names), CHUNK)]
    if jobs <= 1 or len(chunks) <= 1:
        for c in chunks:
            yield from _decode_chunk(root, c, storage)
        return
    from joblib import Parallel, delayed

    with system.cv2_threads(1):
        par = Parallel(n_jobs=jobs, prefer="threads", return_as="generator", pre_dispatch="2*n_jobs")
        for out in par(delayed(_decode_chunk)(root, c, storage) for c in chunks):
            yield from out


def _estimate(root: Path, names: Sequence[str], storage: StorageStep, jobs: int) -> int:
    """Bytes the stored images of ``names`` take, from their headers (unreadable ones count 0)."""

    def one(n: str) -> int:
        try:
            w, h = image_size(root / n)
        except BadImageError:
            return 0
        sh, sw = storage.shape(h, w)
        return sh * sw * 3

    with ThreadPoolExecutor(max(1, jobs)) as ex:
        return int(sum(ex.map(one, names, chunksize=256)))


def _gb(n: int) -> str:
    return f"{n / 1e9:.3g} GB"


def _take_lock(stem: Path, log: Log) -> FileLock:
    """The build lock of a cache; waits while another live process holds it."""
    lock = FileLock(stem.with_name(stem.name + ".lock"), what=f"image cache {stem.name}")
    told = False
    while True:
        try:
            lock.acquire()
            return lock
        except UserError:
            owner = read_owner(lock.path) or {}
            if owner.get("pid") == os.getpid():
                raise
            if not told:
                log(f"image cache {stem.name}: waiting for PID {owner.get('pid', '?')}, which is building it")
                told = True
            time.sleep(1.0)


def _usable_source(
    path: Path, key: dict[str, Any], root: Path, names: Sequence[str], wanted: list[str], stats: dict
) -> CachedSource | None:
    """A reader of the version at ``path`` when it is complete, matches ``key`` and holds every wanted image
    unchanged."""
    opened = _open_index(path, key)
    if opened is None:
        return None
    fd, idx = opened
    if not all(idx.fresh(n, stats[n]) for n in wanted):
        _let_go(idx.identity)
        return None
    return CachedSource(path, root, names, idx, fd)


NOT_BUILT = (
    "image cache: no built version holds these images; decoding on the fly (the sweep's driver builds it)"
)


def ensure_cache(
    root: str | Path,
    names: Sequence[str],
    storage: StorageStep,
    cache_dir: str | Path,
    *,
    required: bool = True,
    build: bool = True,
    jobs: int | None = None,
    progress: bool = True,
    log: Log = print,
) -> CachedSource | None:
    """A :class:`CachedSource` of ``names`` (paths relative to ``root``) from any complete version that holds
    them all unchanged (the newest first), building a new version when none does.

    Args:
        root: data folder.
        names: image paths relative to ``root``, in the order the source serves them.
        storage: the storage step the cache holds the output of.
        cache_dir: folder of the cache files.
        required: a build that does not fit on the disk raises (True) or returns None (False: the caller
            decodes on the fly instead).
        build: False: never build (a sweep's jobs read what its driver built); None when no version serves.
        jobs: decoding threads (default: every core).
        progress: show a progress bar while decoding.
        log: where the one-line messages go (size before a build, reuse, fallback).

    Raises:
        UserError: ``required`` and the disk lacks room for the build.
    """
    root, cache_dir = Path(root), Path(cache_dir)
    key = cache_key(root, storage)
    stem = cache_stem(cache_dir, root, storage)
    wanted = list(dict.fromkeys(names))
    jobs = jobs or system.cores()
    with ThreadPoolExecutor(max(1, jobs)) as ex:
        stats = dict(zip(wanted, ex.map(lambda n: _stat(root / n), wanted, chunksize=512), strict=True))

    def source_if_usable() -> CachedSource | None:
        for path in versions(stem):
            src = _usable_source(path, key, root, names, wanted, stats)
            if src is not None:
                return src
        return None

    src = source_if_usable()
    if src is not None:
        log(f"image cache: {src.path} ({len(wanted)} images, {_gb(src.nbytes)}, storage {storage.tag})")
        return src
    if not build:
        log(NOT_BUILT)
        return None
    cache_dir.mkdir(parents=True, exist_ok=True)
    lock = _take_lock(stem, log)
    try:
        src = source_if_usable()  # another process may have built it while we waited
        if src is None:
            path = _build(stem, key, root, wanted, stats, storage, required=required, jobs=jobs,
                          progress=progress, log=log)  # fmt: skip
            if path is None:
                return None
            src = _usable_source(path, key, root, names, wanted, stats)
            if src is None:
                raise RuntimeError(f"image cache {path} was written but cannot be read back")
            remove_unused(stem, keep=path)
    finally:
        lock.release()
    return src


def _build(
    stem: Path,
    key: dict[str, Any],
    root: Path,
    wanted: list[str],
    stats: dict[str, tuple[int, int]],
    storage: StorageStep,
    *,
    required: bool,
    jobs: int,
    progress: bool,
    log: Log,
) -> Path | None:
    """Write a new version (under the cache's lock); its path, or None if it would not fit and ``required``
    is False. The newest complete version's unchanged images are copied, not decoded."""
    staging = stem.with_name(stem.name + ".building")
    for stale in [staging, *staging.parent.glob(f".{glob.escape(staging.name)}.*.tmp")]:
        stale.unlink(missing_ok=True)  # left by a killed build: only we may build now
    old, old_src = None, None
    for path in versions(stem):
        opened = _open_index(path, key)
        if opened is not None:
            old, old_src = opened[1], CachedSource(path, root, opened[1].names, opened[1], opened[0])
            break
    try:
        return _write(stem, key, root, wanted, stats, old, old_src, storage, required=required, jobs=jobs,
                      progress=progress, log=log)  # fmt: skip
    finally:
        if old_src is not None:
            old_src.close()  # before old versions are removed: this process's hold would keep it


def _reusable_rows(
    old: CacheIndex | None, root: Path, stats: dict[str, tuple[int, int]], jobs: int
) -> list[int]:
    """Rows of the old index to copy into the new file: entries whose file is unchanged, requested or not."""
    if old is None:
        return []
    others = [n for n in old.names if n not in stats]
    with ThreadPoolExecutor(max(1, jobs)) as ex:
        other_stats = dict(zip(others, ex.map(lambda n: _stat(root / n), others, chunksize=512), strict=True))
    keep = []
    for i, n in enumerate(old.names):
        st = stats.get(n) or other_stats.get(n)
        if st is not None and st != _MISSING and tuple(old.stats[i]) == st:
            keep.append(i)
    return keep


def _copy_rows(writer: CacheWriter, src: CachedSource, old: CacheIndex, keep: list[int]) -> None:
    """Copy the ``keep`` rows of the old version (images and unreadable entries); ``src`` serves its rows."""
    for i in keep:
        name, stat = old.names[i], tuple(old.stats[i])
        if name in old.bad:
            writer.add_bad(name, old.bad[name], stat)  # type: ignore[arg-type]
        else:
            writer.add(name, src.get(i), tuple(old.shapes[i]), stat)  # type: ignore[arg-type]


def _decode_into(
    writer: CacheWriter,
    root: Path,
    todo: list[str],
    stats: dict[str, tuple[int, int]],
    storage: StorageStep,
    jobs: int,
    progress: bool,
) -> None:
    """Decode ``todo`` in parallel (in order) and append each image, or its reason for being unreadable."""
    from aivh_ens.progress import Progress

    with Progress(None, "image cache", total=len(todo), unit="img", enabled=progress and bool(todo)) as bar:
        for n, out in zip(todo, _decode_all(root, todo, storage, jobs), strict=True):
            if isinstance(out, str):
                writer.add_bad(n, out, stats[n])
            else:
                writer.add(n, out, out.shape, stats[n])
            bar.update()


SMALLER_STORAGE = "--img-size, --train-resize, --eval-resize set the stored size"


def _room(folder: Path, need: int, required: bool, log: Log) -> bool:
    """Whether ``need`` bytes leave ``DISK_MARGIN`` free in ``folder``; raises instead when ``required``."""
    free = system.free_bytes(folder)
    if need + DISK_MARGIN <= free:
        return True
    msg = f"the image cache needs {_gb(need)} (plus {_gb(DISK_MARGIN)} spare) but {folder} has only "
    msg += f"{_gb(free)} free"
    if required:
        raise UserError(
            f"{msg}; free some space, or pass --cache-dir on a larger disk, a smaller stored size "
            f"({SMALLER_STORAGE}), or --cache off"
        )
    log(f"{msg}: decoding on the fly instead (--cache-dir DIR puts the cache elsewhere; {SMALLER_STORAGE})")
    return False


def _place(staging: Path, path: Path, key: dict[str, Any]) -> Path:
    """Make the complete file ``staging`` the version ``path``, unless that version (the same index, so the
    same content) is already in place; a version is never renamed over, only a file that is not one."""
    if read_index(path, key) is not None:
        staging.unlink()
    else:
        promote(staging, path)
    return path


def _write(
    stem: Path,
    key: dict[str, Any],
    root: Path,
    wanted: list[str],
    stats: dict[str, tuple[int, int]],
    old: CacheIndex | None,
    old_src: CachedSource | None,
    storage: StorageStep,
    *,
    required: bool,
    jobs: int,
    progress: bool,
    log: Log,
) -> Path | None:
    keep = _reusable_rows(old, root, stats, jobs)
    kept = {old.names[i] for i in keep} if old is not None else set()
    todo = [n for n in wanted if n not in kept]
    reuse_bytes = sum(old.nbytes(i) for i in keep) if old is not None else 0
    need = reuse_bytes + _estimate(root, todo, storage, jobs)
    log(
        f"image cache: {_gb(need)} for {len(keep) + len(todo)} images ({len(todo)} to decode, {len(keep)} "
        f"reused), storage {storage.tag}, in {stem.parent}"
    )
    if not _room(stem.parent, need, required, log):
        return None
    t0 = time.perf_counter()
    staging = stem.with_name(stem.name + ".building")
    with atomic_path(staging) as tmp, open(tmp, "wb") as f:
        writer = CacheWriter(f, key)
        if keep:
            _copy_rows(writer, old_src, old, keep)  # type: ignore[arg-type]
        _decode_into(writer, root, todo, stats, storage, jobs, progress)
        digest = writer.finish()
    path = _place(staging, version_file(stem, digest), key)
    bad = sum(1 for n in wanted if n in writer.bad)
    log(
        f"image cache: wrote {path.name} ({_gb(writer.offset)}, {len(todo)} decoded in "
        f"{time.perf_counter() - t0:.1f}s{f', {bad} unreadable' if bad else ''})"
    )
    return path


def model_img_size(cfg: RunConfig) -> int:
    """The input size a run trains at: ``cfg.img_size``, else its (first) model's default, as built."""
    if cfg.img_size:
        return int(cfg.img_size)
    import timm

    from aivh_ens.train.models import check_model_name

    name = cfg.backbones[0]
    check_model_name(name)
    pc = timm.models.get_pretrained_cfg(name)
    if pc is not None and getattr(pc, "input_size", None):
        return int(pc.input_size[-1])
    model = timm.create_model(name, pretrained=False)
    return int(timm.data.resolve_model_data_config(model)["input_size"][-1])


def default_cache_dir(cfg: RunConfig, workdir: str | Path) -> Path:
    """``cfg.cache_dir``, else ``<workdir>/runs/cache``."""
    return Path(cfg.cache_dir) if cfg.cache_dir else layout.cache_dir(workdir)


def open_source(
    cfg: RunConfig,
    root: str | Path,
    names: Sequence[str],
    workdir: str | Path = ".",
    *,
    img_size: int | None = None,
    build: bool = True,
    progress: bool = True,
    log: Log = print,
) -> ImageSource:
    """The images a run reads: from the image cache (``cfg.cache`` on, or auto and it fits), else decoded on
    the fly; both through the run's storage step, so they give the same pixels. ``build=False`` reads only a
    version already built (a sweep's jobs: its driver builds), else decodes on the fly.

    Raises:
        UserError: ``cfg.cache == "on"`` and the disk lacks room for the cache.
    """
    storage = storage_step(cfg, img_size or model_img_size(cfg))
    if cfg.cache != "off":
        src = ensure_cache(
            root,
            names,
            storage,
            default_cache_dir(cfg, workdir),
            required=cfg.cache == "on",
            build=build,
            jobs=None,
            progress=progress,
            log=log,
        )
        if src is not None:
            return src
    return FileSource(root, names, storage)


def cache_dataset(
    cfg: RunConfig,
    workdir: str | Path = ".",
    *,
    size: int | None = None,
    jobs: int | None = None,
    progress: bool = True,
    log: Log = print,
) -> dict[str, Any]:
    """Cache every train and test image of ``cfg.data`` (test.csv when present) for ``cfg``'s pipeline.

    Returns ``{"path", "images", "bytes", "storage", "bad"}``; ``path`` is the version that holds them (the
    newest that does).

    Raises:
        UserError: a table is invalid, or the disk lacks room.
    """
    root = Path(cfg.data)
    names = read_train_table(root, cfg.train_csv, file_col=cfg.file_col, label_col=cfg.label_col)["file_name"]
    names = names.tolist()
    if (root / cfg.test_csv).is_file():
        names += read_test_table(root, cfg.test_csv, id_col=cfg.id_col)["id"].tolist()
    storage = storage_step(cfg, model_img_size(cfg), size=size)
    src = ensure_cache(
        root,
        names,
        storage,
        default_cache_dir(cfg, workdir),
        required=True,
        jobs=jobs,
        progress=progress,
        log=log,
    )
    assert src is not None  # required=True raises instead
    return {
        "path": src.path,
        "images": len(src),
        "bytes": src.nbytes,
        "storage": storage.tag,
        "bad": len(src.reasons),
    }
