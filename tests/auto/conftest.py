"""Every ``auto`` test sees an empty Hugging Face cache unless it fills one: the machine's own cache never
becomes a test's candidates."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session", autouse=True)
def _empty_hf_cache(tmp_path_factory):
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HF_HUB_CACHE", str(tmp_path_factory.mktemp("hf-hub-empty")))
        yield
