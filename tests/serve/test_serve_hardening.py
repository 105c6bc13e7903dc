"""`serve` facing a network, over real sockets: trickling bodies are cut at --body-timeout and silent or
trickling headers at the header deadline while other clients are answered; Expect: 100-continue gets its 413 at once; only served formats are parsed (an EPS never reaches
Ghostscript); the pixel cap; a request is admitted whole or not at all; /health is 503 until the service can
score; allowed hosts; the API key from a file."""

from __future__ import annotations

import io
import json
import os
import socket
import stat
import subprocess
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
from PIL import EpsImagePlugin, Image
from serve_project import Project

from aivh_ens.cli.serve import read_api_key
from aivh_ens.errors import UserError
from aivh_ens.serve import Ensemble, ServeSettings, create_app
from aivh_ens.serve.linger import LINGER_S, LingeringH11Protocol
from aivh_ens.serve.server import running_server

HANG_S = 120  # a bound only a hung server or a connection nobody cuts reaches
EPS = (
    b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 64 64\n%%EndComments\n"
    b"newpath 0 0 moveto 64 64 lineto stroke\nshowpage\n%%EOF\n"
)


@pytest.fixture(scope="module")
def ensemble(project: Project) -> Ensemble:
    return Ensemble.load(project.work, device="cpu")


class Gated:
    """The ensemble, with scoring held while ``gate`` is clear and failing when ``broken``."""

    def __init__(self, ensemble: Ensemble, broken: bool = False):
        self._ensemble, self.broken = ensemble, broken
        self.gate = threading.Event()
        self.gate.set()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._ensemble, name)

    def score(self, images: list) -> list:
        self.gate.wait(HANG_S)
        if self.broken:
            raise RuntimeError("the model cannot run here")
        return self._ensemble.score(images)


def multipart(files: list[tuple[str, bytes]]) -> tuple[bytes, str]:
    parts = [
        b'--XyZ\r\nContent-Disposition: form-data; name="files"; filename="%s"\r\n'
        b"Content-Type: application/octet-stream\r\n\r\n%s\r\n" % (name.encode(), data)
        for name, data in files
    ]
    return b"".join(parts) + b"--XyZ--\r\n", "multipart/form-data; boundary=XyZ"


def post(url: str, files: list[tuple[str, bytes]], headers: dict | None = None) -> tuple[int, dict]:
    body, ctype = multipart(files)
    req = urllib.request.Request(
        f"{url}/predict", data=body, headers={"Content-Type": ctype, **(headers or {})}
    )
    try:
        with urllib.request.urlopen(req, timeout=HANG_S) as res:
            return res.status, json.load(res)
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"{}")


def health(url: str) -> tuple[int, dict]:
    try:
        with urllib.request.urlopen(f"{url}/health", timeout=HANG_S) as res:
            return res.status, json.load(res)
    except urllib.error.HTTPError as e:
        return e.code, json.load(e)


def wait_ready(url: str) -> None:
    deadline = time.monotonic() + HANG_S
    while health(url)[0] != 200:
        assert time.monotonic() < deadline, health(url)
        time.sleep(0.02)


def connect(url: str) -> socket.socket:
    host, port = url.removeprefix("http://").split(":")
    return socket.create_connection((host, int(port)), timeout=HANG_S)


def trickle(url: str, stop: threading.Event) -> tuple[bytes, float]:
    """Open a 10 MB upload and send one byte at a time; (what the server answered, seconds until it closed)."""
    s = connect(url)
    t0 = time.monotonic()
    s.sendall(
        b"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Type: multipart/form-data; boundary=XyZ\r\n"
        b"Content-Length: 10000000\r\n\r\n--XyZ\r\n"
    )
    s.setblocking(False)
    got = b""
    while not stop.is_set():
        try:
            chunk = s.recv(65536)
            if not chunk:
                break  # closed by the server
            got += chunk
        except BlockingIOError:
            pass
        try:
            s.send(b"x")
        except OSError:
            break
        time.sleep(0.1)
    s.close()
    return got, time.monotonic() - t0


def test_trickling_bodies_are_cut_at_the_body_timeout_and_other_clients_are_answered(project, ensemble):
    timeout_s = 2.0
    good = [("a.jpg", project.images[0].read_bytes())]
    with running_server(create_app(ensemble, ServeSettings(body_timeout_s=timeout_s))) as url:
        wait_ready(url)
        stop = threading.Event()
        with ThreadPoolExecutor(40) as pool:
            tricklers = [pool.submit(trickle, url, stop) for _ in range(30)]
            normal = [post(url, good) for _ in range(10)]
            try:
                results = [f.result(timeout=HANG_S) for f in tricklers]
            finally:
                stop.set()
    assert all(status == 200 for status, _ in normal), normal
    for got, seconds in results:
        assert got.startswith(b"HTTP/1.1 408") and b"--body-timeout" in got, got[:200]
        assert timeout_s <= seconds < HANG_S  # cut: not held until the client gave up


def held_for(url: str, first: bytes, then: bytes) -> float:
    """Seconds until the server closes a connection that sent ``first``, then ``then`` every 0.1 s (b"":
    nothing), never finishing a request's headers (what it answered meanwhile is read and dropped)."""
    s = connect(url)
    t0 = time.monotonic()
    s.sendall(first)
    s.setblocking(False)
    try:
        while time.monotonic() - t0 < HANG_S:
            try:
                if not s.recv(65536):
                    break  # closed by the server
            except BlockingIOError:
                pass
            except OSError:
                break
            try:
                s.send(then)
            except OSError:
                break
            time.sleep(0.1)
    finally:
        s.close()
    return time.monotonic() - t0


def test_a_connection_without_whole_headers_is_closed_at_the_header_deadline(project, ensemble, monkeypatch):
    """Silent connections, trickled headers, and a kept-alive connection trickling its second request's headers
    are all closed once the header deadline passes, while other clients are answered."""
    monkeypatch.setattr(LingeringH11Protocol, "header_timeout_s", 1.0)
    good = [("a.jpg", project.images[0].read_bytes())]
    kept = b"GET /health HTTP/1.1\r\nHost: x\r\n\r\nGET /health HTTP/1.1\r\n"
    with running_server(create_app(ensemble, ServeSettings())) as url:
        wait_ready(url)
        with ThreadPoolExecutor(16) as pool:
            held = [pool.submit(held_for, url, b"", b"") for _ in range(4)]
            held += [pool.submit(held_for, url, b"GET /health HTTP/1.1\r\n", b"X") for _ in range(4)]
            held += [pool.submit(held_for, url, kept, b"X") for _ in range(4)]
            normal = [post(url, good) for _ in range(5)]
            seconds = [f.result(timeout=HANG_S) for f in held]
    assert all(status == 200 for status, _ in normal), normal
    assert all(1.0 <= x < 1.0 + LINGER_S + 10 for x in seconds), seconds  # cut, not held until HANG_S


def test_a_cut_client_reads_its_408_while_still_sending_and_is_closed_after_the_linger_time(ensemble):
    """Lingering close: after the 408 the server half-closes and keeps reading, so a client still sending gets
    an orderly end (not a reset that can destroy the answer); it closes for good after LINGER_S."""
    with running_server(create_app(ensemble, ServeSettings(body_timeout_s=0.5))) as url:
        s = connect(url)
        s.sendall(
            b"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Type: multipart/form-data; boundary=XyZ\r\n"
            b"Content-Length: 10000000\r\n\r\n--XyZ\r\n"
        )
        answer = b""
        while chunk := s.recv(65536):  # up to the server's FIN
            answer += chunk
        assert answer.startswith(b"HTTP/1.1 408"), answer[:200]
        t0 = time.monotonic()
        for _ in range(10):  # the server still reads: no reset while it lingers
            s.sendall(b"x" * 10_000)
            time.sleep(0.05)
        with pytest.raises(OSError):  # then it closes: a reset reaches a client that goes on sending
            while time.monotonic() - t0 < HANG_S:
                s.sendall(b"x" * 10_000)
                time.sleep(0.05)
        assert time.monotonic() - t0 < LINGER_S + 10
        s.close()


def test_expect_100_continue_over_the_limit_gets_413_before_any_body(ensemble):
    with running_server(create_app(ensemble, ServeSettings(max_mb=1))) as url:
        s = connect(url)
        s.sendall(
            b"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Type: multipart/form-data; boundary=XyZ\r\n"
            b"Content-Length: 100000000\r\nExpect: 100-continue\r\n\r\n"
        )
        got = b""
        while chunk := s.recv(65536):  # the server answers and closes without a byte of body from us
            got += chunk
        s.close()
    assert got.startswith(b"HTTP/1.1 413") and b"100 Continue" not in got, got[:200]


def test_an_eps_upload_is_refused_without_running_ghostscript(ensemble, tmp_path, monkeypatch):
    marker = tmp_path / "gs-ran"
    gs = tmp_path / "bin" / "gs"
    gs.parent.mkdir()
    gs.write_text(f'#!/bin/sh\necho "$@" >> {marker}\n[ "$1" = --version ] && exit 0\nexit 1\n')
    gs.chmod(gs.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setenv("PATH", f"{gs.parent}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setattr(EpsImagePlugin, "gs_binary", None)  # look for gs again, on this PATH
    with pytest.raises((OSError, subprocess.CalledProcessError)), Image.open(io.BytesIO(EPS)) as im:
        im.load()  # plain Pillow hands these bytes to Ghostscript...
    assert marker.exists()
    marker.unlink()
    with running_server(create_app(ensemble)) as url:
        status, doc = post(url, [("drawing.eps", EPS)])
    assert status == 415 and "not an image in a served format (JPEG, PNG, WEBP" in doc["error"], doc
    assert not marker.exists()  # ...the server never did


def test_the_pixel_cap_is_the_servers_own(project, ensemble):
    data = project.images[0].read_bytes()
    w, h = Image.open(io.BytesIO(data)).size
    with running_server(create_app(ensemble, ServeSettings(max_pixels=w * h - 1))) as url:
        status, doc = post(url, [("a.jpg", data)])
    assert status == 422 and f"over this server's limit of {w * h - 1:,} (--max-pixels)" in doc["error"], doc


def test_a_request_is_admitted_whole_or_not_at_all(project, ensemble):
    gated = Gated(ensemble)
    img = project.images[0].read_bytes()
    app = create_app(gated, ServeSettings(max_queue=4, max_batch=1, window_ms=0))
    with running_server(app) as url, ThreadPoolExecutor(2) as pool:
        wait_ready(url)
        gated.gate.clear()
        first = pool.submit(post, url, [("1.jpg", img)])  # taken into a batch, held at the gate
        batcher = app.state.serve.batcher
        deadline = time.monotonic() + HANG_S
        while batcher.busy_s == 0:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        second = pool.submit(post, url, [(f"{i}.jpg", img) for i in range(3)])  # waits in the queue
        while batcher._queue.qsize() < 3:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        status, doc = post(url, [("x.jpg", img), ("y.jpg", img)])  # 3 + 2 > --max-queue 4
        assert status == 503 and "--max-queue 4" in doc["error"], doc
        assert batcher._queue.qsize() == 3  # none of the refused request's images was queued
        gated.gate.set()
        assert first.result(timeout=HANG_S)[0] == 200 and second.result(timeout=HANG_S)[0] == 200
    assert batcher.items == 1 + 1 + 3  # the warm-up, then the two admitted requests: nothing else was scored


def test_health_is_503_after_a_failed_warm_up_and_when_the_scoring_loop_dies(project, ensemble):
    with running_server(create_app(Gated(ensemble, broken=True))) as url:
        deadline = time.monotonic() + HANG_S
        while "failed" not in health(url)[1]["status"]:
            assert time.monotonic() < deadline, health(url)
            time.sleep(0.02)
        status, doc = health(url)
        assert (
            status == 503 and "warm-up pass failed (RuntimeError: the model cannot run here)" in doc["status"]
        )
    app = create_app(ensemble)
    with running_server(app) as url:
        wait_ready(url)
        app.state.serve.batcher._task.cancel()  # the scoring loop dies
        deadline = time.monotonic() + HANG_S
        while health(url)[0] != 503:
            assert time.monotonic() < deadline
            time.sleep(0.02)
        assert health(url)[1]["status"] == "the scoring loop is not running"
        status, doc = post(url, [("a.jpg", project.images[0].read_bytes())])
        assert status == 503 and "the scoring loop is not running" in doc["error"], doc


def test_only_allowed_hosts_are_served(project, ensemble):
    good = [("a.jpg", project.images[0].read_bytes())]
    with running_server(create_app(ensemble, ServeSettings(allowed_hosts=("localhost", "127.0.0.1")))) as url:
        wait_ready(url)
        assert post(url, good)[0] == 200
        req = urllib.request.Request(f"{url}/health", headers={"Host": "rebound.attacker.example"})
        with pytest.raises(urllib.error.HTTPError) as e:
            urllib.request.urlopen(req, timeout=HANG_S)
        assert e.value.code == 400


def test_the_api_key_comes_from_a_file(tmp_path):
    key = tmp_path / "key"
    key.write_text("s3cret\n")
    assert read_api_key(None, key) == "s3cret" and read_api_key("k", None) == "k"
    with pytest.raises(UserError, match="not both"):
        read_api_key("k", key)
    (tmp_path / "empty").write_text("\n")
    with pytest.raises(UserError, match="first line is empty"):
        read_api_key(None, tmp_path / "empty")
    assert Path(key).read_text() == "s3cret\n"
