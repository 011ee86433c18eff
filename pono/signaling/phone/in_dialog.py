"""The in-dialog requests that change no media session (BYE, OPTIONS, NOTIFY for our REFER, INFO DTMF), and
how an in-dialog request finds its dialog: the part of the SIP server (server.py) that needs no offer/answer.

In-dialog requests must match a dialog by Call-ID and both tags (RFC 3261 §12.2.2) and come from the dialog's
peer or the nearest proxy of its route set (else 481 / 403).
"""

from __future__ import annotations

import logging
import re
from collections.abc import Awaitable, Callable
from typing import Protocol

from pono.signaling.phone.calls import CallHost
from pono.signaling.phone.dialog import Dialog, Dialogs, Send
from pono.signaling.phone.extensions import capabilities
from pono.signaling.phone.message import SipMessage

log = logging.getLogger(__name__)


class _Reply(Protocol):
    def __call__(self, request: SipMessage, send: Send, status: int, reason: str, to_tag: str | None = None,
                 headers: list[tuple[str, str]] | None = None, body: bytes = b"") -> bytes: ...


Handler = Callable[[SipMessage, tuple[str, int], Send], Awaitable[None]]


class InDialogRequests:
    """The SIP server's (server.py) collaborator for these requests: `dialogs` and `calls` are the server's,
    `reply` is Transactions.reply, `drop(dialog)` frees a dialog whose call never started. `handlers` maps a
    method (lower case) to its handler, for the server's dispatch."""

    def __init__(self, dialogs: Dialogs, calls: CallHost, reply: _Reply,
                 drop: Callable[[Dialog], Awaitable[None]]) -> None:
        self.dialogs = dialogs
        self.calls = calls
        self._reply = reply
        self._drop = drop
        self.handlers: dict[str, Handler] = {"bye": self.bye, "options": self.options, "notify": self.notify,
                                             "info": self.info}

    def find(self, msg: SipMessage, addr: tuple[str, int], send: Send) -> Dialog | None:
        """The live dialog an in-dialog request belongs to; None after answering 481 or 403."""
        dialog = self.dialogs.matching(msg)
        if dialog is None or dialog.state == "ended":
            self._reply(msg, send, 481, "Call/Transaction Does Not Exist")
            return None
        if not dialog.trusts(addr):
            log.warning("SIP %s for call %s from %s refused: not the dialog's peer or route", msg.method,
                        dialog.call_id, addr[0])
            self._reply(msg, send, 403, "Forbidden")
            return None
        return dialog

    async def bye(self, msg: SipMessage, addr: tuple[str, int], send: Send) -> None:
        dialog = self.find(msg, addr, send)
        if dialog is None:
            return
        self._reply(msg, send, 200, "OK")
        dialog.state = "ended"
        dialog.acked.set()
        if dialog.transport is not None and dialog.begin is None:
            if (call := self.calls.calls.get(dialog.call_id)) is not None:
                call.end_reason = "caller_hangup"
            dialog.transport.ended()  # the call loop ends, and its close() frees the media
        else:  # no call was started (none, or a delayed offer's answer never came): only the media to free
            dialog.begin = None
            await self._drop(dialog)

    async def options(self, msg: SipMessage, addr: tuple[str, int], send: Send) -> None:
        self._reply(msg, send, 200, "OK", headers=capabilities())

    async def notify(self, msg: SipMessage, addr: tuple[str, int], send: Send) -> None:
        dialog = self.find(msg, addr, send)
        if dialog is None:
            return
        self._reply(msg, send, 200, "OK")
        if re.match(rb"SIP/2\.0 2\d\d", msg.body.strip()) and dialog.transport is not None:
            if (call := self.calls.calls.get(dialog.call_id)) is not None:
                call.end_reason = "transferred"
            await dialog.transport.close()  # the operator has the caller: we leave

    async def info(self, msg: SipMessage, addr: tuple[str, int], send: Send) -> None:
        dialog = self.find(msg, addr, send)
        if dialog is None:
            return
        self._reply(msg, send, 200, "OK")
        found = re.search(rb"Signal\s*=\s*([0-9*#A-D])", msg.body)
        if dialog.transport is not None and found:
            dialog.transport.receive_dtmf(found.group(1).decode())
