"""The ``serve`` command: the fitted blend over HTTP (:func:`aivh_ens.serve.serve`)."""

from __future__ import annotations

import os
from pathlib import Path

import click

from aivh_ens.cli.options import BLEND, TTA, WORKDIR, cpu_threads, user_errors
from aivh_ens.errors import UserError

SERVE_MAX_PIXELS = 16_000_000  # aivh_ens.serve.ensemble.SERVE_MAX_PIXELS (not imported: it needs torch)


@click.command("serve")
@BLEND
@click.option(
    "--run", default=None, help="Serve this one run instead of a blend (threshold 0.5).  [default: the blend]"
)
@TTA
@click.option(
    "--host",
    default="127.0.0.1",
    show_default=True,
    help="Address to listen on; 0.0.0.0 opens it to the network (put a reverse proxy with TLS in front).",
)
@click.option(
    "--port",
    type=click.IntRange(0, 65535),
    default=8000,
    show_default=True,
    help="Port to listen on (0: any free port).",
)
@click.option(
    "--api-key",
    default=None,
    envvar="AIVH_ENS_API_KEY",
    show_envvar=True,
    help="Require 'Authorization: Bearer KEY' on /predict and /health (a flag is visible to other users in "
    "`ps`: prefer the environment variable or --api-key-file).  [default: none, no key]",
)
@click.option(
    "--api-key-file",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    default=None,
    help="Read the API key from this file (its first line).  [default: none]",
)
@click.option(
    "--max-pixels",
    type=click.IntRange(min=1),
    default=SERVE_MAX_PIXELS,
    show_default=True,
    help="Most pixels of one image, checked from its header before decoding; larger ones get a 422.",
)
@click.option(
    "--body-timeout",
    type=click.FloatRange(min=0, min_open=True),
    default=60.0,
    show_default=True,
    help="Seconds within which a request's whole body must arrive; past it, 408 and the connection closes.",
)
@click.option(
    "--allowed-hosts",
    default=None,
    help="Comma-separated Host header values served, e.g. localhost,127.0.0.1 or *.example.org; others get a "
    "400 (guards a loopback server against DNS rebinding).  [default: any]",
)
@click.option(
    "--max-mb",
    type=float,
    default=20.0,
    show_default=True,
    help="Largest request body in MiB (all its images together); larger ones are refused unread.",
)
@click.option("--max-files", type=int, default=16, show_default=True, help="Most images per request.")
@click.option(
    "--max-batch",
    type=int,
    default=32,
    show_default=True,
    help="Most images per forward pass, across concurrent requests; 1 turns batching off.",
)
@click.option(
    "--batch-window-ms",
    type=float,
    default=5.0,
    show_default=True,
    help="How long the first image of a batch waits for others.",
)
@click.option(
    "--max-queue",
    type=int,
    default=256,
    show_default=True,
    help="Most images waiting for a forward pass; past it, 503 with Retry-After.",
)
@click.option(
    "--max-connections",
    type=int,
    default=256,
    show_default=True,
    help="Most connections at once; past it, 503.",
)
@click.option(
    "--decode-threads", type=int, default=None, help="Threads decoding uploads.  [default: cores, at most 4]"
)
@click.option(
    "--root-path",
    default="",
    help="URL prefix when a reverse proxy serves it under a sub-path, e.g. /aivh.  [default: none]",
)
@click.option("--device", default=None, help="auto, cpu, cuda or cuda:N.  [default: auto]")
@WORKDIR
@cpu_threads
@user_errors
def serve_cmd(
    blend_path,
    run,
    tta,
    host,
    port,
    api_key,
    api_key_file,
    max_pixels,
    body_timeout,
    allowed_hosts,
    max_mb,
    max_files,
    max_batch,
    batch_window_ms,
    max_queue,
    max_connections,
    decode_threads,
    root_path,
    device,
    workdir,
) -> None:
    """Serve the fitted blend over HTTP: POST /predict (multipart images), GET /health, a page at /.

    Every fold model of every run in the blend is loaded once; scores equal `predict`'s for the same file.
    Images that arrive together share one forward pass. Needs the extra: pip install 'aivh-ens[serve]'.

    \b
    aivh-ens serve --workdir demo
    curl -F files=@photo.jpg -F files=@render.png http://127.0.0.1:8000/predict
    AIVH_ENS_API_KEY=s3cret aivh-ens serve --host 0.0.0.0 --root-path /aivh --device cuda
    """
    check_serve_extra()
    from aivh_ens.serve import ServeSettings, serve

    settings = ServeSettings(
        max_mb=max_mb,
        max_files=max_files,
        max_batch=max_batch,
        window_ms=batch_window_ms,
        max_queue=max_queue,
        max_connections=max_connections,
        decode_threads=decode_threads or min(4, os.cpu_count() or 1),
        api_key=read_api_key(api_key, api_key_file),
        max_pixels=max_pixels,
        body_timeout_s=body_timeout,
        allowed_hosts=tuple(h.strip() for h in allowed_hosts.split(",") if h.strip())
        if allowed_hosts
        else None,
    )
    serve(
        workdir,
        blend_path=blend_path,
        run=run,
        tta=tta,
        device=device,
        host=host,
        port=port,
        root_path=root_path,
        settings=settings,
        log=click.echo,
    )


def read_api_key(key: str | None, path: Path | None) -> str | None:
    """The API key from --api-key (or AIVH_ENS_API_KEY), or the first line of --api-key-file."""
    if path is None:
        return key
    if key is not None:
        raise UserError("give the API key once: --api-key (or AIVH_ENS_API_KEY) or --api-key-file, not both")
    try:
        lines = path.read_text().splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"--api-key-file {path}: cannot read it ({e}); give a readable text file") from None
    if not lines or not lines[0].strip():
        raise UserError(f"--api-key-file {path}: its first line is empty; write the key there")
    return lines[0].strip()


def check_serve_extra() -> None:
    """UserError naming the pip command when the serve extra (fastapi, uvicorn, python-multipart) is missing."""
    import importlib.util

    needed = {
        "fastapi": ("fastapi",),
        "uvicorn": ("uvicorn",),
        "python-multipart": ("python_multipart", "multipart"),
    }
    missing = [pkg for pkg, mods in needed.items() if not any(importlib.util.find_spec(m) for m in mods)]
    if missing:
        raise UserError(f"serve needs {', '.join(missing)}, not installed: pip install 'aivh-ens[serve]'")
