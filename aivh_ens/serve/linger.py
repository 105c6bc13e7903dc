"""Lingering close: a refused client still reads its answer.

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
    """uvicorn's h11 protocol with a lingering close (:class:`LingeringTransport`)."""

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(LingeringTransport(transport))  # type: ignore[arg-type]

    def data_received(self, data: bytes) -> None:
        if self.transport.lingering:  # type: ignore[attr-defined]
            return  # the answer is sent: what the client still sends is dropped
        super().data_received(data)

    def eof_received(self) -> bool | None:
        if self.transport.lingering:  # type: ignore[attr-defined]
            self.transport.finish()  # type: ignore[attr-defined]
        return super().eof_received()

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport.finish()  # type: ignore[attr-defined]
        super().connection_lost(exc)
