"""The Optuna search over blend weights (Dirichlet, one uniform per run), space and threshold.

The only module of the blend stage that imports optuna, and the owner of the study storage."""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import sqlite3
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from aivh_ens import faults
from aivh_ens.blend.core import SPACES, dirichlet_weights
from aivh_ens.blend.methods import Fit, _fit, score_weights
from aivh_ens.blend.oof import OOFSet
from aivh_ens.errors import UserError
from aivh_ens.layout import BLEND_DIR

if TYPE_CHECKING:
    import optuna


def _param_names(runs: Sequence[str]) -> list[str]:
    return [f"u_{run}" for run in runs]


def fit_from_params(
    params: Mapping[str, Any], runs: Sequence[str], S: Mapping[str, np.ndarray], y: np.ndarray, metric: str
) -> Fit:
    """The blend an Optuna trial's parameters describe, with its exact best threshold."""
    u = np.array([params[name] for name in _param_names(runs)])
    return _fit("optuna", S, y, dirichlet_weights(u), params["space"], metric)


def make_objective(
    S: Mapping[str, np.ndarray], y: np.ndarray, metric: str, runs: Sequence[str]
) -> Callable[[optuna.Trial], float]:
    """Optuna objective: Dirichlet weights (one uniform per run), a blend space, the exact best threshold."""
    names = _param_names(runs)
    y = np.ascontiguousarray(y, dtype=bool)

    def objective(trial: optuna.Trial) -> float:
        u = np.array([trial.suggest_float(name, 0.0, 1.0) for name in names])  # (M,)
        space = trial.suggest_categorical("space", SPACES)
        faults.point("trial")
        return score_weights(S, y, dirichlet_weights(u), space, metric)[1]

    return objective


@contextlib.contextmanager
def _quiet_optuna() -> Iterator[None]:
    import optuna

    before = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(optuna.logging.WARNING)  # no INFO line per trial
    try:
        yield
    finally:
        optuna.logging.set_verbosity(before)


def _completed(study: optuna.Study) -> list[optuna.trial.FrozenTrial]:
    import optuna

    return study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))


def open_study(
    storage: str | optuna.storages.BaseStorage | None, name: str | None, seed: int, fresh: bool = False
) -> optuna.Study:
    """Create or load (``load_if_exists``) a maximising study with a seeded TPE sampler.

    ``fresh`` deletes a study of that name first, so the study holds exactly the trials of this call.

    The sampler is seeded with ``seed + number of trials already in the study``, so a resumed study does
    not replay the random draws of the session before it, and the same sequence of sessions repeats.
    """
    import optuna
    import sqlalchemy.exc

    try:
        with _quiet_optuna():
            if fresh and name is not None:
                with contextlib.suppress(KeyError):  # no such study yet
                    optuna.delete_study(study_name=name, storage=journal_storage(storage))
            study = optuna.create_study(
                storage=journal_storage(storage), study_name=name, direction="maximize", load_if_exists=True
            )
    except (sqlalchemy.exc.SQLAlchemyError, ImportError, ValueError) as e:
        raise UserError(
            f"cannot open Optuna storage {storage!r}: {e}; expected a URL such as sqlite:///runs/blend/study.db"
        ) from e
    if study.direction != optuna.study.StudyDirection.MAXIMIZE:
        raise UserError(f"study {name!r} in {storage!r} minimises; delete it or pass another --storage")
    study.sampler = optuna.samplers.TPESampler(seed=seed + len(study.trials))
    return study


def journal_storage(storage: str | optuna.storages.BaseStorage | None) -> Any:
    """``journal:///path/study.log`` -> Optuna's JournalStorage on that file (safe for several processes on one
    node, without a database); any other value is returned as is."""
    if not (isinstance(storage, str) and storage.startswith("journal://")):
        return storage
    import optuna

    try:
        from optuna.storages.journal import JournalFileBackend
    except ImportError:  # optuna < 4
        from optuna.storages import JournalFileStorage as JournalFileBackend
    return optuna.storages.JournalStorage(JournalFileBackend(storage[len("journal://") :]))


def sqlite_network_note(storage: str | None, workdir: str | Path) -> str | None:
    """A warning when the study's SQLite file sits on a network filesystem, where SQLite's locks are unsafe."""
    from aivh_ens.system import NETWORK_FILESYSTEMS, filesystem_type

    if storage is None:
        path = Path(workdir) / BLEND_DIR
    elif storage.startswith("sqlite:///"):
        path = Path(storage[len("sqlite:///") :]).parent
    else:
        return None
    probe = path
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    fs = filesystem_type(probe)
    if fs not in NETWORK_FILESYSTEMS:
        return None
    return (
        f"warning: the Optuna study (SQLite) is on a {fs} filesystem ({path}), where SQLite's locks are "
        "unreliable: with several blend processes use --storage journal:///local/disk/study.log (one node) or "
        "--storage postgresql://user:pass@host/db (several machines)"
    )


def default_storage(workdir: str | Path) -> optuna.storages.RDBStorage:
    """SQLite storage at ``runs/blend/study.db`` in WAL mode.

    Optuna commits several times per trial; with the default rollback journal every commit waits for an
    fsync (~10 ms on many cloud disks). WAL with ``synchronous=NORMAL`` keeps the file consistent after a
    crash and makes the study about 6x faster to write.
    """
    import optuna

    path = (Path(workdir) / BLEND_DIR / "study.db").resolve()
    path.parent.mkdir(parents=True, exist_ok=True)

    def connect() -> sqlite3.Connection:
        conn = sqlite3.connect(path, timeout=60, check_same_thread=False)
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=NORMAL")
        return conn

    return optuna.storages.RDBStorage(f"sqlite:///{path}", engine_kwargs={"creator": connect})


def optimize(
    study: optuna.Study,
    S: Mapping[str, np.ndarray],
    y: np.ndarray,
    metric: str,
    runs: Sequence[str],
    n_trials: int,
    timeout: float | None = None,
    progress: bool = False,
) -> Fit:
    """Run ``n_trials`` more trials of ``study`` (or until ``timeout`` s) and return its best trial's blend."""
    from aivh_ens.progress import Progress

    done = _completed(study)
    best = [max((t.value for t in done), default=-math.inf)]
    with (
        _quiet_optuna(),
        Progress(None, "blend search", total=n_trials, unit="trial", enabled=progress) as bar,
    ):

        def report(_study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
            if trial.value is not None and trial.value > best[0]:
                best[0] = trial.value
            bar.set_postfix(best=f"{metric} {best[0]:.5f}")
            bar.update(1)

        study.optimize(
            make_objective(S, y, metric, runs), n_trials=n_trials, timeout=timeout, callbacks=[report]
        )
    if best[0] == -math.inf:
        raise UserError(f"the search completed no trial within --timeout {timeout} s; allow more time")
    return fit_from_params(study.best_trial.params, runs, S, y, metric)


def fit_optuna(
    S: Mapping[str, np.ndarray], y: np.ndarray, metric: str, runs: Sequence[str], n_trials: int, seed: int
) -> Fit:
    """Optuna search in a throw-away in-memory study (the nested-CV refits)."""
    return optimize(open_study(None, None, seed), S, y, metric, runs, n_trials)


def study_name(oof: OOFSet, metric: str) -> str:
    """``blend:<metric>:<runs>:<digest>``; the digest covers the OOF files and the fold file, so a new set of
    runs, a re-trained run or another metric starts a new study, and the same inputs resume the old one."""
    runs = sorted(oof.runs)
    key = json.dumps(
        {"metric": metric, "fold": oof.fold_sha256, "oof": dict(zip(oof.runs, oof.oof_sha256, strict=True))},
        sort_keys=True,
    )
    return f"blend:{metric}:{'+'.join(runs)}:{hashlib.sha256(key.encode()).hexdigest()[:12]}"
