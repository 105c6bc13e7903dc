"""Run the service with uvicorn: on a socket bound up front (a taken port is a one-line error), or in a
background thread for tests and benchmarks (:func:`running_server`)."""

from __future__ import annotations

import contextlib
import copy
import socket
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import uvicorn
from fastapi import FastAPI
from uvicorn.config import LOGGING_CONFIG

from aivh_ens.errors import UserError
from aivh_ens.serve.app import ServeSettings, create_app
from aivh_ens.serve.ensemble import Ensemble
from aivh_ens.serve.linger import LingeringH11Protocol


def bind(host: str, port: int) -> socket.socket:
    """A TCP socket bound to ``host:port`` (port 0: a free one); UserError naming --host/--port if it cannot."""
    try:
        family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]
        sock = socket.socket(family, socket.SOCK_STREAM)
    except OSError as e:
        raise UserError(
            f"cannot listen on {host}:{port} ({e}); pass an address of this machine to --host"
        ) from None
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        raise UserError(
            f"cannot listen on {host}:{port} ({e.strerror or e}); pick another --port, or stop "
            "what listens there"
        ) from None
    return sock


def _log_config(level: str) -> dict:
    """uvicorn's logging set-up, with the service's own one-line error log on the same handler."""
    cfg = copy.deepcopy(LOGGING_CONFIG)
    cfg["loggers"]["aivh_ens.serve"] = {"handlers": ["default"], "level": level.upper(), "propagate": False}
    return cfg


KEEP_ALIVE_S = 5  # an idle keep-alive connection is closed after this: idle clients cannot pile up


def make_server(app: FastAPI, *, root_path: str = "", log_level: str = "info") -> uvicorn.Server:
    """A uvicorn server for ``app`` (proxy headers trusted from 127.0.0.1, as uvicorn does by default); at
    most the settings' ``max_connections`` at once (uvicorn answers 503 past it)."""
    settings = getattr(getattr(app.state, "serve", None), "settings", None) or ServeSettings()
    config = uvicorn.Config(
        app,
        root_path=root_path,
        log_level=log_level,
        log_config=_log_config(log_level),
        proxy_headers=True,
        http=LingeringH11Protocol,  # a refused client reads its 408/413 before the close
        timeout_keep_alive=KEEP_ALIVE_S,
        limit_concurrency=settings.max_connections,
        timeout_graceful_shutdown=10,
    )
    return uvicorn.Server(config)


def serve(
    workdir: str | Path = ".",
    *,
    blend_path: str | Path | None = None,
    run: str | None = None,
    tta: str | None = None,
    device: str | None = None,
    host: str = "127.0.0.1",
    port: int = 8000,
    root_path: str = "",
    settings: ServeSettings | None = None,
    log: Callable[[str], None] = print,
) -> None:
    """Load every fold model of the blend (or of ``run``) once and serve it over HTTP until interrupted.

    Args:
        workdir: project folder holding runs/ and oof/.
        blend_path, run: the fitted blend (default ``runs/blend/blend.json``) or one run (threshold 0.5).
        tta, device: as for ``predict`` (default each run's recipe TTA; the GPU when there is one).
        host, port: where to listen (localhost by default; port 0 picks a free one).
        root_path: the URL prefix a reverse proxy serves the app under (e.g. ``/aivh``).
        settings: limits, batching and the API key (:class:`ServeSettings`).

    Raises:
        UserError: a bad spec, blend or run, or an address that cannot be bound; before anything listens.
    """
    settings = settings or ServeSettings()
    sock = bind(host, port)  # first: a taken port fails before the models load
    try:
        ensemble = Ensemble.load(workdir, blend_path=blend_path, run=run, tta=tta, device=device, log=log)
    except BaseException:
        sock.close()
        raise
    server = make_server(create_app(ensemble, settings), root_path=root_path)
    bound_host, bound_port = sock.getsockname()[:2]
    runs = ", ".join(r.info.name for r in ensemble.runs)
    log(
        f"serving {runs} ({ensemble.model_count} fold models on {ensemble.device}) at "
        f"http://{bound_host}:{bound_port}{root_path}/ (POST /predict, GET /health, /docs); "
        f"{'bearer token required' if settings.api_key else 'no API key'}"
    )
    server.run(sockets=[sock])


@contextlib.contextmanager
def running_server(
    app: FastAPI, host: str = "127.0.0.1", port: int = 0, start_timeout: float = 60.0
) -> Iterator[str]:
    """Serve ``app`` with uvicorn in a background thread; yields its base URL; stops it on exit."""
    sock = bind(host, port)
    server = make_server(app, log_level="warning")
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True, name="uvicorn")
    thread.start()
    try:
        deadline = time.monotonic() + start_timeout
        while not server.started:
            if not thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError(f"uvicorn did not start within {start_timeout:g} s")
            time.sleep(0.02)
        yield f"http://{host}:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(timeout=15)
        sock.close()
