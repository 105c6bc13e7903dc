"""`sweep --backend ray` on one local Ray with two logical GPUs: each job sees its own GPU, a crashed worker is
retried and resumes, an exception is not retried, a hung task is cancelled after --job-timeout, and the other
jobs finish."""

from __future__ import annotations

import json
import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import ray  # the ray extra: make install (and CI) installs it, so a missing one fails loudly
from click.testing import CliRunner
from sweep_plans import stop_hung_sweep, write_plan

from aivh_ens.cli import main
from aivh_ens.liveness import pid_alive
from aivh_ens.locks import read_owner, stale_reason

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module", autouse=True)
def cluster() -> Iterator[None]:
    """One Ray for the module: 2 CPUs and 2 logical GPUs (Ray hands out GPU ids without any hardware)."""
    old = os.environ.get("PYTHONPATH")
    os.environ["PYTHONPATH"] = str(ROOT)  # the workers import this checkout
    ray.init(num_cpus=2, num_gpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()
    if old is None:
        os.environ.pop("PYTHONPATH")
    else:
        os.environ["PYTHONPATH"] = old


@pytest.fixture(autouse=True)
def logical_gpus(monkeypatch) -> None:
    """The cluster's GPUs are logical (no hardware): its tasks may train on the CPU."""
    monkeypatch.setenv("AIVH_ENS_GPU_FALLBACK", "cpu")


@pytest.fixture(scope="module")
def data(demo_data) -> Path:
    return demo_data(n=40, n_test=10, seed=13)


def sweep(tmp_path: Path, data: Path, *extra: str):
    plan = write_plan(tmp_path / "plan.toml", data, [{"name": "r", "model": "test_efficientnet"}])
    return sweep_plan(plan, tmp_path / "w", *extra)


def sweep_plan(plan: Path, work: Path, *extra: str):
    return CliRunner().invoke(main, ["sweep", str(plan), "--backend", "ray", "--workdir", str(work), *extra])


def fold_files(tmp_path: Path, k: int) -> tuple[dict, dict | None]:
    fdir = tmp_path / "w" / "runs" / "r" / f"fold{k}"
    done = fdir / "done.json"
    return json.loads((fdir / "started.json").read_text()), json.loads(
        done.read_text()
    ) if done.exists() else None


def test_each_job_gets_its_own_gpu_and_a_crashed_worker_is_retried(tmp_path, data, monkeypatch):
    monkeypatch.setenv(
        "AIVH_ENS_KILL_AT", "job:r:1"
    )  # SIGKILL the first attempt of fold 1, once it holds its lock
    monkeypatch.setenv("AIVH_ENS_FAULT_ONCE", str(tmp_path / "crashed"))
    res = sweep(tmp_path, data)
    assert res.exit_code == 0, res.output
    assert (tmp_path / "crashed").exists()
    gpus = set()
    for k in range(3):
        started, done = fold_files(tmp_path, k)
        assert done is not None and done["attempt"] == (2 if k == 1 else 1)
        assert started["job_id"] and done["device"] == "cpu"
        gpus.add(done["cuda_visible_devices"])
    # each job saw one logical GPU of the two; which one is Ray's choice (a retry or a later job may reuse the
    # worker of GPU 0: in one run all three finished there, the killed attempt having run on GPU 1)
    assert gpus <= {"0", "1"}  # one id each, never both ("0,1") nor none
    assert (tmp_path / "w" / "oof" / "r.csv").exists()


def test_an_exception_is_not_retried_and_the_other_jobs_finish(tmp_path, data, monkeypatch):
    """...and with --max-jobs-per-worker 1 (Ray's max_calls) each worker process exits after its one job (an
    idle worker is otherwise kept for the next)."""
    monkeypatch.setenv("AIVH_ENS_KILL_AT", "job:r:0")
    monkeypatch.setenv("AIVH_ENS_FAULT", "raise")
    res = sweep(tmp_path, data, "--max-jobs-per-worker", "1")
    assert res.exit_code == 1, res.output
    started, done = fold_files(tmp_path, 0)
    assert done is None and started["attempt"] == 1  # not retried: a bug or an OOM would only fail again
    finished = [fold_files(tmp_path, k)[1] for k in (1, 2)]
    assert all(d is not None for d in finished)
    gone = time.monotonic() + 60
    while any(pid_alive(d["pid"]) for d in finished) and time.monotonic() < gone:
        time.sleep(0.1)
    assert not any(pid_alive(d["pid"]) for d in finished), finished
    row = [ln for ln in res.output.splitlines() if ln.startswith("r ") and ln.split()[1] == "0"][-1]
    assert "failed" in row and "RuntimeError: injected fault at job:r:0" in row
    status = CliRunner().invoke(main, ["status", "--workdir", str(tmp_path / "w")]).output
    assert "RuntimeError: injected fault at job:r:0" in status
    assert not (tmp_path / "w" / "oof" / "r.csv").exists()


def test_a_hung_task_is_cancelled_after_the_job_timeout_and_its_lock_freed(
    tmp_path, data, monkeypatch, task_hang_timeout
):
    """Fold 0 hangs once it holds its lock (its progress stands still while its heartbeat goes on): the sweep
    cancels it after --job-timeout, the other folds finish, and its lock is free for the next run."""
    monkeypatch.setenv("AIVH_ENS_KILL_AT", "job:r:0")
    monkeypatch.setenv("AIVH_ENS_FAULT", "hang")
    res = sweep(tmp_path, data, "--job-timeout", str(task_hang_timeout))
    assert res.exit_code == 1, res.output
    row = [ln for ln in res.output.splitlines() if ln.startswith("r ") and ln.split()[1] == "0"][-1]
    assert (
        "failed" in row
        and f"made no progress in {task_hang_timeout}s (--job-timeout) and was cancelled" in row
    )
    assert all(fold_files(tmp_path, k)[1] is not None for k in (1, 2)), res.output
    fold0 = tmp_path / "w" / "runs" / "r" / "fold0"
    assert "made no progress" in json.loads((fold0 / "failed.json").read_text())["error"]
    # the cancelled task's worker is killed (Ray does it asynchronously): its lock is then free for a rerun
    lock, deadline = tmp_path / "w" / "runs" / "r" / "fold0.lock", time.monotonic() + 60
    while (
        (owner := read_owner(lock)) is not None
        and stale_reason(owner) is None
        and time.monotonic() < deadline
    ):
        time.sleep(0.1)
    assert owner is None or stale_reason(owner) is not None, owner


def test_every_node_must_see_the_work_dir(tmp_path, monkeypatch):
    from aivh_ens.errors import UserError
    from aivh_ens.scale.ray import check_shared_workdir

    check_shared_workdir(tmp_path)  # one node, same disk: fine
    assert not list((tmp_path / "runs").glob(".ray-probe-*"))
    # A node that reads another file at that path (its own local disk) is what a missing shared mount looks like.
    monkeypatch.setattr("aivh_ens.io.write_text", lambda path, text: Path(path).write_text("elsewhere"))
    with pytest.raises(UserError, match="not visible on Ray node"):
        check_shared_workdir(tmp_path)


def test_a_node_whose_read_of_the_work_dir_hangs_is_named_not_waited_for(tmp_path, monkeypatch):
    from aivh_ens.errors import UserError
    from aivh_ens.scale.ray import check_shared_workdir

    (tmp_path / "runs").mkdir()
    # A FIFO at the probe's path: the node's read blocks, as on a stalled network mount.
    monkeypatch.setattr("aivh_ens.io.write_text", lambda path, text: os.mkfifo(path))
    monkeypatch.setattr("aivh_ens.scale.ray.PROBE_TIMEOUT_S", 3.0)
    with pytest.raises(UserError, match=r"did not read a file in the work dir .* within 3 s"):
        check_shared_workdir(tmp_path)
    assert not list((tmp_path / "runs").glob(".ray-probe-*"))


def test_an_interrupted_ray_sweep_cancels_its_tasks_and_releases_their_locks(tmp_path, data):
    """SIGINT to a sweep driver whose two tasks train for ever: it exits 130 with both folds pending, their
    workers are killed and their locks released."""
    plan = write_plan(tmp_path / "plan.toml", data, [{"name": "r", "model": "test_efficientnet"}], folds=2)
    address = ray.get_runtime_context().gcs_address
    _, err = stop_hung_sweep(
        plan, tmp_path / "w", "r", 2, signal.SIGINT, "--backend", "ray", "--ray-address", address
    )
    assert "Traceback" not in err, err
