"""The package installs from a folder of wheels without an index or network, as on an offline Kaggle kernel
(`pip install --no-index --find-links`), keeping the torch already there, and its ``aivh-ens`` command runs."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

from aivh_ens import __version__

ROOT = Path(__file__).resolve().parents[2]
PACKAGE_FILES = ("pyproject.toml", "README.md", "LICENSE", "aivh_ens")


def _env() -> dict[str, str]:
    """A clean environment: no PYTHONPATH (the checkout must not be importable), no pip configuration (no
    index or find-links of this machine), no network."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "PIP_", "VIRTUAL_ENV"))}
    return {**env, "PIP_CONFIG_FILE": os.devnull, "PIP_NO_INPUT": "1", "PIP_DISABLE_PIP_VERSION_CHECK": "1"}


def _run(*cmd: str | Path, cwd: Path) -> str:
    out = subprocess.run(
        [str(c) for c in cmd], cwd=cwd, env=_env(), capture_output=True, text=True, timeout=300
    )
    assert out.returncode == 0, f"{cmd}: {out.stdout[-2000:]}\n{out.stderr[-2000:]}"
    return out.stdout


def _build_wheel(tmp_path: Path) -> Path:
    """The aivh-ens wheel, built offline from a copy of the package's files (the checkout stays clean)."""
    src = tmp_path / "src"
    src.mkdir()
    for name in PACKAGE_FILES:
        item = ROOT / name
        if item.is_dir():
            shutil.copytree(item, src / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        else:
            shutil.copy2(item, src / name)
    wheels = tmp_path / "wheels"
    _run(sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-w", wheels, src,
         cwd=tmp_path)  # fmt: skip
    return wheels


def _dependencies_view(tmp_path: Path) -> Path:
    """This interpreter's installed packages without aivh-ens itself: the 'torch already there' of a Kaggle
    image, as a folder of links the fresh venv puts on its path."""
    view = tmp_path / "preinstalled"
    view.mkdir()
    for entry in Path(sysconfig.get_paths()["purelib"]).iterdir():
        if not entry.name.lower().startswith(("aivh_ens", "aivh-ens", "__editable__")):
            (view / entry.name).symlink_to(entry)
    return view


def test_wheel_installs_offline_into_a_fresh_venv_and_runs(tmp_path: Path) -> None:
    wheels = _build_wheel(tmp_path)
    assert [p.name for p in wheels.iterdir()] == [f"aivh_ens-{__version__}-py3-none-any.whl"]
    venv = tmp_path / "venv"
    # No pip or setuptools of its own: those of the view (this interpreter's) serve, as the image's would.
    _run(sys.executable, "-m", "venv", "--without-pip", venv, cwd=tmp_path)
    py = venv / "bin" / "python"
    site = _run(py, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])", cwd=tmp_path).strip()
    (Path(site) / "preinstalled.pth").write_text(f"{_dependencies_view(tmp_path)}\n")

    log = _run(py, "-m", "pip", "install", "--no-index", "--find-links", wheels, "aivh-ens", cwd=tmp_path)
    assert f"Successfully installed aivh-ens-{__version__}" in log
    assert "torch" not in log.split("Successfully installed")[1]  # the torch already there is kept

    where = _run(py, "-c", "import aivh_ens, os; print(os.path.realpath(aivh_ens.__file__))", cwd=tmp_path)
    assert where.startswith(os.path.realpath(site)), where
    page = "import importlib.resources as r; print(r.files('aivh_ens.serve').joinpath('page.html').is_file())"
    assert _run(py, "-c", page, cwd=tmp_path).strip() == "True"  # package data travels in the wheel
    usage = _run(venv / "bin" / "aivh-ens", "--help", cwd=tmp_path)
    assert "Usage: aivh-ens" in usage and "HF_HUB_OFFLINE=0" in usage
    for command in ("auto", "cv", "blend", "submit", "checks", "recipes"):
        assert command in usage
