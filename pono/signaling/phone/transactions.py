"""SIP transactions (RFC 3261 §17), as far as Pono needs them.

Server side: the final response to each request is remembered for 32 s by (branch, method), so that a
retransmitted request gets the same answer again. Client side: our in-dialog requests are resent on timer E
(T1 doubling to T2) over UDP until a final response with their branch comes, and given up at timer F (64·T1).
Malformed requests get an error response when they can be answered at all.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import time

from pono.signaling.phone.dialog import T1, T2, Send
from pono.signaling.phone.message import SipMessage, SipParseError, response

log = logging.getLogger(__name__)

_LIFETIME_S = 32.0  # 64·T1: how long a server transaction remembers its final response
_ECHO_LIMIT = 1024  # never echo a header longer than this in an error response


class Transactions:
    def __init__(self) -> None:
        self._finals: dict[tuple[str, str], tuple[float, bytes]] = {}  # (branch, method) → (when, response)
        self._pending: dict[str, asyncio.Future[SipMessage]] = {}  # our requests, by branch

    def retransmission(self, request: SipMessage) -> bytes | None:
        """The final response already sent to this request when it is a retransmission (never for ACK)."""
        if request.method == "ACK":
            return None
        found = self._finals.get((request.branch, request.method or ""))
        return found[1] if found is not None else None

    def reply(self, request: SipMessage, send: Send, status: int, reason: str, to_tag: str | None = None,
              headers: list[tuple[str, str]] | None = None, body: bytes = b"") -> bytes:
        """Send a response (copying Via, From, To + `to_tag`, Call-ID, CSeq, Record-Route); a final one is
        remembered for retransmissions. Returns the bytes sent."""
        out = response(request, status, reason, to_tag, headers, body).to_bytes()
        send(out)
        if status >= 200:
            now = time.monotonic()
            self._finals[(request.branch, request.method or "")] = (now, out)
            if len(self._finals) > 2000:
                self._finals = {k: v for k, v in self._finals.items() if now - v[0] < _LIFETIME_S}
        return out

    def answered(self, message: SipMessage) -> None:
        """A response arrived: it completes our request with the same branch when it is final."""
        future = self._pending.get(message.branch)
        if future is not None and not future.done() and (message.status or 0) >= 200:
            future.set_result(message)

    async def request(self, send: Send, data: bytes, branch: str, what: str) -> SipMessage | None:
        """Send our request `data` (whose Via carries `branch`) until its final response; None on timer F."""
        future: asyncio.Future[SipMessage] = asyncio.get_running_loop().create_future()
        self._pending[branch] = future
        interval, deadline = T1, time.monotonic() + 64 * T1
        try:
            while time.monotonic() < deadline:
                send(data)
                with contextlib.suppress(TimeoutError):
                    return await asyncio.wait_for(asyncio.shield(future), interval)
                interval = min(interval * 2, T2)
            log.warning("SIP %s got no answer", what)
            return None
        finally:
            self._pending.pop(branch, None)


def bad_request(data: bytes, exc: SipParseError, addr: tuple[str, int], send: Send) -> None:
    """Answer a message parse() refused with exc.status (400, 413, 513) when it names the headers a response
    needs, each short enough to echo; otherwise drop it with a log line."""
    text = data[:4096].decode("utf-8", "replace")
    needed = {h: re.search(rf"^{h}\s*:\s*(.+?)\r?$", text, re.IGNORECASE | re.MULTILINE)
              for h in ("via", "from", "to", "call-id", "cseq")}
    answerable = all(m and len(m.group(1)) <= _ECHO_LIMIT for m in needed.values())
    if text.split(" ", 1)[0].isupper() and "SIP/2.0" in text.split("\n", 1)[0] and answerable:
        request = SipMessage(method="X", uri="x", headers=[(h, m.group(1)) for h, m in needed.items() if m])
        reason = {413: "Request Entity Too Large", 513: "Message Too Large"}.get(exc.status, "Bad Request")
        send(response(request, exc.status, f"{reason} ({exc})"[:120]).to_bytes())
        log.info("SIP %s to %s: %s", exc.status, addr[0], exc)
    else:
        log.warning("SIP message from %s dropped: %s", addr[0], exc)
