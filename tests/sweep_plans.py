"""Plan files for the sweep tests (tests/scale/)."""

from __future__ import annotations

from pathlib import Path

TINY = {"recipe": "tiny", "img_size": 32, "batch_size": 16, "folds": 3, "group": "pairs", "epochs": 1}


def write_plan(path: Path, data: Path, runs: list[dict], **shared: object) -> Path:
    """A plan file: [shared] (TINY, the data folder and ``shared``) and one [[runs]] table per dict."""

    def fmt(v: object) -> str:
        if isinstance(v, bool):
            return str(v).lower()
        if isinstance(v, str):
            return f'"{v}"'
        if isinstance(v, (list, tuple)):
            return "[" + ", ".join(fmt(x) for x in v) + "]"
        return repr(v)

    lines = ["[shared]", f'data = "{data}"']
    lines += [f"{k} = {fmt(v)}" for k, v in {**TINY, **shared}.items()]
    for run in runs:
        lines += ["", "[[runs]]", *(f"{k} = {fmt(v)}" for k, v in run.items())]
    path.write_text("\n".join(lines) + "\n")
    return path
