"""`serve` under load and abuse, over real HTTP with a plain client (urllib): an oversized upload still gets
its 413, a failing image fails only its own request, and past --max-queue the server answers 503."""

from __future__ import annotations

import json
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import pytest
from fastapi.testclient import TestClient
from serve_project import Project, wait_warm

from aivh_ens.serve import Ensemble, ServeSettings, create_app
from aivh_ens.serve.server import running_server


@pytest.fixture(scope="module")
def ensemble(project: Project) -> Ensemble:
    return Ensemble.load(project.work, device="cpu")


class Flaky:
    """The ensemble, except that scoring an image uploaded under a name with "poison" in it raises, and that
    scoring waits while ``gate`` is clear."""

    def __init__(self, ensemble: Ensemble):
        self._ensemble = ensemble
        # the images themselves: an id() alone is reused once its image is freed
        self.poisoned: list[Any] = []
        self.gate = threading.Event()
        self.gate.set()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._ensemble, name)

    def decode(self, data: bytes, name: str) -> Any:
        decoded = self._ensemble.decode(data, name)
        if "poison" in name:
            self.poisoned.append(decoded)
        return decoded

    def score(self, images: list) -> list:
        self.gate.wait(60)
        if any(i is p for i in images for p in self.poisoned):
            raise RuntimeError("this image breaks the model")
        return self._ensemble.score(images)


def post(url: str, name: str, data: bytes) -> tuple[int, dict, dict]:
    """(status, JSON body, headers) of a one-image POST /predict sent with urllib."""
    body = (
        b'--XyZ\r\nContent-Disposition: form-data; name="files"; filename="'
        + name.encode()
        + b'"\r\nContent-Type: image/jpeg\r\n\r\n'
        + data
        + b"\r\n--XyZ--\r\n"
    )
    headers = {"Content-Type": "multipart/form-data; boundary=XyZ"}
    req = urllib.request.Request(f"{url}/predict", data=body, headers=headers, method="POST")
    try:
        with urllib.request.urlopen(req, timeout=120) as res:
            return res.status, json.load(res), dict(res.headers)
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read()), dict(e.headers)


def test_a_30_mb_upload_from_a_plain_client_receives_the_413(ensemble):
    with running_server(create_app(ensemble, ServeSettings(max_mb=20))) as url:
        status, doc, _ = post(url, "big.jpg", bytes(30 * 2**20))
        assert status == 413 and "over the limit of 20 MiB (--max-mb)" in doc["error"]
        status, _, _ = post(url, "big.jpg", bytes(30 * 2**20))  # and again: the server is fine
        assert status == 413


def test_only_the_requests_with_a_bad_image_fail(project, ensemble):
    """16 clients, 200 requests; every 20th carries an undecodable or a model-breaking image."""
    flaky = Flaky(ensemble)
    good = [p.read_bytes() for p in project.images[:4]]
    want = [ensemble.score([ensemble.decode(b, "x.jpg")])[0].prob for b in good]

    def request(i: int) -> tuple[int, int, dict]:
        if i % 20 == 19:
            bad = (b"not pixels at all", "notes.jpg") if (i // 20) % 2 else (good[0], "poison.jpg")
            return (i, *post(url, bad[1], bad[0])[:2])
        return (i, *post(url, f"img{i}.jpg", good[i % 4])[:2])

    with running_server(create_app(flaky, ServeSettings(max_batch=8, window_ms=20))) as url:
        with ThreadPoolExecutor(16) as pool:
            out = list(pool.map(request, range(200)))
        with urllib.request.urlopen(f"{url}/health", timeout=60) as res:
            assert json.load(res)["warm"]
    for i, status, doc in out:
        if i % 20 == 19:
            assert status == (422 if (i // 20) % 2 == 0 else 415), (i, status, doc)  # model-breaking | text
            assert ("could not be scored" if (i // 20) % 2 == 0 else "notes.jpg") in doc["error"]
        else:
            assert status == 200, (i, status, doc)
            np.testing.assert_allclose(doc["results"][0]["prob"], want[i % 4], rtol=0, atol=1e-5)


def test_past_max_queue_the_server_answers_503_with_retry_after(project, ensemble):
    flaky = Flaky(ensemble)
    files = [("files", ("a.jpg", project.images[0].read_bytes(), "image/jpeg"))]
    with TestClient(create_app(flaky, ServeSettings(max_batch=1, max_queue=2))) as c:
        wait_warm(c)
        batcher = c.app.state.serve.batcher
        flaky.gate.clear()  # scoring stalls: the first image is taken, the next two wait in the queue
        with ThreadPoolExecutor(3) as pool:
            first = pool.submit(c.post, "/predict", files=files)
            _until(lambda: batcher._current and not batcher._current[0].future.done() and batcher.items >= 1)
            queued = [pool.submit(c.post, "/predict", files=files) for _ in range(2)]
            _until(lambda: batcher._queue.qsize() == 2)
            over = c.post("/predict", files=files)
            flaky.gate.set()
            done = [f.result(timeout=60) for f in (first, *queued)]
    assert over.status_code == 503 and over.headers["retry-after"] == "1"
    assert "--max-queue 2" in over.json()["error"] and "retry shortly" in over.json()["error"]
    assert [r.status_code for r in done] == [200, 200, 200]


def _until(ok, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not ok():
        assert time.monotonic() < deadline, "the server never got there"
        time.sleep(0.01)
