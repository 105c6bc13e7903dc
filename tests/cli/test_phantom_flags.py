"""No phantom flags: every ``--flag`` that README.md, docs/, a UserError message or a command's help names is
an option of some ``aivh-ens`` command, or is written beside the other tool it belongs to (``docker run
--shm-size``, ``pip install --no-index``)."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import click
import pytest

from aivh_ens.cli import main

ROOT = Path(__file__).resolve().parents[2]
FLAG = re.compile(r"(?<![\w-])--[a-z][a-z0-9]*(?:-[a-z0-9]+)*(?:-\*)?")

# Flags of other tools: allowed only on a line that names the tool (case-insensitive), so a reader sees whose
# flag it is. Bench scripts' own flags count as the bench's.
FOREIGN = {
    "--shm-size": ("docker",),
    "--no-index": ("pip",),
    "--find-links": ("pip",),
    "--no-deps": ("pip",),
    "--only-binary": ("pip",),
    "--platform": ("pip",),
    "--python-version": ("pip",),
    "--upgrade": ("pip",),
    "--system-site-packages": ("venv",),
    "--strict": ("mkdocs",),
    "--check": ("ruff",),
    "--indent": ("json.tool",),
    "--address": ("ray start",),
    "--num-gpus": ("ray start",),
    "--n-test": ("bench", "demo-data"),
}


BENCH_FLAGS = {
    flag
    for script in sorted((ROOT / "bench").glob("*.py"))
    for flag in re.findall(r"add_argument\(\s*\"(--[a-z0-9-]+)\"", script.read_text(encoding="utf-8"))
}
"""The bench scripts' own flags: they count where the line names a bench."""


def cli_flags(command: click.Command) -> set[str]:
    """Every long option of ``command`` and its subcommands, both sides of ``--x/--no-x``."""
    flags: set[str] = set()
    for param in command.params:
        if isinstance(param, click.Option):
            flags.update(o for o in (*param.opts, *param.secondary_opts) if o.startswith("--"))
    if isinstance(command, click.Group):
        for sub in command.commands.values():
            flags |= cli_flags(sub)
    return flags


KNOWN = cli_flags(main) | {"--help"}  # click adds --help to every command outside its params


def doc_lines() -> list[tuple[str, str]]:
    """(where, line) of README.md and every page under docs/."""
    files = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
    assert len(files) > 10, "the docs pages are missing"
    return [
        (f"{f.relative_to(ROOT)}:{i}", line)
        for f in files
        for i, line in enumerate(f.read_text(encoding="utf-8").splitlines(), 1)
    ]


def _strings(node: ast.AST, constants: dict[str, list[str]]) -> list[str]:
    """The string pieces of an expression: literals, f-string parts and module-level string constants."""
    out: list[str] = []
    for sub in ast.walk(node):
        if isinstance(sub, ast.Constant) and isinstance(sub.value, str):
            out.append(sub.value)
        elif isinstance(sub, ast.Name) and sub.id in constants:
            out += constants[sub.id]
    return out


def user_error_lines() -> list[tuple[str, str]]:
    """(where, line) of every string that goes into a ``UserError(...)`` in aivh_ens/."""
    found = []
    for path in sorted((ROOT / "aivh_ens").rglob("*.py")):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        constants = {
            t.id: _strings(node.value, {})
            for node in tree.body
            if isinstance(node, ast.Assign)
            for t in node.targets
            if isinstance(t, ast.Name)
        }
        for node in ast.walk(tree):
            func = getattr(node, "func", None)
            if isinstance(node, ast.Call) and getattr(func, "id", getattr(func, "attr", None)) == "UserError":
                where = f"{path.relative_to(ROOT)}:{node.lineno}"
                found += [(where, s) for arg in node.args for s in _strings(arg, constants)]
    assert len(found) > 100, "UserError messages were not found"
    return found


def help_lines() -> list[tuple[str, str]]:
    """(where, line) of every command's help and every option's help text."""
    out = []

    def walk(command: click.Command, path: str) -> None:
        out.append((path, command.help or ""))
        out.extend(
            (f"{path} {p.opts[0]}", p.help or "") for p in command.params if isinstance(p, click.Option)
        )
        if isinstance(command, click.Group):
            for name, sub in command.commands.items():
                walk(sub, f"{path} {name}")

    walk(main, "aivh-ens")
    return out


def phantoms(lines: list[tuple[str, str]]) -> list[str]:
    """``where: --flag`` for each flag that is neither an aivh-ens option nor beside its own tool."""
    bad = []
    for where, text in lines:
        for line in text.splitlines():
            for flag in FLAG.findall(line):
                if flag.endswith("-*") and any(k.startswith(flag[:-1]) for k in KNOWN):
                    continue  # a family, e.g. --slurm-*
                tools = FOREIGN.get(flag, ()) + (("bench",) if flag in BENCH_FLAGS else ())
                if flag in KNOWN or any(t in line.lower() for t in tools):
                    continue
                bad.append(f"{where}: {flag}")
    return bad


@pytest.mark.parametrize("source", [doc_lines, user_error_lines, help_lines])
def test_every_flag_named_exists(source) -> None:
    assert phantoms(source()) == []


def test_the_flags_the_docs_once_invented_are_real_now() -> None:
    """The flags the old README and an error message named without cv having them: cv has them now."""
    assert {
        "--train-resize",
        "--eval-resize",
        "--head-dropout",
        "--head-hidden",
        "--eval-batch-size",
    } <= KNOWN


def test_a_phantom_flag_is_caught() -> None:
    """The checker itself: an invented flag, and Docker's flag without Docker, are both reported."""
    lines = [("x.md:1", "use --no-such-flag here"), ("x.md:2", "give the container --shm-size=8g")]
    assert phantoms(lines) == ["x.md:1: --no-such-flag", "x.md:2: --shm-size"]
    assert phantoms([("x.md:3", "docker run --shm-size=8g; cv --epochs 3; --slurm-* flags")]) == []
    # a bench script's own flag counts beside a bench, and nowhere else; one no bench defines never
    assert "--cifake" in BENCH_FLAGS and "--tricklers" in BENCH_FLAGS
    assert phantoms([("x.md:4", "python bench/bench_shift.py --cifake")]) == []
    assert phantoms([("x.md:5", "submit --cifake"), ("x.md:6", "bench_shift.py --cifar")]) == [
        "x.md:5: --cifake",
        "x.md:6: --cifar",
    ]
