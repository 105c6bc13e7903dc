"""The request body's limits, enforced below the app (ASGI middleware): size and time.

A body over ``--max-mb`` is refused from its Content-Length before the app sees it, or (chunked uploads) as
soon as the bytes read pass the limit. A client that announced ``Expect: 100-continue`` gets its 413 at once
and never sends the body. Any other refused body is read and dropped for a bounded number of bytes and
seconds, so a client that sends it all before reading (urllib, requests) sees the 413 rather than a reset.
Every body must arrive within ``--body-timeout`` seconds of the request: a client trickling it (slowloris)
gets a 408 and its connection is closed, whatever the pace of its bytes.
"""

from __future__ import annotations

import asyncio
import logging

from fastapi import HTTPException
from fastapi.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

DRAIN_MIN_BYTES = 64 * 2**20  # a refused body up to this (or 4x --max-mb) is read and dropped
DRAIN_MAX_S = 10.0  # and for at most this long: a refused client cannot hold its connection longer
CLOSE = {"Connection": "close"}
log = logging.getLogger("aivh_ens.serve")


class BodyTooLarge(HTTPException):
    def __init__(self, max_bytes: int):
        super().__init__(
            413,
            f"request body over the limit of {max_bytes / 2**20:g} MiB (--max-mb); send "
            "fewer or smaller images per request",
            headers=CLOSE,
        )


class BodyTimeout(HTTPException):
    def __init__(self, timeout_s: float):
        super().__init__(
            408,
            f"the request body did not arrive within {timeout_s:g} s (--body-timeout); send it at once, or "
            "fewer or smaller images per request",
            headers=CLOSE,
        )


def log_error(scope: Scope, status: int, detail: str) -> None:
    """One warning line: client address, method, path, status and the error."""
    client = scope.get("client")
    where = f"{client[0]}:{client[1]}" if client else "unknown client"
    path = scope.get("path", "")[:200].encode("unicode_escape").decode()
    log.warning("%s %s %s -> %d: %s", where, scope.get("method", ""), path, status, detail)


class BodyLimit:
    """ASGI middleware: at most ``max_bytes`` of body, all of it within ``timeout_s`` of the request."""

    def __init__(self, app: ASGIApp, max_bytes: int, timeout_s: float = 60.0):
        self.app, self.max_bytes, self.timeout_s = app, max_bytes, timeout_s
        self.drain_bytes = max(DRAIN_MIN_BYTES, 4 * max_bytes)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = dict(scope["headers"])
        length = headers.get(b"content-length", b"0")
        if not length.isdigit() or int(length) > self.max_bytes:
            await self._refuse(scope, receive, send, length, headers.get(b"expect", b"").lower())
            return
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.timeout_s
        seen = 0

        async def limited() -> Message:
            nonlocal seen
            message = await _before(receive, deadline, self.timeout_s)
            seen += len(message.get("body", b""))
            if seen > self.max_bytes:
                if message.get("more_body"):
                    await drain(receive, self.drain_bytes - seen, min(deadline, loop.time() + DRAIN_MAX_S))
                raise BodyTooLarge(self.max_bytes)
            return message

        await self.app(scope, limited, send)

    async def _refuse(self, scope: Scope, receive: Receive, send: Send, length: bytes, expect: bytes) -> None:
        """A 413 (or 400 for a bad Content-Length); the body is drained only if the client sends it anyway."""
        err = BodyTooLarge(self.max_bytes) if length.isdigit() else HTTPException(400, "bad Content-Length")
        log_error(scope, err.status_code, str(err.detail))
        if length.isdigit() and int(length) <= self.drain_bytes and expect != b"100-continue":
            loop = asyncio.get_running_loop()
            await drain(receive, self.drain_bytes, loop.time() + min(DRAIN_MAX_S, self.timeout_s))
        await JSONResponse({"error": err.detail}, status_code=err.status_code, headers=CLOSE)(
            scope, receive, send
        )


async def _before(receive: Receive, deadline: float, timeout_s: float) -> Message:
    """The next body message, or BodyTimeout once ``deadline`` (the event loop's clock) has passed."""
    left = deadline - asyncio.get_running_loop().time()
    try:
        if left <= 0:
            raise TimeoutError
        return await asyncio.wait_for(receive(), left)
    except (TimeoutError, asyncio.TimeoutError):
        raise BodyTimeout(timeout_s) from None


async def drain(receive: Receive, budget: int, deadline: float) -> None:
    """Read and drop the rest of a request body: at most ``budget`` bytes, until ``deadline`` at the latest."""
    loop = asyncio.get_running_loop()
    while budget > 0:
        left = deadline - loop.time()
        if left <= 0:
            return
        try:
            message = await asyncio.wait_for(receive(), left)
        except (TimeoutError, asyncio.TimeoutError):
            return
        if message["type"] != "http.request":
            return  # the client left
        budget -= len(message.get("body", b""))
        if not message.get("more_body"):
            return
