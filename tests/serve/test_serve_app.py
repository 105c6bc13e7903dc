"""`aivh-ens serve` through FastAPI's TestClient: predict's scores, hostile input, batching, the token."""

from __future__ import annotations

import asyncio
import io
import json
import logging
import struct
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from cli_checks import assert_user_error
from click.testing import CliRunner
from fastapi.testclient import TestClient
from PIL import Image
from serve_project import Project, wait_warm

from aivh_ens.cli import main
from aivh_ens.infer import predict_images
from aivh_ens.serve import Ensemble, ServeSettings, create_app
from aivh_ens.serve.server import bind


@pytest.fixture(scope="module")
def ensemble(project: Project) -> Ensemble:
    return Ensemble.load(project.work, device="cpu")


def _client(ensemble: Ensemble, **settings) -> TestClient:
    return TestClient(create_app(ensemble, ServeSettings(**settings)))


def _files(paths: list[Path]) -> list[tuple[str, tuple[str, bytes, str]]]:
    return [("files", (p.name, p.read_bytes(), "image/jpeg")) for p in paths]


# ---- same scores as `predict` ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("space", "tta"),
    [("prob", None), ("logit", None), ("rank", None), ("single run", None), ("logit", "none")],
)
def test_served_scores_equal_predict(project: Project, tmp_path, space, tta):
    """Per space: the blend (prob, logit and rank blends average folds and rank differently) or one run;
    with each run's own TTA (hflip for ``tiny``) or ``--tta none``."""
    blend = tmp_path / "blend.json"
    doc = json.loads(project.blend_json.read_text())
    doc["space"] = space if space != "single run" else doc["space"]
    blend.write_text(json.dumps(doc))
    kw = {"run": "a"} if space == "single run" else {"blend_path": blend}
    kw["tta"] = tta
    ens = Ensemble.load(project.work, device="cpu", **kw)
    want, source = predict_images(project.images, project.work, device="cpu", **kw)
    with _client(ens) as c:
        wait_warm(c)
        together = c.post("/predict", files=_files(project.images))  # one request, one batch
        alone = [c.post("/predict", files=_files([p])) for p in project.images[:3]]  # batches of one
    assert together.status_code == 200, together.text
    got = together.json()
    assert got["threshold"] == source["threshold"] and got["space"] == source["space"]
    probs = [r["prob"] for r in got["results"]]
    np.testing.assert_allclose(probs, [p.prob for p in want], rtol=0, atol=1e-6)
    assert [r["label"] for r in got["results"]] == [p.label for p in want]
    assert [r["image"] for r in got["results"]] == [p.name for p in project.images]
    assert all(set(r["runs"]) == ({"a"} if kw.get("run") else {"a", "b"}) for r in got["results"])
    for res, p in zip(alone, want, strict=False):
        assert res.status_code == 200
        assert abs(res.json()["results"][0]["prob"] - p.prob) < 1e-6


# ---- hostile input ------------------------------------------------------------------------------------------


def _png_claiming(width: int, height: int) -> bytes:
    """A tiny PNG whose header claims width x height pixels (a decompression bomb's signature)."""
    buf = io.BytesIO()
    Image.new("RGB", (8, 8)).save(buf, "PNG")
    data = bytearray(buf.getvalue())
    ihdr = struct.pack(">II", width, height) + bytes(data[24:29])
    data[16:29] = ihdr
    data[29:33] = struct.pack(">I", zlib.crc32(b"IHDR" + ihdr))
    return bytes(data)


def _jpeg(project: Project) -> bytes:
    return project.images[0].read_bytes()


# (name, request kwargs given the project, status, a phrase of the error)
HOSTILE = [
    (
        "not an image",
        lambda p: {"files": [("files", ("notes.jpg", b"hello, not pixels", "image/jpeg"))]},
        415,
        "not an image",
    ),
    (
        "truncated",
        lambda p: {"files": [("files", ("cut.jpg", _jpeg(p)[: len(_jpeg(p)) // 2], "image/jpeg"))]},
        422,
        "truncated",
    ),
    ("empty file", lambda p: {"files": [("files", ("zero.jpg", b"", "image/jpeg"))]}, 422, "empty"),
    (
        "bomb",
        lambda p: {"files": [("files", ("bomb.png", _png_claiming(8000, 8000), "image/png"))]},
        422,
        "64,000,000 pixels is over this server's limit of 16,000,000 (--max-pixels)",
    ),
    (
        "bomb over Pillow's limit",
        lambda p: {"files": [("files", ("b.png", _png_claiming(20000, 20000), "image/png"))]},
        422,
        "over this server's limit of 16,000,000 pixels",
    ),
    (
        "too small",
        lambda p: {"files": [("files", ("dot.png", _png_claiming(4, 4), "image/png"))]},
        422,
        "too small",
    ),
    (
        "wrong field",
        lambda p: {"files": [("image", ("a.jpg", _jpeg(p), "image/jpeg"))]},
        400,
        "fields received: 'image'",
    ),
    (
        "text field",
        lambda p: {"data": {"files": "hello"}, "files": [("other", ("a.jpg", b"x", "image/jpeg"))]},
        400,
        "holds text",
    ),
    ("empty request", lambda p: {}, 400, "empty request"),
    (
        "empty multipart",
        lambda p: {
            "content": b"--xyz--\r\n",
            "headers": {"content-type": "multipart/form-data; boundary=xyz"},
        },
        400,
        "no images",
    ),
    (
        "no boundary",
        lambda p: {"content": b"abc", "headers": {"content-type": "multipart/form-data"}},
        400,
        "malformed",
    ),
    ("json body", lambda p: {"json": {"image": "a.jpg"}}, 415, "multipart/form-data"),
    (
        "too many files",
        lambda p: {"files": [("files", (f"{i}.jpg", _jpeg(p), "image/jpeg")) for i in range(4)]},
        400,
        "at most 3 images",
    ),
    (
        "over max-mb",
        lambda p: {"files": [("files", ("big.jpg", _jpeg(p) + bytes(80_000), "image/jpeg"))]},
        413,
        "over the limit of",
    ),
]


def test_hostile_input_gets_a_4xx_and_the_server_keeps_answering(project, ensemble, caplog):
    good = _files(project.images[:1])
    with _client(ensemble, max_files=3, max_mb=0.05) as c, caplog.at_level(logging.WARNING, "aivh_ens.serve"):
        wait_warm(c)
        for name, make, status, phrase in HOSTILE:
            caplog.clear()
            res = c.post("/predict", **make(project))
            assert res.status_code == status, (name, res.text)
            err = res.json()["error"]
            assert phrase in err and "\n" not in err, (name, err)
            logged = [r.getMessage() for r in caplog.records if r.name == "aivh_ens.serve"]
            assert len(logged) == 1 and "testclient" in logged[0] and str(status) in logged[0], (name, logged)
            after = c.post("/predict", files=good)
            assert after.status_code == 200, (name, after.text)
        for method, path, status in [
            ("GET", "/predict", 405),
            ("GET", "/../../etc/passwd", 404),
            ("GET", "/static/../runs/blend/blend.json", 404),
        ]:
            res = c.request(method, path)
            assert res.status_code == status and "routes are" in res.json()["error"]


def _asgi_post(app, chunks: list[bytes], content_type: str) -> tuple[list[dict], int]:
    """POST ``chunks`` as a chunked body straight to the ASGI app (then a disconnect); returns (messages
    sent back, chunks the app pulled). TestClient would read a streamed body whole before the app sees it."""
    pulled, sent = 0, []

    async def receive() -> dict:
        nonlocal pulled
        if pulled == len(chunks):
            return {"type": "http.disconnect"}
        pulled += 1
        return {"type": "http.request", "body": chunks[pulled - 1], "more_body": True}

    async def send(message: dict) -> None:
        sent.append(message)

    headers = [(b"content-type", content_type.encode()), (b"transfer-encoding", b"chunked")]
    scope = {
        "type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST", "scheme": "http",
        "path": "/predict", "raw_path": b"/predict", "root_path": "", "query_string": b"", "headers": headers,
        "client": ("127.0.0.1", 50000), "server": ("127.0.0.1", 8000),
    }  # fmt: skip
    asyncio.run(asyncio.wait_for(app(scope, receive, send), timeout=30))
    return sent, pulled


_HEAD = b'--B\r\nContent-Disposition: form-data; name="files"; filename="x.jpg"\r\n\r\n'


def test_a_chunked_body_over_the_limit_is_refused_and_drained_within_a_bound(ensemble):
    """No Content-Length: refused once the bytes read pass --max-mb (1 MiB here); the rest is read and dropped
    (so the client gets the 413) up to 64 MiB, never all of a 69 MiB body."""
    app = create_app(ensemble, ServeSettings(max_mb=1))
    chunks = [_HEAD, *[bytes(65536)] * 1100, b"\r\n--B--\r\n"]
    sent, pulled = _asgi_post(app, chunks, "multipart/form-data; boundary=B")
    assert sent[0]["status"] == 413
    assert b"over the limit of 1 MiB" in sent[1]["body"]
    assert 1024 <= pulled <= 1026, pulled  # 64 MiB is 1024 chunks of 64 KiB


def test_a_client_that_leaves_mid_body_gets_a_4xx_not_a_500(project, ensemble, caplog):
    app = create_app(ensemble, ServeSettings())
    with caplog.at_level(logging.WARNING, "aivh_ens.serve"):
        sent, _ = _asgi_post(app, [_HEAD, _jpeg(project)[:500]], "multipart/form-data; boundary=B")
    assert sent[0]["status"] == 400 and b"closed the connection" in sent[1]["body"]
    assert [r.levelname for r in caplog.records if r.name == "aivh_ens.serve"] == [
        "WARNING"
    ]  # one line, no traceback


def test_file_names_are_only_displayed(project, ensemble, tmp_path):
    """A client's file name is cut to its last part for display; nothing is opened or written under it."""
    target = tmp_path / "victim.jpg"
    with _client(ensemble) as c:
        names = [f"../../{tmp_path}/victim.jpg", f"C:\\evil\\{tmp_path.name}\\vic\x07tim.jpg"]
        parts = [
            b'--B\r\nContent-Disposition: form-data; name="files"; filename="'
            + n.encode()
            + b'"\r\n\r\n'
            + _jpeg(project)
            + b"\r\n"
            for n in names
        ]  # written out: httpx would escape the names
        body = b"".join(parts) + b"--B--\r\n"
        res = c.post("/predict", content=body, headers={"content-type": "multipart/form-data; boundary=B"})
    assert res.status_code == 200
    assert [r["image"] for r in res.json()["results"]] == ["victim.jpg", "victim.jpg"]
    assert not target.exists()


# ---- batching ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("max_batch", [32, 1])
def test_concurrent_requests_share_forward_passes(project, ensemble, max_batch):
    forwards: list[int] = []
    hooks = [m.register_forward_hook(lambda *_: forwards.append(1)) for r in ensemble.runs for m in r.models]
    images = project.images[:8]
    want = {p.image: p.prob for p in predict_images(images, project.work, device="cpu")[0]}
    try:
        with _client(ensemble, max_batch=max_batch, window_ms=400) as c:
            wait_warm(c)
            before, batches0 = len(forwards), c.app.state.serve.batcher.batches
            with ThreadPoolExecutor(8) as pool:  # 8 clients at once, one image each
                res = list(pool.map(lambda p: c.post("/predict", files=_files([p])), images))
            batches = c.app.state.serve.batcher.batches - batches0
    finally:
        for h in hooks:
            h.remove()
    assert all(r.status_code == 200 for r in res)
    got = [r.json()["results"][0]["prob"] for r in res]
    np.testing.assert_allclose(got, [want[str(p)] for p in images], rtol=0, atol=1e-6)
    assert len(forwards) - before == batches * ensemble.model_count  # one pass per fold model per batch
    if max_batch == 1:
        assert batches == 8
    else:
        assert batches <= 2, batches  # 8 requests inside one 400 ms window (2: a thread started late)


# ---- token, health, page, docs ------------------------------------------------------------------------------


def test_api_key_is_enforced(project, ensemble):
    files = _files(project.images[:1])
    with _client(ensemble, api_key="s3cret") as c:
        for headers in (
            {},
            {"Authorization": "Bearer wrong"},
            {"Authorization": "Basic czNjcmV0"},
            {"Authorization": "Bearer s3cret-and-more"},
        ):
            for method, path in [("POST", "/predict"), ("GET", "/health")]:
                res = c.request(method, path, headers=headers, files=files if method == "POST" else None)
                assert res.status_code == 401 and "Bearer" in res.json()["error"], (headers, path)
                assert res.headers["www-authenticate"] == "Bearer"
        ok = {"Authorization": "Bearer s3cret"}
        assert c.post("/predict", files=files, headers=ok).status_code == 200
        assert c.get("/health", headers=ok).status_code == 200
        assert c.get("/").status_code == 200  # the page itself asks for the key
    assert "s3cret" not in repr(ServeSettings(api_key="s3cret"))  # settings may be logged


def test_health_page_and_docs(project, ensemble):
    c = _client(ensemble)
    with c:  # started, stopped, then started again: the app's thread pools come back with its lifespan
        wait_warm(c)
    with c:
        h = wait_warm(c)
        assert c.post("/predict", files=_files(project.images[:1])).status_code == 200
        page = c.get("/")
        schema = c.get("/openapi.json").json()
        docs = c.get("/docs")
    assert h["status"] == "ready" and h["device"] == "cpu" and h["models"] == 4
    assert [r["name"] for r in h["runs"]] == ["a", "b"] and all(r["folds"] == 2 for r in h["runs"])
    assert h["batching"]["batches"] >= 1  # the warm-up pass
    assert page.status_code == 200 and 'type="file"' in page.text
    assert "http://" not in page.text and "https://" not in page.text  # nothing fetched from elsewhere
    body = schema["paths"]["/predict"]["post"]["requestBody"]["content"]["multipart/form-data"]
    assert body["schema"]["properties"]["files"]["type"] == "array"
    assert docs.status_code == 200


# ---- CLI --------------------------------------------------------------------------------------------------


def test_cli_refuses_bad_setups_in_one_line(project, tmp_path):
    runner = CliRunner()
    res = runner.invoke(main, ["serve", "--workdir", str(tmp_path)])
    assert_user_error(res, "blend")
    res = runner.invoke(
        main, ["serve", "--workdir", str(project.work), "--blend", str(project.blend_json), "--run", "a"]
    )
    assert_user_error(res, "--run")
    taken = bind("127.0.0.1", 0)
    try:
        port = taken.getsockname()[1]
        taken.listen()
        res = runner.invoke(main, ["serve", "--workdir", str(project.work), "--port", str(port)])
        assert_user_error(res, f"127.0.0.1:{port}", "--port")
    finally:
        taken.close()
    res = runner.invoke(main, ["serve", "--workdir", str(project.work), "--max-batch", "0"])
    assert res.exit_code == 2 and "--max-batch" in res.output
