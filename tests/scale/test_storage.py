"""Blend studies at scale: a JournalStorage file for several processes on one node, and a warning when the
SQLite study sits on a network filesystem."""

from __future__ import annotations

import pytest

from aivh_ens.blend import search
from aivh_ens.system import filesystem_type


def test_a_journal_url_opens_a_journal_storage_study(tmp_path):
    log = tmp_path / "study.log"
    study = search.open_study(f"journal://{log}", "s", seed=0)
    study.optimize(lambda t: t.suggest_float("x", 0, 1), n_trials=2)
    again = search.open_study(f"journal://{log}", "s", seed=0)  # another process would see the same trials
    assert len(again.trials) == 2 and log.stat().st_size > 0


@pytest.mark.parametrize(
    "storage,fs,warned",
    [
        (None, "nfs4", True),
        ("sqlite:////mnt/shared/study.db", "lustre", True),
        (None, "ext4", False),
        ("postgresql://u:p@db/optuna", "nfs4", False),
        ("journal:///mnt/shared/study.log", "nfs4", False),
    ],
)
def test_sqlite_on_a_network_filesystem_is_warned_about(tmp_path, monkeypatch, storage, fs, warned):
    monkeypatch.setattr("aivh_ens.system.filesystem_type", lambda path: fs)
    note = search.sqlite_network_note(storage, tmp_path)
    assert (note is not None) == warned
    if warned:
        assert fs in note and "journal:///" in note and "postgresql://" in note


def test_the_filesystem_of_a_path_is_read_from_the_mount_table(tmp_path):
    assert filesystem_type(tmp_path) not in (None, "")
