"""Full-decode verdicts kept between calls: whether each image decodes, keyed by its path, size and mtime.

Every ``cv`` and ``sweep`` fully decodes every train image before it writes anything (a truncated JPEG has a
fine header). At 80k images on 4 vCPUs that is minutes per call. The verdicts are kept in one small JSON file
per data folder under the cache folder (``runs/cache/verdicts-<hash>.json``), so the next call decodes only
the images that are new or changed (another size or mtime).
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from aivh_ens.io import sha256_text, write_text

VERDICTS_VERSION = 1
Stat = tuple[int, int]  # (size in bytes, mtime in ns)


def verdicts_path(cache_dir: str | Path, data: str | Path) -> Path:
    """The verdict file of a data folder (its real path hashed: two links to one folder share it)."""
    return Path(cache_dir) / f"verdicts-{sha256_text(os.path.realpath(data))[:12]}.json"


def _stat(path: Path) -> Stat | None:
    try:
        st = path.stat()  # follows links: the image the path reads
    except OSError:
        return None
    return int(st.st_size), int(st.st_mtime_ns)


@dataclass
class Verdicts:
    """The verdicts of one data folder: ``{relative path: (size, mtime_ns, reason or None)}``."""

    path: Path | None  # where they are kept; None keeps nothing
    entries: dict[str, tuple[int, int, str | None]] = field(default_factory=dict)

    @classmethod
    def read(cls, path: Path | None) -> Verdicts:
        """The stored verdicts; an empty set when the file is missing, unreadable or of another version."""
        if path is None or not path.is_file():
            return cls(path)
        try:
            doc = json.loads(path.read_text())
            if doc.get("version") != VERDICTS_VERSION:
                return cls(path)
            entries = {k: (int(v[0]), int(v[1]), v[2]) for k, v in doc["entries"].items()}
        except (OSError, ValueError, KeyError, TypeError, IndexError):
            return cls(path)  # a damaged file costs one full decode, never a wrong verdict
        return cls(path, entries)

    def check(
        self, root: Path, files: Sequence[str], decode: Callable[[list[int]], dict[int, str]]
    ) -> tuple[dict[int, str], int]:
        """``({row: reason} for images that fail, images decoded)``, decoding only rows without a verdict
        for their current size and mtime; the new verdicts are added to this set (:meth:`save` keeps them).

        Args:
            root: the data folder; files: image paths relative to it.
            decode: rows -> {row: reason} of those that fail a full decode.
        """
        stats = [_stat(root / f) for f in files]
        todo = [
            i
            for i, (f, st) in enumerate(zip(files, stats, strict=True))
            if st is None or self.entries.get(f, (None, None))[:2] != st
        ]
        fresh = decode(todo) if todo else {}
        for i in todo:
            if stats[i] is not None:
                self.entries[files[i]] = (*stats[i], fresh.get(i))
        bad = {i: self.entries[f][2] for i, f in enumerate(files) if f in self.entries and self.entries[f][2]}
        bad.update(fresh)
        return dict(sorted(bad.items())), len(todo)

    def save(self) -> None:
        """Write the verdicts atomically, compact (80k images: ~5 MB); nothing when they have no file."""
        if self.path is None:
            return
        doc = {"version": VERDICTS_VERSION, "entries": {k: list(v) for k, v in self.entries.items()}}
        write_text(self.path, json.dumps(doc, separators=(",", ":")) + "\n")

    def __deepcopy__(self, memo: dict) -> Verdicts:
        # They travel in a table's ``attrs``, which pandas deep-copies into every table derived from it: one
        # shared set, not a copy of every entry per operation.
        return self
