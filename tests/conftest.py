"""Shared test set-up: offline, quiet, deterministic, single-threaded where it matters; one demo data set
factory for every test module."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import pytest

# Set before any test module imports timm/huggingface_hub/albumentations (they read these at import).
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
os.environ.setdefault("TQDM_DISABLE", "1")


@pytest.fixture(autouse=True)
def _torch_threads_restored():
    """A test that runs a command in-process with ``--threads N`` leaves torch's thread count where it was,
    so a later test in the same worker does not train with another count (and other float sums) than its
    subprocesses."""
    import torch

    before = torch.get_num_threads()
    yield
    if torch.get_num_threads() != before:
        torch.set_num_threads(before)


@pytest.fixture(scope="session")
def demo_data(tmp_path_factory: pytest.TempPathFactory) -> Callable[..., Path]:
    """``make(n=120, n_test=20, seed=3) -> data folder``: a demo data set in the Kaggle layout, generated
    once per session for each set of arguments and shared by every module that asks for the same one.

    The folder is shared: copy it (``shutil.copytree``) before changing anything in it.
    """
    from aivh_ens.synth import make_demo_dataset

    made: dict[tuple[int, int, int], Path] = {}

    def make(n: int = 120, n_test: int = 20, seed: int = 3) -> Path:
        key = (n, n_test, seed)
        if key not in made:
            root = tmp_path_factory.mktemp(f"demo-{n}-{n_test}-{seed}") / "data"
            make_demo_dataset(root, n=n, n_test=n_test, seed=seed)
            made[key] = root
        return made[key]

    return make
