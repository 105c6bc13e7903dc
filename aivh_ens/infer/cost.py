"""How long ``submit`` expects to take, so a caller with a time limit (``aivh-ens auto``) can ask it.

Pure Python (no torch): the cost comes from each run's measured evaluation speed on the device.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

EXTRA_PASSES = 1
"""Test-set passes per fold model beyond one per TTA view: reading and decoding the test images, the shift
diagnosis and its re-scoring, less what submit's threads save (measured on 4,000 cifake-dev test images:
see the benchmarks page's history)."""
START_S = 3.0
"""Reading the blend, the OOF files and the test table."""
MODEL_LOAD_S = 0.3
"""Loading one fold model's weights."""


@dataclass(frozen=True)
class RunCost:
    """What one blended run costs submit: its fold models, TTA views and evaluation images per second."""

    folds: int
    views: int
    eval_img_s: float


def expected_seconds(n_test: int, runs: Sequence[RunCost]) -> float:
    """Seconds ``submit`` is expected to take on ``n_test`` test images with the blend of ``runs``: every fold
    model scores every test image in each of its run's TTA views (and :data:`EXTRA_PASSES` more)."""
    return START_S + sum(
        r.folds * (MODEL_LOAD_S + (r.views + EXTRA_PASSES) * n_test / max(1e-9, r.eval_img_s)) for r in runs
    )
