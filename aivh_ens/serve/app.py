"""The HTTP service: FastAPI routes over a loaded :class:`~aivh_ens.serve.ensemble.Ensemble`.

``POST /predict`` takes images as multipart field ``files``; ``GET /health`` describes the runs, device and
warm-up state; ``GET /`` is a page to drop images on; ``/docs`` is FastAPI's OpenAPI page. Every error is
a JSON ``{"error": "..."}`` with a 4xx status (5xx only for a bug), logged as one line with the client
address. Uploads stay in memory or in anonymous temporary files: no request path or file name is ever used
to open a file.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import secrets
import time
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from importlib.resources import files
from typing import Annotated, Any

from fastapi import Depends, FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import BaseModel, Field
from starlette.datastructures import FormData, UploadFile
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.middleware.trustedhost import TrustedHostMiddleware
from starlette.requests import ClientDisconnect

from aivh_ens import __version__
from aivh_ens.data.images import BadImageError
from aivh_ens.errors import UserError
from aivh_ens.serve.batcher import Batcher, BatcherClosed, QueueFull
from aivh_ens.serve.ensemble import (
    SERVE_FORMATS,
    SERVE_MAX_PIXELS,
    Decoded,
    Ensemble,
    Scored,
    UnsupportedFormat,
    check_upload,
)
from aivh_ens.serve.limits import BodyLimit, BodyTimeout, BodyTooLarge, log_error

FIELD = "files"  # the multipart field holding the images
API_KEY_ENV = "AIVH_ENS_API_KEY"
ROUTES = "GET /, GET /health, POST /predict, GET /docs"
RETRY = {"Retry-After": "1"}  # seconds: a 503 is overload or a restart, over in moments
log = logging.getLogger("aivh_ens.serve")


@dataclass(frozen=True)
class ServeSettings:
    """Limits and batching of the service (CLI flags of ``aivh-ens serve`` in brackets).

    Attributes:
        max_mb: the largest request body in MiB, all its images together [--max-mb].
        max_files: the most images in one request [--max-files].
        max_batch: the most images per forward pass; 1 turns batching off [--max-batch].
        window_ms: how long the first image of a batch waits for others [--batch-window-ms].
        decode_threads: threads that decode uploads [--decode-threads].
        max_queue: the most images waiting for a forward pass; past it, 503 with Retry-After [--max-queue].
        max_connections: the most connections at once; past it, uvicorn answers 503 [--max-connections].
        api_key: if set, ``/predict`` and ``/health`` need ``Authorization: Bearer <key>`` [--api-key,
            --api-key-file, or the environment variable AIVH_ENS_API_KEY].
        max_pixels: the most pixels of one upload, checked from its header [--max-pixels].
        body_timeout_s: seconds within which a request's whole body must arrive; past it, 408 and the
            connection is closed (a trickling client cannot hold it) [--body-timeout].
        allowed_hosts: if set, the Host header values served (e.g. ``localhost``, ``*.example.org``); others
            get a 400 (DNS rebinding of a loopback server) [--allowed-hosts].
        stuck_s: a forward pass running longer than this makes ``/health`` answer 503.
    """

    max_mb: float = 20.0
    max_files: int = 16
    max_batch: int = 32
    window_ms: float = 5.0
    decode_threads: int = 4
    max_queue: int = 256
    max_connections: int = 256
    api_key: str | None = field(default=None, repr=False)  # kept out of logs and tracebacks
    max_pixels: int = SERVE_MAX_PIXELS
    body_timeout_s: float = 60.0
    allowed_hosts: tuple[str, ...] | None = None
    stuck_s: float = 120.0

    def __post_init__(self) -> None:
        checks = {
            "max_mb (--max-mb)": self.max_mb > 0,
            "max_files (--max-files)": self.max_files >= 1,
            "max_batch (--max-batch)": self.max_batch >= 1,
            "window_ms (--batch-window-ms)": self.window_ms >= 0,
            "decode_threads (--decode-threads)": self.decode_threads >= 1,
            "max_queue (--max-queue)": self.max_queue >= 1,
            "max_connections (--max-connections)": self.max_connections >= 1,
            "max_pixels (--max-pixels)": self.max_pixels >= 1,
            "body_timeout_s (--body-timeout)": self.body_timeout_s > 0,
            "stuck_s": self.stuck_s > 0,
        }
        for name, ok in checks.items():
            if not ok:
                raise UserError(
                    f"{name} must be positive (window_ms may be 0), got {getattr(self, name.split()[0])}"
                )
        if self.api_key is not None and not self.api_key.strip():
            raise UserError(f"api_key (--api-key or {API_KEY_ENV}) is empty; give a key or leave it unset")

    @property
    def max_bytes(self) -> int:
        return int(self.max_mb * 1024 * 1024)


# ---- response models (they document /docs) -----------------------------------------------------------------


class ImageResult(BaseModel):
    image: str = Field(description="the upload's file name as the client sent it (display only)")
    prob: float = Field(
        description="P(AI-generated); for a rank-space blend, the blended rank score in [0, 1]"
    )
    label: int = Field(description="1 = AI-generated, 0 = human-made: prob >= threshold")
    threshold: float = Field(description="the blend's threshold (0.5 for a single run)")
    runs: dict[str, float] = Field(description="each run's P(AI), averaged over its folds and TTA views")
    latency_ms: float = Field(description="from the request's arrival to this image's score")


class PredictResponse(BaseModel):
    results: list[ImageResult]
    space: str = Field(description="the blend space: prob, logit or rank")
    threshold: float
    latency_ms: float = Field(description="from the request's arrival to the last image's score")


class ErrorResponse(BaseModel):
    error: str = Field(description="one line: what is wrong and how to fix it")


# ---- state and lifespan --------------------------------------------------------------------------------------


class ServeState:
    """What the routes share: the ensemble, the settings, the batcher, the decode pool, the warm-up flag."""

    def __init__(self, ensemble: Ensemble, settings: ServeSettings):
        self.ensemble, self.settings = ensemble, settings
        self.batcher: Batcher[Decoded, Scored] = Batcher(
            ensemble.score,
            max_batch=settings.max_batch,
            window_s=settings.window_ms / 1000,
            max_queue=settings.max_queue,
        )
        self.pool: ThreadPoolExecutor | None = None
        self.warm = False
        self.warm_error: str | None = None  # why the warm-up pass failed
        self._warmup: asyncio.Task | None = None

    @contextlib.asynccontextmanager
    async def lifespan(self, app: FastAPI) -> AsyncIterator[None]:
        self.pool = ThreadPoolExecutor(self.settings.decode_threads, thread_name_prefix="aivh-ens-decode")
        await self.batcher.start()
        self._warmup = asyncio.create_task(self._warm_up())
        try:
            yield
        finally:
            self._warmup.cancel()
            await self.batcher.stop()
            self.pool.shutdown(wait=False, cancel_futures=True)

    async def _warm_up(self) -> None:
        """One pass over a blank image, so the first request does not pay for lazy initialisation."""
        try:
            await self.batcher.submit([self.ensemble.blank()])
        except Exception as e:  # a bug in scoring: say so now; /health answers 503 with the reason
            log.exception("the warm-up pass failed; /health answers 503")
            self.warm_error = f"the warm-up pass failed ({type(e).__name__}: {str(e)[:200]})"
            return
        self.warm = True

    def unready(self) -> str | None:
        """Why the service cannot score right now (warming up, warm-up failed, scoring loop dead or stuck),
        or None when it is ready."""
        if self.warm_error:
            return self.warm_error
        if not self.batcher.alive:
            return "the scoring loop is not running"
        if self.batcher.busy_s > self.settings.stuck_s:
            return f"a forward pass has run for {self.batcher.busy_s:.0f} s (stuck?)"
        return None if self.warm else "warming up"

    async def decode(self, data: bytes, name: str) -> Decoded:
        """Decode an upload in the thread pool; 415 naming it when its format is not served, 422 when it is
        no usable image (over the pixel cap among them)."""
        try:
            return await asyncio.get_running_loop().run_in_executor(self.pool, self._decode, data, name)
        except UnsupportedFormat as e:
            raise HTTPException(415, f"{name}: {e.reason}; send one of {', '.join(SERVE_FORMATS)}") from None
        except BadImageError as e:
            raise HTTPException(
                422,
                f"{name}: {e.reason}; send a {', '.join(SERVE_FORMATS)} image of at most "
                f"{self.settings.max_pixels:,} pixels",
            ) from None

    def _decode(self, data: bytes, name: str) -> Decoded:
        check_upload(data, name, self.settings.max_pixels)  # the format and size, from the header alone
        return self.ensemble.decode(data, name)

    async def score_all(
        self, images: list[Decoded], t0: float, names: list[str]
    ) -> list[tuple[Scored, float]]:
        """Each image's score and the milliseconds since ``t0`` when it was ready. The request is admitted
        whole or not at all: 503 (with Retry-After) when the queue cannot take every image, or the server
        is stopping."""
        try:
            futures = self.batcher.enqueue(images)
        except (BatcherClosed, QueueFull) as e:
            raise HTTPException(503, f"{e}; retry shortly", headers=RETRY) from None
        return list(
            await asyncio.gather(*(self.score(f, t0, n) for f, n in zip(futures, names, strict=True)))
        )

    async def score(self, future: asyncio.Future, t0: float, name: str = "image") -> tuple[Scored, float]:
        """The queued image's score and the milliseconds since ``t0`` when it was ready.

        503 (with Retry-After) when the server is stopping or memory ran out; 422 naming the upload when
        scoring it alone fails.
        """
        try:
            scored = await future
        except BatcherClosed as e:
            raise HTTPException(503, f"{e}; retry shortly", headers=RETRY) from None
        except Exception as e:  # it failed scored alone (the batcher retried its batch item by item)
            if out_of_memory(e):
                log.warning(
                    "out of memory scoring an image: %s", str(e).splitlines()[0][:200] if str(e) else e
                )
                raise HTTPException(
                    503, "out of memory while scoring; retry shortly", headers=RETRY
                ) from None
            log.error("%s: an image could not be scored", name, exc_info=e)
            raise HTTPException(
                422, f"{name}: this image could not be scored ({type(e).__name__}); the other images were"
            ) from None
        return scored, (time.perf_counter() - t0) * 1000


def create_app(ensemble: Ensemble, settings: ServeSettings | None = None) -> FastAPI:
    """The FastAPI application serving ``ensemble`` (run it with uvicorn, or see :func:`aivh_ens.serve.serve`)."""
    state = ServeState(ensemble, settings or ServeSettings())
    app = FastAPI(
        title="aivh-ens",
        version=__version__,
        lifespan=state.lifespan,
        description="P(AI-generated) of images from a cross-validated timm ensemble (aivh-ens).",
    )
    app.state.serve = state
    app.add_middleware(BodyLimit, max_bytes=state.settings.max_bytes, timeout_s=state.settings.body_timeout_s)
    if state.settings.allowed_hosts:  # outermost: a foreign Host header gets a 400 before anything else
        app.add_middleware(TrustedHostMiddleware, allowed_hosts=list(state.settings.allowed_hosts))
    app.add_exception_handler(StarletteHTTPException, _http_error)  # type: ignore[arg-type]
    app.add_exception_handler(RequestValidationError, _validation_error)  # type: ignore[arg-type]
    app.add_exception_handler(Exception, _bug)
    page = files("aivh_ens.serve").joinpath("page.html").read_text(encoding="utf-8")
    _add_routes(app, page)
    return app


# ---- routes ---------------------------------------------------------------------------------------------------

_bearer = HTTPBearer(auto_error=False, description="the key given to --api-key")
_ERRORS: dict[int | str, dict[str, Any]] = {
    c: {"model": ErrorResponse} for c in (400, 401, 413, 415, 422, 503)
}
_MULTIPART = {
    "requestBody": {
        "required": True,
        "content": {
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "required": [FIELD],
                    "properties": {FIELD: {"type": "array", "items": {"type": "string", "format": "binary"}}},
                }
            }
        },
    }
}


def require_key(
    request: Request, creds: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)]
) -> None:
    """401 unless the request carries the API key as a bearer token (when one is set)."""
    key = request.app.state.serve.settings.api_key
    if key is None:
        return
    if creds is None or not secrets.compare_digest(creds.credentials.encode(), key.encode()):
        raise HTTPException(
            401,
            "missing or wrong API key: send the header 'Authorization: Bearer KEY' with "
            f"the key given to --api-key ({API_KEY_ENV})",
            headers={"WWW-Authenticate": "Bearer"},
        )


def _add_routes(app: FastAPI, page: str) -> None:
    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def index() -> HTMLResponse:
        return HTMLResponse(page)

    @app.get("/health", dependencies=[Depends(require_key)], responses={401: {"model": ErrorResponse}})
    async def health(request: Request) -> JSONResponse:
        """The runs, device, model count, warm-up state and batching counters; 503 until the service can
        score (warming up, warm-up failed, scoring loop dead or stuck)."""
        s: ServeState = request.app.state.serve
        problem = s.unready()
        return JSONResponse(_health(s, problem), status_code=503 if problem else 200)

    _add_predict(app)


def _health(s: ServeState, problem: str | None) -> dict[str, Any]:
    return {
        "status": problem or "ready",
        "warm": s.warm,
        **s.ensemble.describe(),
        "batching": {
            "max_batch": s.settings.max_batch,
            "window_ms": s.settings.window_ms,
            "batches": s.batcher.batches,
            "images": s.batcher.items,
        },
        "limits": {
            "max_mb": s.settings.max_mb,
            "max_files": s.settings.max_files,
            "max_queue": s.settings.max_queue,
            "max_connections": s.settings.max_connections,
            "max_pixels": s.settings.max_pixels,
            "body_timeout_s": s.settings.body_timeout_s,
        },
    }


def _add_predict(app: FastAPI) -> None:
    @app.post(
        "/predict",
        response_model=PredictResponse,
        dependencies=[Depends(require_key)],
        responses=_ERRORS,
        openapi_extra=_MULTIPART,
    )
    async def predict(request: Request) -> PredictResponse:
        """P(AI), label, threshold and per-run scores of each image in multipart field ``files``."""
        t0 = time.perf_counter()
        s: ServeState = request.app.state.serve
        uploads = await read_uploads(request, s.settings)
        decoded = await asyncio.gather(*(s.decode(data, name) for name, data in uploads))
        scored = await s.score_all(list(decoded), t0, [name for name, _ in uploads])
        t = s.ensemble.threshold
        results = [
            ImageResult(image=name, prob=r.prob, label=r.label, threshold=t, runs=r.runs, latency_ms=ms)
            for (name, _), (r, ms) in zip(uploads, scored, strict=True)
        ]
        return PredictResponse(
            results=results, space=s.ensemble.space, threshold=t, latency_ms=max(ms for _, ms in scored)
        )


def out_of_memory(e: BaseException) -> bool:
    """Whether ``e`` is running out of memory (host or GPU): a 503, not the image's fault."""
    return isinstance(e, MemoryError) or type(e).__name__ == "OutOfMemoryError" or "out of memory" in str(e)


# ---- uploads ----------------------------------------------------------------------------------------------


def display_name(filename: str | None, i: int) -> str:
    """The client's file name for display only: its last path part, printable characters, at most 120."""
    base = re.split(r"[\\/]", filename or "")[-1]
    return "".join(c for c in base if c.isprintable())[:120] or f"image {i + 1}"


async def read_uploads(request: Request, settings: ServeSettings) -> list[tuple[str, bytes]]:
    """``(display name, bytes)`` of each image in multipart field ``files``; 4xx naming what is wrong."""
    example = f"e.g. curl -F {FIELD}=@photo.jpg http://HOST:PORT/predict"
    ctype = request.headers.get("content-type", "")
    if not ctype and request.headers.get("content-length", "0") == "0":
        raise HTTPException(
            400, f"empty request: no images; send each image in multipart field '{FIELD}', {example}"
        )
    if not ctype.lower().startswith("multipart/form-data"):
        raise HTTPException(
            415,
            f"expected a multipart/form-data body, got content type {ctype[:80]!r}; "
            f"send each image in multipart field '{FIELD}', {example}",
        )
    try:
        form = await request.form(max_files=settings.max_files, max_fields=settings.max_files)
    except (BodyTooLarge, BodyTimeout):
        raise
    except StarletteHTTPException as e:  # starlette's: a malformed body, or more parts than allowed
        raise HTTPException(400, _form_problem(str(e.detail), settings, example)) from None
    except ClientDisconnect:
        raise HTTPException(400, "the client closed the connection before its body was complete") from None
    try:
        return await _images_of(form, example)
    finally:
        await form.close()


def _form_problem(detail: str, settings: ServeSettings, example: str) -> str:
    if detail.startswith(("Too many files", "Too many fields")):
        return (
            f"too many parts: at most {settings.max_files} images per request (--max-files); "
            "send the others in further requests"
        )
    return f"malformed multipart body ({detail.rstrip('.')}); {example}"


async def _images_of(form: FormData, example: str) -> list[tuple[str, bytes]]:
    items = form.multi_items()
    values = [v for k, v in items if k == FIELD]
    if not values:
        got = ", ".join(sorted({repr(k[:40]) for k, _ in items})) or "none"
        raise HTTPException(
            400, f"no images in multipart field '{FIELD}' (fields received: {got}); {example}"
        )
    if not all(isinstance(v, UploadFile) for v in values):
        raise HTTPException(400, f"field '{FIELD}' holds text, not an uploaded file; {example}")
    return [(display_name(v.filename, i), await v.read()) for i, v in enumerate(values)]  # type: ignore[union-attr]


# ---- errors -------------------------------------------------------------------------------


async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    detail = str(exc.detail)
    if exc.status_code == 404:
        detail = f"no route {request.url.path[:100]!r}; the routes are {ROUTES}"
    elif exc.status_code == 405:
        detail = f"{request.method} is not allowed on {request.url.path[:100]!r}; the routes are {ROUTES}"
    log_error(request.scope, exc.status_code, detail)
    return JSONResponse({"error": detail}, status_code=exc.status_code, headers=exc.headers)


async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
    first = exc.errors()[0] if exc.errors() else {}
    detail = f"invalid request: {'.'.join(map(str, first.get('loc', ())))}: {first.get('msg', exc)}"
    log_error(request.scope, 422, detail)
    return JSONResponse({"error": detail}, status_code=422)


async def _bug(request: Request, exc: Exception) -> JSONResponse:
    log.error("%s %s: internal error", request.method, request.url.path[:200], exc_info=exc)
    return JSONResponse(
        {
            "error": f"internal error ({type(exc).__name__}); this is a bug: please report it "
            "with the server log"
        },
        status_code=500,
    )
