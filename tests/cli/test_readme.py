"""The README stays a ten-minute read: at most 300 lines, none over 200 characters, and the sections a new
user looks for, in the order they need them."""

from __future__ import annotations

from pathlib import Path

README = Path(__file__).resolve().parents[2] / "README.md"
SECTIONS = (
    "Install",
    "Quick start",
    "Kaggle",
    "Commands",
    "outputs",
    "key ideas",
    "Python API",
    "Results",
    "License",
)


def test_readme_is_short_and_ordered() -> None:
    lines = README.read_text(encoding="utf-8").splitlines()
    assert len(lines) <= 300
    assert [i + 1 for i, line in enumerate(lines) if len(line) > 200] == []
    headings = [line for line in lines if line.startswith("## ")]
    order = [next(i for i, h in enumerate(headings) if s.lower() in h.lower()) for s in SECTIONS]
    assert order == sorted(order)
    assert "kaggle.com/competitions/detect-ai-vs-human-generated-images" in lines[3] + lines[4]
