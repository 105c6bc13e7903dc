"""Validated train/test tables: the competition CSVs parsed strictly, every listed image confined to the data folder.

:func:`read_train_table` and :func:`read_test_table` name the line of the first bad row, and check that every
listed image lies inside the data folder and exists. No torch here."""

from __future__ import annotations

import csv
import io
import os
import re
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from aivh_ens.errors import UserError

DEFAULT_TRAIN_CSV = "train.csv"


DEFAULT_TEST_CSV = "test.csv"


# Cells a spreadsheet or pandas writes for "no value"; none of them is a plausible image path or group.
_NA_TOKENS = frozenset({"", "nan", "NaN", "NAN", "NA", "N/A", "n/a", "null", "NULL", "None", "none", "<NA>"})


_UNNAMED = re.compile(r"Unnamed: \d+")  # pandas' name for a header cell left empty (a saved index)


_SEPARATORS = {";": "semicolon", "\t": "tab", "|": "pipe"}


# Column names other datasets use, to suggest the right --file-col/--label-col/--id-col.
_ALIASES = {
    "file": ("file_name", "filename", "file", "image", "image_path", "img", "path", "image_id", "id"),
    "label": ("label", "target", "class", "is_ai", "ai", "labels", "y"),
    "id": ("id", "file_name", "filename", "image", "image_id", "image_path", "path", "file"),
}


def read_train_table(
    data_dir: str | Path,
    csv: str = DEFAULT_TRAIN_CSV,
    file_col: str = "file_name",
    label_col: str = "label",
    group_col: str | None = None,
    check_files: bool = True,
) -> pd.DataFrame:
    """Read and validate the training table.

    Args:
        data_dir: folder holding the CSV and the images (``--data``).
        csv: CSV file name inside ``data_dir`` (an absolute path is used as is).
        file_col: column with image paths relative to ``data_dir``.
        label_col: column with labels, 0 = human-made, 1 = AI-generated (1.0/0.0 accepted).
        group_col: optional column whose values group rows that must share a fold.
        check_files: also check that every image exists (following symbolic links); the lexical checks,
            absolute paths and ``..``, always run.

    Returns:
        Columns ``file_name`` (str, as written in the CSV), ``label`` (int64, 0/1) and, with ``group_col``,
        ``group`` (str, as written); CSV row order, RangeIndex.

    Raises:
        UserError: the CSV is missing or malformed, a value is bad, or an image is missing or outside
            ``data_dir`` as written.
    """
    path = _csv_path(data_dir, csv)
    wanted = [file_col, label_col] + ([group_col] if group_col else [])
    expected = ",".join(dict.fromkeys(wanted))
    header, rows, lines = _read_csv(path, expected)
    idx = _column_index(path, header, expected)
    fi = _require(path, idx, header, file_col, "--file-col", _ALIASES["file"])
    li = _require(path, idx, header, label_col, "--label-col", _ALIASES["label"])
    gi = _require(path, idx, header, group_col, "--group", ()) if group_col else None

    files = [r[fi] for r in rows]
    _check_present(path, files, lines, file_col, f"every row needs an image path relative to {data_dir}")
    labels = _parse_labels(path, [r[li] for r in rows], lines, label_col)
    out = {"file_name": files, "label": labels}
    if gi is not None:
        groups = [r[gi] for r in rows]
        _check_present(path, groups, lines, group_col, "every row needs a group (or leave out --group)")
        out["group"] = groups
    _check_paths(path, data_dir, files, lines, file_col, "--file-col", check_files)
    return pd.DataFrame(out)


def read_test_table(
    data_dir: str | Path, csv: str = DEFAULT_TEST_CSV, id_col: str = "id", check_files: bool = True
) -> pd.DataFrame:
    """Read and validate the test table.

    Args:
        data_dir: folder holding the CSV and the images (``--data``).
        csv: CSV file name inside ``data_dir`` (an absolute path is used as is).
        id_col: column with the image ids, which are image paths relative to ``data_dir`` (Kaggle layout).
        check_files: also check that every image exists (following symbolic links).

    Returns:
        One column ``id`` (str, as written in the CSV); CSV row order, RangeIndex.

    Raises:
        UserError: the CSV is missing or malformed, an id is empty or repeated, or an image is missing or
            outside ``data_dir`` as written.
    """
    path = _csv_path(data_dir, csv)
    header, rows, lines = _read_csv(path, id_col)
    idx = _column_index(path, header, id_col)
    ii = _require(path, idx, header, id_col, "--id-col", _ALIASES["id"])
    ids = [r[ii] for r in rows]
    _check_present(path, ids, lines, id_col, f"every row needs an image path relative to {data_dir}")
    _check_paths(path, data_dir, ids, lines, id_col, "--id-col", check_files)
    return pd.DataFrame({"id": ids})


def read_score_table(path: str | Path, fix: str) -> pd.DataFrame:
    """Read an ``id,prob`` file (what ``submit --proba`` writes): one score in [0, 1] per image id.

    Args:
        path: the CSV (UTF-8 with or without a BOM, CRLF or LF line ends).
        fix: how the caller's user supplies another file (e.g. ``"pass --pseudo FILE"``), for the errors.

    Returns:
        Columns ``id`` (str, as written) and ``prob`` (float64); file row order, RangeIndex.

    Raises:
        UserError: the file is missing or malformed, lacks ``id`` or ``prob``, repeats an id, or holds a
            score that is not a number in [0, 1] (NaN included); names the file and the line.
    """
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path} not found; {fix} (an id,prob file such as `aivh-ens submit --proba` writes)")
    header, rows, lines = _read_csv(path, "id,prob")
    idx = _column_index(path, header, "id,prob")
    for col in ("id", "prob"):
        if col not in idx:
            found = ", ".join(c for c in header if c) or "none"
            raise UserError(
                f"{path} has no column {col!r} (columns found: {found}); it needs the columns id,prob, as "
                f"`aivh-ens submit --proba` writes them; {fix}"
            )
    ids = [r[idx["id"]] for r in rows]
    _check_present(path, ids, lines, "id", fix)
    raw = [r[idx["prob"]] for r in rows]
    probs = pd.to_numeric(pd.Series(raw, dtype=object).str.strip(), errors="coerce").to_numpy(np.float64)
    bad = np.flatnonzero(~((probs >= 0) & (probs <= 1)))  # NaN fails both comparisons
    if len(bad):
        i = int(bad[0])
        raise UserError(
            f"{path} line {lines[i]}: prob {raw[i]!r} is not a number in [0, 1] ({_count(len(bad), 'bad row')}); "
            f"scores must be probabilities of label 1 (AI); {fix}"
        )
    seen: dict[str, int] = {}
    for i, v in enumerate(ids):
        if v in seen:
            raise UserError(f"{path} line {lines[i]}: id {_show(v)} repeats line {lines[seen[v]]}; {fix}")
        seen[v] = i
    return pd.DataFrame({"id": ids, "prob": probs})


def resolve_image_path(data_dir: str | Path, rel: str) -> Path:
    """Absolute path of ``rel`` inside ``data_dir``.

    The path must stay inside ``data_dir`` as written (no ``..`` out of it, not absolute); symbolic links
    under ``data_dir`` are followed wherever they lead (an image folder linked to another disk is common on
    Kaggle and clusters): whoever can make links in the data folder chose where it reads from.

    Raises:
        UserError: ``rel`` is empty or absolute, or escapes ``data_dir`` with ``..``.
    """
    problem = _lexical_problem(rel)
    if problem:
        raise UserError(
            f"image path {rel!r} {problem}; paths must be relative to --data ({data_dir}) and stay inside it"
        )
    return Path(os.path.abspath(os.path.join(data_dir, rel)))


def _csv_path(data_dir: str | Path, csv_name: str) -> Path:
    """The CSV's path, or a UserError naming what is missing and the --data option."""
    data_dir = Path(data_dir)
    path = data_dir / csv_name
    if path.is_file():
        return path
    if not data_dir.is_dir():
        raise UserError(
            f"data folder {data_dir} does not exist; "
            f"pass --data DIR with the folder that holds {csv_name} and the images"
        )
    if path.exists():
        raise UserError(f"{path} is not a file; pass --data DIR with the folder that holds {csv_name}")
    found = sorted(p.name for p in data_dir.glob("*.csv"))[:5]
    seen = f" (CSV files there: {', '.join(found)})" if found else " (no CSV files there)"
    raise UserError(f"{path} not found{seen}; pass --data DIR with the folder that holds {csv_name}")


def _read_text(path: Path, expected: str) -> str:
    """The file as text: UTF-8 with or without a BOM; UTF-16 and other encodings are refused by line."""
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise UserError(f"{path} cannot be read ({e.strerror or e}); check its permissions") from None
    if raw.startswith((b"\xff\xfe", b"\xfe\xff")):
        raise UserError(f"{path} is UTF-16 encoded; save it as UTF-8 (comma-separated columns {expected})")
    try:
        return raw.decode("utf-8-sig")  # -sig: a leading BOM (Excel's "CSV UTF-8") is not part of the header
    except UnicodeDecodeError as e:
        line = raw.count(b"\n", 0, e.start) + 1
        raise UserError(
            f"{path} line {line} is not UTF-8 (byte {raw[e.start]:#04x}); save the file as UTF-8 text"
        ) from None


def _records(path: Path, text: str) -> tuple[list[list[str]], list[int]]:
    """CSV records and the line each starts on (header = line 1)."""
    reader = csv.reader(io.StringIO(text, newline=""))
    try:
        if '"' in text:  # a quoted cell may span lines: take each record's first line from the reader
            records: list[list[str]] = []
            ends: list[int] = []
            for rec in reader:
                records.append(rec)
                ends.append(reader.line_num)
            return records, [1, *(end + 1 for end in ends[:-1])]
        records = list(reader)  # one record per line, blank lines included (as [])
        return records, list(range(1, len(records) + 1))
    except csv.Error as e:
        raise UserError(
            f"{path} line {reader.line_num}: cannot parse CSV ({e}); fix or re-export that line"
        ) from None


def _read_csv(path: Path, expected: str) -> tuple[list[str], list[list[str]], list[int]]:
    """Header, rows (lists of cells) and each row's first line number in the file (header = line 1).

    Blank lines and rows of empty cells are skipped, a trailing separator on every line is ignored, and one
    unnamed leading cell per row (pandas' saved index) is dropped when the header has no cell for it.
    """
    records, starts = _records(path, _read_text(path, expected))
    # Blank lines and rows of empty cells (spreadsheet exports end with some) carry nothing.
    keep = [i for i, r in enumerate(records) if r and (r[0].strip() or any(c.strip() for c in r[1:]))]
    if not keep:
        raise UserError(f"{path} is empty; expected a header line {expected} and one row per image")
    header = [cell.strip() for cell in records[keep[0]]]
    header_line = starts[keep[0]]
    rows = [records[i] for i in keep[1:]]
    lines = [starts[i] for i in keep[1:]]

    if len(header) == 1:
        for sep, name in _SEPARATORS.items():
            if sep in header[0]:
                raise UserError(f"{path} looks {name}-separated; expected comma-separated columns {expected}")
    if not rows:
        raise UserError(f"{path} has a header ({','.join(header)}) but no rows; expected one row per image")

    n = len(header)
    if all(len(r) == n + 1 for r in rows):
        if all(not r[-1].strip() for r in rows):
            rows = [r[:-1] for r in rows]  # every line ends with a separator
        else:
            header = ["", *header]  # a saved index without a header cell, as pandas reads it
    for r, line in zip(rows, lines, strict=True):
        if len(r) != len(header):
            raise UserError(
                f"{path} line {line} has {len(r)} cells but the header (line {header_line}) "
                f"has {len(header)} "
                f"({','.join(header)}); fix that line (a value containing a comma must be quoted)"
            )
    return header, rows, lines


def _column_index(path: Path, header: list[str], expected: str) -> dict[str, int]:
    """Column name -> position; unnamed columns (a saved index) are kept out of the lookup."""
    idx: dict[str, int] = {}
    for i, name in enumerate(header):
        if not name:
            continue
        if name in idx:
            raise UserError(f"{path} has two columns named {name!r}; expected one each of {expected}")
        idx[name] = i
    return idx


def _require(
    path: Path, idx: dict[str, int], header: list[str], name: str, option: str, aliases: Sequence[str]
) -> int:
    """Position of column ``name``, or a UserError listing the columns found and the option to rename."""
    if name in idx:
        return idx[name]
    found = [c for c in header if c and not _UNNAMED.fullmatch(c)]
    guess = next((c for c in found if c.lower() == name.lower()), None)
    guess = guess or next((c for a in aliases for c in found if c.lower() == a), None)
    hint = f"pass {option} {guess}" if guess else f"rename the column in the file or pass {option} COLUMN"
    raise UserError(f"{path} has no column {name!r} (columns found: {', '.join(found) or 'none'}); {hint}")


def _check_present(path: Path, values: list[str], lines: list[int], col: str, need: str) -> None:
    """UserError naming the first row whose ``col`` is empty or a NaN token."""
    bad = [i for i, v in enumerate(values) if v.strip() in _NA_TOKENS]
    if bad:
        i = bad[0]
        what = "empty" if not values[i].strip() else f"missing ({values[i]!r})"
        raise UserError(f"{path} line {lines[i]}: {col} is {what} ({_count(len(bad), 'such row')}); {need}")


def _parse_labels(path: Path, raw: list[str], lines: list[int], col: str) -> np.ndarray:
    """(N,) int64 labels from cells that must read as 0 or 1 (integral floats such as 1.0 are fine)."""
    cells = pd.Series(raw, dtype=object).str.strip()
    if cells.isin(["0", "1"]).all():  # the common case, no float parsing
        return (cells == "1").to_numpy(np.int64)
    num = pd.to_numeric(cells, errors="coerce")  # 'ai', '', 'NaN' -> NaN
    ok = num.isin([0, 1]).to_numpy()
    if not ok.all():
        bad = np.flatnonzero(~ok)
        i = int(bad[0])
        raise UserError(
            f"{path} line {lines[i]}: {col} {raw[i]!r} is not 0 or 1 ({_count(len(bad), 'bad row')}); "
            f"labels must be 0 (human-made) or 1 (AI-generated)"
        )
    return num.to_numpy(np.float64).astype(np.int64)


def _lexical_problem(rel: str) -> str | None:
    """Why ``rel`` cannot name a file inside the data folder, judged from the string alone."""
    if not rel or not rel.strip():
        return "is empty"
    if os.path.isabs(rel) or os.path.splitdrive(rel)[0]:
        return "is absolute"
    norm = os.path.normpath(rel)
    if norm == os.pardir or norm.startswith(os.pardir + os.sep):
        return "escapes the data folder with '..'"
    return None


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}" + ("" if n == 1 else "s")


def _show(name: str) -> str:
    """A path for a message: bare when readable, quoted when whitespace or control characters would hide."""
    return name if name == name.strip() and name.isprintable() else repr(name)


def _check_paths(
    path: Path,
    data_dir: str | Path,
    files: list[str],
    lines: list[int],
    col: str,
    option: str,
    check_files: bool,
) -> None:
    """Refuse absolute, escaping, repeated and (with check_files) missing image paths."""
    # 'a/./b.jpg' and 'a/b.jpg' name the same image; normpath only where a string can be non-normal.
    posix = os.sep == "/"
    norm = [
        os.path.normpath(f)
        if not posix or "//" in f or "/." in f or f.startswith(".") or f.endswith("/")
        else f
        for f in files
    ]
    suspect = ("/", "..", os.sep)
    for i in [i for i, n in enumerate(norm) if n.startswith(suspect) or not posix]:
        problem = _lexical_problem(files[i])
        if problem:
            raise UserError(
                f"{path} line {lines[i]}: {col} {files[i]!r} {problem}; "
                "image paths must be relative to --data "
                f"({data_dir}) and stay inside it, e.g. train_data/a.jpg"
            )
    _check_duplicates(path, files, norm, lines, col)
    if not check_files:
        return

    missing = _missing_files(path, data_dir, files, norm, lines, col)
    if missing:
        missing.sort()
        first = ", ".join(f"{_show(files[i])} line {lines[i]}" for i in missing[:5])
        more = ", ..." if len(missing) > 5 else ""
        hint = f"check --data and {option}, or remove those rows"
        if len(missing) == len(files):
            hint = f"none exists: is --data ({data_dir}) the folder that holds {norm[0].split(os.sep)[0]}?"
        raise UserError(
            f"{len(missing)} of {len(files)} images listed in {path.name} are missing under "
            f"{str(data_dir).rstrip('/' + os.sep)}/ (first: {first}{more}); {hint}"
        )


def _missing_files(
    path: Path, data_dir: str | Path, files: list[str], norm: list[str], lines: list[int], col: str
) -> list[int]:
    """Rows whose image does not exist (or is not a file); symbolic links are followed."""
    # One listing per directory instead of a stat per file (the Kaggle layout has two directories);
    # DirEntry knows from the listing alone whether a name is a symlink or a regular file.
    root = os.path.realpath(data_dir)
    by_dir: dict[str, list[int]] = {}
    for i, n in enumerate(norm):
        by_dir.setdefault(n[: n.rfind(os.sep) + 1], []).append(i)
    missing: list[int] = []
    for d, rows in by_dir.items():
        real_dir = os.path.realpath(os.path.join(root, d))
        try:
            with os.scandir(real_dir) as it:
                entries = {e.name: e for e in it}
        except (FileNotFoundError, NotADirectoryError):
            entries = {}
        except OSError as e:
            raise UserError(f"cannot list {real_dir} ({e.strerror or e}); check its permissions") from None
        cut = len(d)
        for i in rows:
            entry = entries.get(norm[i][cut:])
            if entry is None:
                missing.append(i)
            elif entry.is_symlink():
                if not os.path.isfile(entry.path):  # follows the link; a dangling one is missing
                    missing.append(i)
            elif not entry.is_file():
                missing.append(i)
    return missing


def _check_duplicates(path: Path, files: list[str], norm: list[str], lines: list[int], col: str) -> None:
    """UserError naming the first repeated image paths and the lines they appear on."""
    keys = pd.Series(norm, dtype=object)
    dup = keys.duplicated(keep=False).to_numpy()
    if not dup.any():
        return
    at: dict[str, list[int]] = {}
    for i in np.flatnonzero(dup):
        at.setdefault(norm[i], []).append(int(i))
    first = "; ".join(
        f"{_show(files[rows[0]])} on lines {', '.join(str(lines[i]) for i in rows[:4])}"
        for rows in list(at.values())[:3]
    )
    raise UserError(
        f"{path} lists {_count(len(at), 'image')} more than once in {col} (first: {first}); "
        "each image must appear once: remove the repeated rows"
    )
