"""Fixtures of the serve tests: one tiny project (two 2-fold runs and their blend) for the whole session."""

from __future__ import annotations

import pytest
from serve_project import Project, make_project


@pytest.fixture(scope="session")
def project(demo_data, tmp_path_factory) -> Project:
    return make_project(demo_data(n=40, n_test=12, seed=7), tmp_path_factory.mktemp("serve") / "work")
