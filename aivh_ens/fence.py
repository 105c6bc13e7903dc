"""Fences: which holder of a lock may write a folder's files, and which holder's files a reader may trust.

A holder of a :class:`aivh_ens.locks.FileLock` that writes under a folder (a sweep job and a ``cv`` fold under
their fold lock, through :func:`aivh_ens.locks.fenced`) first claims the folder's fence, ``fence.json``: its
lock's generation and token. Each write under the folder then checks the fence just before its rename and
again just after (:func:`aivh_ens.io.guarded`): a fence of a higher generation means that another process
took the lock over, and the write is refused (before) or the writer stops (after).

No filesystem check can stop a rename that was checked and then delayed (an NFS stall) from landing after a
newer holder's last write. So the record a holder writes last (a fold's ``done.json``) vouches for the files
it finished with: their sha256 and its generation (:func:`vouch`). Readers check it (:func:`unvouched`) and
refuse a file that a late write replaced, naming the fold to retrain.
"""

from __future__ import annotations

import json
import os
import socket
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from aivh_ens.io import sha256_file, write_json

FENCE = "fence.json"


def read_fence(folder: str | os.PathLike) -> dict[str, Any]:
    """The folder's fence record (``generation``, ``token``, ``host``, ``pid``), or {} when it has none."""
    try:
        doc = json.loads((Path(folder) / FENCE).read_text())
    except (FileNotFoundError, json.JSONDecodeError, UnicodeDecodeError):
        return {}
    return doc if isinstance(doc, dict) else {}


def newer_holder(folder: str | os.PathLike, generation: int, token: str) -> dict[str, Any] | None:
    """The fence record of a holder newer than (``generation``, ``token``), or None when the fence is ours, older,
    or absent."""
    fence = read_fence(folder)
    theirs = fence.get("generation")
    if not isinstance(theirs, int) or theirs < generation:
        return None
    if theirs == generation and fence.get("token") in (None, token):
        return None
    return fence


def claim(folder: str | os.PathLike, generation: int, token: str) -> None:
    """Put this holder's generation in the folder's fence (the caller's write guard refuses it when a newer
    holder's fence is already there)."""
    record = {"generation": generation, "token": token, "host": socket.gethostname(), "pid": os.getpid()}
    write_json(Path(folder) / FENCE, record)


def vouch(folder: str | os.PathLike, digests: Mapping[str, str | None]) -> dict[str, Any]:
    """What a finished folder's last record says of its files: the fence's generation and each file's sha256.

    ``digests``: ``{file name: sha256}`` of the bytes this holder wrote, taken when it wrote them
    (:func:`aivh_ens.io.atomic_path`); a file given None (one an earlier holder wrote) is hashed as it is now."""
    folder = Path(folder)
    return {
        "generation": read_fence(folder).get("generation"),
        "sha256": {n: d or sha256_file(folder / n) for n, d in digests.items()},
    }


def unvouched(
    folder: str | os.PathLike, record: dict[str, Any], name: str, digest: str | None = None
) -> str | None:
    """Why file ``name`` of ``folder`` is not the one ``record`` (a ``done.json``) vouches for, or None when it
    is (or when the record names no digest for it). ``digest``: the file's sha256, when the caller has it."""
    want = (record.get("sha256") or {}).get(name)
    if not want:
        return None
    path = Path(folder) / name
    if not path.is_file():
        return f"{path} is missing"
    got = digest or sha256_file(path)
    if got == want:
        return None
    return (
        f"{path} is not the file its done.json vouches for (sha256 {got[:12]}..., expected {want[:12]}...): a "
        "process that had lost the fold's lock replaced it after the fold finished"
    )
