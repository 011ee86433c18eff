"""SIP over TCP (RFC 3261 §18.3): messages framed by Content-Length, within limits.

Limits: the header section at most message.MAX_HEADER_BYTES, the body at most message.MAX_BODY_BYTES (a
larger Content-Length is answered 413, a larger header section 513, and the connection is closed, since the
stream cannot be re-framed); at most `max_connections` at once (more are closed on accept); a connection that
carries no complete message for `idle_timeout_s` is closed unless a live call still uses it (our BYE and
in-dialog responses go back on it).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
from collections.abc import Callable

from pono.signaling.phone.message import MAX_BODY_BYTES, MAX_HEADER_BYTES

log = logging.getLogger(__name__)

Send = Callable[[bytes], None]
Dispatch = Callable[[bytes, tuple[str, int], Send], "asyncio.Future[object]"]
_LENGTH = re.compile(rb"\r?\n(?:content-length|l)[ \t]*:[ \t]*(\d+)", re.IGNORECASE)


class SipTcpListener:
    """Accepts SIP TCP connections and hands each framed message to `dispatch(data, (host, port), send)`,
    which handles it in a task of its own (so a CANCEL is read while its INVITE is still being answered).

    `in_use(send)` says whether a live dialog still sends on that connection (then idleness does not close
    it)."""

    def __init__(self, dispatch: Dispatch, in_use: Callable[[Send], bool], max_connections: int,
                 idle_timeout_s: float) -> None:
        self._dispatch = dispatch
        self._in_use = in_use
        self.max_connections = max_connections
        self.idle_timeout_s = idle_timeout_s
        self._server: asyncio.Server | None = None
        self._connections: set[asyncio.StreamWriter] = set()
        self.refused = 0

    async def start(self, host: str, port: int) -> None:
        # The reader's limit bounds what readuntil() buffers while looking for the end of the headers.
        self._server = await asyncio.start_server(self._connection, host, port, limit=MAX_HEADER_BYTES + 4)

    def close(self) -> None:
        if self._server is not None:
            self._server.close()
        for writer in list(self._connections):
            writer.close()

    @property
    def connections(self) -> int:
        return len(self._connections)

    async def _connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        addr = writer.get_extra_info("peername")[:2]
        if len(self._connections) >= self.max_connections:
            self.refused += 1
            log.warning("SIP TCP connection from %s refused: %d open (PONO_SIP_TCP_MAX_CONNECTIONS)",
                        addr[0], len(self._connections))
            writer.close()
            return
        self._connections.add(writer)

        def send(out: bytes) -> None:
            if not writer.is_closing():
                writer.write(out)

        try:
            while True:
                try:
                    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), self.idle_timeout_s)
                except TimeoutError:
                    if self._in_use(send):
                        continue
                    log.info("SIP TCP connection from %s closed: idle for %s s", addr[0], self.idle_timeout_s)
                    break
                if not head.strip():
                    send(b"\r\n")  # RFC 5626 §4.4.1: a CRLF pong for a double-CRLF ping
                    continue
                found = _LENGTH.search(head)
                length = int(found.group(1)) if found else 0
                if length > MAX_BODY_BYTES:
                    await self._dispatch(head, addr, send)  # parse() refuses it: 413 when it can be answered
                    break
                body = await asyncio.wait_for(reader.readexactly(length), self.idle_timeout_s) if length else b""
                self._dispatch(head + body, addr, send)
        except asyncio.LimitOverrunError:
            log.warning("SIP TCP connection from %s closed: header section over %d bytes", addr[0], MAX_HEADER_BYTES)
        except (asyncio.IncompleteReadError, ConnectionError, TimeoutError):
            pass
        finally:
            self._connections.discard(writer)
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()
