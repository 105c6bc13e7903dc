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


def _anchor(heading: str) -> str:
    """The anchor MkDocs (Python-Markdown's toc) gives a heading."""
    import re

    text = re.sub(r"[^\w\s-]", "", heading.strip("# ").lower())
    return re.sub(r"[\s]+", "-", text).strip("-")


def test_readme_links_point_to_files_and_headings() -> None:
    """Every relative link of the README names a file that exists, and its #anchor a heading there (the
    README is not part of the site, so mkdocs --strict does not check it)."""
    import re

    root = README.parent
    for target in re.findall(r"\]\(([^)#:]+)(#[^)]+)?\)", README.read_text(encoding="utf-8")):
        path, anchor = target
        assert (root / path).exists(), path
        if anchor:
            headings = [line for line in (root / path).read_text().splitlines() if line.startswith("#")]
            assert anchor[1:] in {_anchor(h) for h in headings}, (path, anchor)
