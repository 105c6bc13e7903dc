"""Lingering close (a refused client still reads its answer) and a deadline on request headers.

When a server closes a TCP connection while bytes the client sent are still unread (a 408 to a client that
is trickling its body, a 413 to one that sends the whole upload before reading), the kernel answers with a
reset instead of an orderly close, and the reset can destroy the response before the client reads it. This
protocol closes the way web servers have long done: it shuts down its sending side after the response, keeps
reading and dropping what the client still sends, and closes once the client closes too, or after
``LINGER_S`` at the latest.
"""

from __future__ import annotations

import asyncio
from typing import Any

from uvicorn.protocols.http.h11_impl import H11Protocol

LINGER_S = 2.0  # how long a closing connection keeps reading what its client still sends
HEADER_TIMEOUT_S = 10.0
"""Seconds a connection has for a request's line and headers: a real client sends them in one packet (nginx
allows 60 s, Apache 20-40 s; a server for uploads of a few MB needs far less)."""


class LingeringTransport:
    """The transport seen by the HTTP protocol: ``close()`` half-closes and lingers; the rest passes through."""

    def __init__(self, transport: asyncio.Transport, linger_s: float = LINGER_S):
        self._transport, self._linger_s = transport, linger_s
        self.lingering = False
        self._timer: asyncio.TimerHandle | None = None

    def __getattr__(self, name: str) -> Any:
        return getattr(self._transport, name)

    def is_closing(self) -> bool:
        return self.lingering or self._transport.is_closing()

    def close(self) -> None:
        """Send what is buffered, then FIN; keep reading (and dropping) until the client closes, or time runs out."""
        if self.lingering or self._transport.is_closing():
            return
        self.lingering = True
        if not self._transport.can_write_eof():
            self._transport.close()
            return
        self._transport.write_eof()  # asyncio flushes the buffer first, then shuts down the sending side
        self._transport.resume_reading()
        self._timer = asyncio.get_running_loop().call_later(self._linger_s, self.finish)

    def finish(self) -> None:
        """Close for good (the client closed, or the linger time is over)."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if not self._transport.is_closing():
            self._transport.close()


class LingeringH11Protocol(H11Protocol):
    """uvicorn's h11 protocol with a lingering close (:class:`LingeringTransport`) and a deadline on each
    request's line and headers (:data:`HEADER_TIMEOUT_S`, from the connection's start or the last answer): a
    client that opens a connection and sends nothing, or trickles its headers, is closed, where uvicorn would
    hold it for ever. Once the headers are in, the body's own deadline applies (``--body-timeout``)."""

    header_timeout_s = HEADER_TIMEOUT_S
    _header_timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(LingeringTransport(transport))  # type: ignore[arg-type]
        self._await_headers()

    def _await_headers(self) -> None:
        """Start the clock for the next request's line and headers."""
        self._stop_header_clock()
        self._header_timer = self.loop.call_later(self.header_timeout_s, self._headers_too_slow)

    def _stop_header_clock(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def _headers_too_slow(self) -> None:
        self._header_timer = None
        if self.cycle is None or self.cycle.response_complete:  # no request's headers arrived in time
            self.transport.close()

    def data_received(self, data: bytes) -> None:
        if self.transport.lingering:  # type: ignore[attr-defined]
            return  # the answer is sent: what the client still sends is dropped
        super().data_received(data)
        if self.cycle is not None and not self.cycle.response_complete:
            self._stop_header_clock()  # a request's headers are in

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if not self.transport.is_closing():
            self._await_headers()  # a kept-alive connection's next request gets the same deadline

    def eof_received(self) -> bool | None:
        if self.transport.lingering:  # type: ignore[attr-defined]
            self.transport.finish()  # type: ignore[attr-defined]
        return super().eof_received()

    def connection_lost(self, exc: Exception | None) -> None:
        self._stop_header_clock()
        self.transport.finish()  # type: ignore[attr-defined]
        super().connection_lost(exc)
