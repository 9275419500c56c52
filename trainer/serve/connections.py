"""What uvicorn does with a connection before the gate (trainer/serve/gate.py) sees a request on it.

uvicorn by itself waits forever for a request's headers: a client that connects and sends nothing, or a header line
every few seconds (slow-loris), holds its connection for good, and enough of them use up the process's file
descriptors. ``configure`` sets what `samebox serve` runs uvicorn with, in both dialects of `transformers serve`:

- a header deadline: a connection must send a request's headers within ``read_timeout_s`` of opening, or of its
  last response, else it is closed (``HeaderDeadline``, uvicorn's h11 protocol with one timer more);
- ``timeout_keep_alive``: an idle keep-alive connection closes after this many seconds (uvicorn's default, said);
- ``h11_max_incomplete_event_size``: the most a connection buffers before its headers end (h11's default, said):
  longer headers are a 400;
- ``limit_concurrency``: past this many connections or requests at once uvicorn answers 503 itself (a plain one,
  without the gate's Retry-After), a backstop above the gate's own limits, which come first.
"""

from __future__ import annotations

import asyncio
from typing import Any

from uvicorn.protocols.http.h11_impl import H11Protocol

from trainer.serve.gate import Limits

KEEP_ALIVE_S = 5
HEADER_BYTES = 16 << 10
# Connections beyond the gate's running + queued requests: idle keep-alive ones, /health probes, requests the gate
# answers at once (4xx, 503). Well under the usual 1024 open files.
CONNECTION_SLACK = 256


class HeaderDeadline(H11Protocol):
    """uvicorn's h11 protocol, closing a connection whose next request's headers have not all come within
    ``read_timeout_s`` (a class attribute: ``deadline_protocol`` makes the class)."""

    read_timeout_s = 30.0
    _deadline: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm(None)

    def on_response_complete(self) -> None:
        answered = self.cycle
        super().on_response_complete()  # may start the next, pipelined, request already
        self._arm(answered)

    def connection_lost(self, exc: Exception | None) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
        super().connection_lost(exc)

    def _arm(self, answered: Any) -> None:
        """Close the connection unless a request after ``answered`` (the cycle of the last response, None on a
        new connection) has its headers in by the deadline: uvicorn makes a new cycle once they are."""
        if self._deadline is not None:
            self._deadline.cancel()
        if self.transport.is_closing():
            return

        def expire() -> None:
            if self.cycle is answered and not self.transport.is_closing():
                self.transport.close()

        self._deadline = self.loop.call_later(self.read_timeout_s, expire)


def deadline_protocol(read_timeout_s: float) -> type[HeaderDeadline]:
    return type("HeaderDeadline", (HeaderDeadline,), {"read_timeout_s": read_timeout_s})


def configure(config: Any, limits: Limits) -> None:
    """Set a uvicorn.Config's connection settings (before the server starts: uvicorn reads them as it loads)."""
    config.http = deadline_protocol(limits.read_timeout_s)
    config.timeout_keep_alive = KEEP_ALIVE_S
    config.h11_max_incomplete_event_size = HEADER_BYTES
    config.limit_concurrency = limits.max_concurrent + limits.max_queue + CONNECTION_SLACK
