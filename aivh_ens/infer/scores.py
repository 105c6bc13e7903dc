"""The test-score cache: ``runs/<run>/test/``, keyed by the run, the TTA views and the test images."""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from aivh_ens.config import training_identity
from aivh_ens.io import sha256_file, sha256_text, write_csv, write_json
from aivh_ens.layout import test_scores_dir
from aivh_ens.score.runs import RunInfo
from aivh_ens.score.tta import TTASpec

CACHE_VERSION = 1


def cache_paths(
    workdir: str | Path, run: str, spec: TTASpec, average: str = "prob", adapt_bn: bool = False
) -> tuple[Path, Path]:
    """``runs/<run>/test/<tta>[_logit][_adabn].csv`` and its sidecar ``.json``."""
    d = test_scores_dir(workdir, run)
    stem = spec.file_stem + ("_logit" if average == "logit" else "") + ("_adabn" if adapt_bn else "")
    return d / f"{stem}.csv", d / f"{stem}.json"


def test_files_digest(data_dir: str | Path, ids: Sequence[str]) -> str:
    """sha256 of each test id with its file size and mtime: an added, removed or rewritten file changes it."""
    h = hashlib.sha256()
    for i in ids:
        st = os.stat(Path(data_dir) / i)
        h.update(f"{i}\t{st.st_size}\t{st.st_mtime_ns}\n".encode())
    return h.hexdigest()


def scores_key(
    info: RunInfo,
    spec: TTASpec,
    data_dir: str | Path,
    test_csv: str,
    ids: Sequence[str],
    average: str = "prob",
    adapt_bn: bool = False,
) -> dict[str, Any]:
    """What a run's cached test scores depend on (compared as a whole; any difference means re-predict)."""
    return {
        "version": CACHE_VERSION,
        "run": info.name,
        "config_sha256": sha256_text(json.dumps(training_identity(info.cfg), sort_keys=True)),
        "weights_sha256": [sha256_file(w) for w in info.weights],
        "tta": spec.name,
        "average": average,
        "adapt_bn": adapt_bn,
        "data": str(Path(data_dir).resolve()),
        "test_csv": test_csv,
        "n": len(ids),
        "files_sha256": test_files_digest(data_dir, ids),
    }


def read_cache(csv_path: Path, meta_path: Path, key: dict[str, Any], ids: Sequence[str]) -> np.ndarray | None:
    """The cached fold scores (K, N) if the sidecar's key equals ``key`` and the CSV is intact, else None."""
    try:
        meta = json.loads(meta_path.read_text())
        if meta.get("key") != key or sha256_file(csv_path) != meta.get("csv_sha256"):
            return None
        df = pd.read_csv(csv_path, dtype={"id": str}, keep_default_na=False)
    except (OSError, ValueError):
        return None
    cols = [f"fold{k}" for k in range(len(key["weights_sha256"]))]
    if df["id"].tolist() != list(ids) or not set(cols) <= set(df.columns):
        return None
    P = df[cols].to_numpy(dtype=np.float32).T  # (K, N)
    return P if bool(np.all((P >= 0) & (P <= 1))) else None


def write_cache(
    csv_path: Path,
    meta_path: Path,
    key: dict[str, Any],
    ids: Sequence[str],
    P: np.ndarray,
    info: dict[str, Any],
) -> None:
    """Write the scores, then the sidecar (removed first, so a crash in between leaves no stale match)."""
    meta_path.unlink(missing_ok=True)
    df = pd.DataFrame({"id": list(ids), "prob": P.astype(np.float64).mean(axis=0)})
    for k, row in enumerate(P):
        df[f"fold{k}"] = row
    write_csv(csv_path, df, float_format="%.9g")  # 9 digits: float32 round-trips exactly
    write_json(meta_path, {"key": key, "csv_sha256": sha256_file(csv_path), **info})
