"""Image cache versions: immutable content-named files, readers that keep theirs (in this process and in
others), removal once nobody reads a version, and readers that never build."""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pytest

from aivh_ens.config import resolve_config
from aivh_ens.data import cache as C
from aivh_ens.data import cache_format as CF
from aivh_ens.data.loader import FileSource
from aivh_ens.data.transforms import StorageStep

QUIET = dict(progress=False, log=lambda s: None)
STORAGE = StorageStep("square", 32)  # what the "tiny" recipe stores at img_size 32


@pytest.fixture
def data(tmp_path, demo_data) -> tuple[Path, list[str]]:
    """A private copy of 12 demo images."""
    demo = demo_data(n=120, n_test=20, seed=3)
    d = tmp_path / "data"
    names = pd.read_csv(demo / "train.csv")["file_name"].tolist()[:12]
    for n in names:
        (d / n).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(demo / n, d / n)
    return d, names


def add_image(root: Path, name: str, seed: int) -> str:
    img = np.random.default_rng(seed).integers(0, 256, (48, 40, 3), dtype=np.uint8)
    cv2.imwrite(str(root / name), img)
    return name


def digest(img: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(img).tobytes()).hexdigest()


def test_a_rebuild_writes_a_new_file_and_leaves_the_old_one_as_it_was(tmp_path, data):
    root, names = data
    cdir = tmp_path / "c"
    src = C.ensure_cache(root, names, STORAGE, cdir, **QUIET)
    old = src.path
    st, before = os.stat(old), old.read_bytes()
    extra = add_image(root, "added.png", 1)
    new = C.ensure_cache(root, [*names, extra], STORAGE, cdir, **QUIET)
    assert new.path != old and new.path.name.startswith(CF.cache_stem(cdir, root, STORAGE).name + "-")
    after = os.stat(old)
    assert (after.st_ino, after.st_mtime_ns) == (st.st_ino, st.st_mtime_ns) and old.read_bytes() == before
    for i, n in enumerate(names):  # read for the first time after the rebuild, from the old version
        np.testing.assert_array_equal(src.get(i), STORAGE.load(root / n), err_msg=n)
    np.testing.assert_array_equal(new.get(len(names)), STORAGE.load(root / extra))
    assert CF.versions(CF.cache_stem(cdir, root, STORAGE)) == [new.path, old]  # newest first


HOLDER = r"""
import hashlib, os, sys
from aivh_ens.data import cache as C
from aivh_ens.data.transforms import StorageStep

root, cdir, mode, *names = sys.argv[1:]
src = C.ensure_cache(root, names, StorageStep("square", 32), cdir, build=False, progress=False, log=print)
assert src is not None
child = -1
if mode == "fork":  # a forked child (as a loader worker) keeps the inherited descriptor; the parent closes it
    r, w = os.pipe()
    child = os.fork()
    if child == 0:
        os.close(w)
        os.read(r, 1)
        os._exit(0)
    os.close(r)
    src.close()
print("holding", src.path, flush=True)
for line in sys.stdin:
    print(hashlib.sha256(src.get(int(line)).tobytes()).hexdigest(), flush=True)
if child > 0:
    os.close(w)
    os.waitpid(child, 0)
"""


@pytest.mark.parametrize("mode", ["reader", "fork"])
def test_a_version_read_by_another_process_stays_until_it_exits(tmp_path, data, mode):
    root, names = data
    cdir = tmp_path / "c"
    stem = CF.cache_stem(cdir, root, STORAGE)
    first = C.ensure_cache(root, names[:6], STORAGE, cdir, **QUIET)
    old, expect = first.path, [digest(first.get(i)) for i in range(6)]
    first.close()
    proc = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(root), str(cdir), mode, *names[:6]],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        lines = [proc.stdout.readline().strip()]
        while not lines[-1].startswith("holding") and lines[-1]:
            lines.append(proc.stdout.readline().strip())
        assert lines[-1] == f"holding {old}", lines
        second = C.ensure_cache(root, names[:8], STORAGE, cdir, **QUIET)  # a new version; the old one is read
        assert second.path != old and old.exists()
        second.close()
        third = C.ensure_cache(root, [*names[:8], add_image(root, "x.png", 2)], STORAGE, cdir, **QUIET)
        assert old.exists() and not second.path.exists()  # still read there; nobody reads the second
        third.close()
        if mode == "reader":  # its reads after both rebuilds come from its own version
            for i in (0, 5):
                proc.stdin.write(f"{i}\n")
                proc.stdin.flush()
                assert proc.stdout.readline().strip() == expect[i]
    finally:
        proc.stdin.close()
        assert proc.wait() == 0
    last = C.ensure_cache(root, [*names, "x.png"], STORAGE, cdir, **QUIET)
    assert not old.exists() and CF.versions(stem) == [last.path]


def test_build_false_reads_only_built_versions(tmp_path, data):
    root, names = data
    cdir = tmp_path / "c"
    logs: list[str] = []
    assert C.ensure_cache(root, names, STORAGE, cdir, build=False, progress=False, log=logs.append) is None
    assert logs == [C.NOT_BUILT] and not cdir.exists()  # no cache file, no folder, no lock

    cfg = resolve_config("tiny", img_size=32, cache="on")
    src = C.open_source(cfg, root, names, tmp_path, build=False, **QUIET)
    assert isinstance(src, FileSource) and src.storage == STORAGE
    assert not (tmp_path / "runs" / "cache").exists()
    built = C.open_source(cfg, root, names, tmp_path, **QUIET)  # the driver builds
    served = C.open_source(cfg, root, names[2:5], tmp_path, build=False, **QUIET)
    assert isinstance(served, CF.CachedSource) and served.path == built.path
    np.testing.assert_array_equal(served.get(0), STORAGE.load(root / names[2]))


def test_build_false_accepts_an_older_version_that_holds_the_images(tmp_path, data):
    """The newest version lacks an image (changed, then restored) that an older, still read, version holds."""
    root, names = data
    cdir = tmp_path / "c"
    v1 = C.ensure_cache(root, names[:4], STORAGE, cdir, **QUIET)  # read: it stays
    victim = root / names[1]
    saved, st = victim.read_bytes(), os.stat(victim)
    cv2.imwrite(str(victim), np.zeros((30, 30, 3), np.uint8))
    os.utime(victim, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    v2 = C.ensure_cache(root, [names[0], add_image(root, "y.png", 3)], STORAGE, cdir, **QUIET)
    assert v2.path != v1.path and CF.versions(CF.cache_stem(cdir, root, STORAGE))[0] == v2.path
    victim.write_bytes(saved)
    os.utime(victim, ns=(st.st_atime_ns, st.st_mtime_ns))  # as it was when v1 was built
    got = C.ensure_cache(root, names[:2], STORAGE, cdir, build=False, **QUIET)
    assert got is not None and got.path == v1.path
    np.testing.assert_array_equal(got.get(1), STORAGE.load(victim))


def test_a_version_is_named_by_its_content(tmp_path, data):
    root, names = data
    a = C.ensure_cache(root, names, STORAGE, tmp_path / "a", **QUIET)
    b = C.ensure_cache(root, names, STORAGE, tmp_path / "b", **QUIET)
    assert a.path.name == b.path.name and a.path.read_bytes() == b.path.read_bytes()
    stem = CF.cache_stem(tmp_path / "a", root, STORAGE)

    # The same content built again (the version at that name is truncated) lands under the same name, once.
    whole = a.path.read_bytes()
    a.close()
    a.path.write_bytes(whole[:100])
    again = C.ensure_cache(root, names, STORAGE, tmp_path / "a", **QUIET)
    assert again.path == a.path and CF.versions(stem) == [a.path] and a.path.read_bytes() == whole

    # Other content (one image changed): another name.
    cv2.imwrite(str(root / names[0]), np.full((30, 30, 3), 7, np.uint8))
    other = C.ensure_cache(root, names, STORAGE, tmp_path / "a", **QUIET)
    assert other.path != a.path and other.path.read_bytes() != whole
