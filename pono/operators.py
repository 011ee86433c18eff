"""Operator actions on this replica's calls: the control bus hands each one here once it has found the call.

The HTTP route and the console's WebSocket send actions through pono.web.call_actions.act. An operator's audio
(listen, take over) and a take-over last only while the operator may still act: `watch` checks them again.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

from pono.calls import CallManager
from pono.events import EventType
from pono.signaling.operator_media import OperatorMedia
from pono.storage.control import ActionError
from pono.storage.db import CONNECTION_ERRORS

log = logging.getLogger(__name__)

# Whether an operator who acted ({"user_id", "key_id", "generation"}, as act() sends it) may still: see
# pono.storage.users.may_still_act.
StillAllowed = Callable[[dict[str, Any]], Awaitable[bool]]


class OperatorDesk:
    """Executes actions on this replica's calls. `execute` raises ActionError (404 no such call, 400, 422)."""

    def __init__(self, calls: CallManager, media: OperatorMedia) -> None:
        self.calls = calls
        self.media = media
        self._takeovers: dict[str, dict[str, Any]] = {}  # call id → who took it over

    async def watch(self, still_allowed: StillAllowed, interval_s: Callable[[], float]) -> None:
        """Every `interval_s()` seconds, end the audio and take-overs of operators who may no longer act (revoked
        key, deleted or demoted user, changed password): their connection closes and the agent has the call again.
        While Postgres is unreachable nothing is ended."""
        checked = time.monotonic()
        while True:
            await asyncio.sleep(min(1.0, max(0.05, interval_s())))
            if time.monotonic() - checked < interval_s():
                continue
            checked = time.monotonic()
            for gone in [c for c in self._takeovers if c not in self.calls.calls]:
                del self._takeovers[gone]
            owners = [(call_id, pc, owner) for call_id, pc, _, owner in self.media.owned() if isinstance(owner, dict)]
            owners += [(call_id, None, owner) for call_id, owner in self._takeovers.items()]
            verdicts: dict[str, bool] = {}
            for call_id, pc, owner in owners:
                key = repr(sorted(owner.items()))
                try:
                    if key not in verdicts:
                        verdicts[key] = await still_allowed(owner)
                except CONNECTION_ERRORS:
                    continue
                except Exception:
                    log.exception("could not check operator %s", owner.get("key_id") or owner.get("user_id"))
                    continue
                if verdicts[key]:
                    continue
                log.info("operator %s may no longer act: their audio and take-over of call %s end",
                         owner.get("key_id") or owner.get("user_id"), call_id)
                if pc is not None:
                    await pc.close()  # the state change handler removes the tap
                elif self._takeovers.pop(call_id, None) is not None and call_id in self.calls.calls:
                    self.calls.calls[call_id].operator.hand_back("pono")
                    await self.media.close_call(call_id, talkers_only=True)

    async def execute(self, call_id: str, action: str, args: dict[str, Any], actor: str) -> dict[str, Any]:
        call = self.calls.calls.get(call_id)
        if call is None:
            raise ActionError(404, f"no live call {call_id}")
        if action == "say":
            text = args.get("text")
            if not isinstance(text, str) or not text.strip():
                raise ActionError(422, "'say' needs some text")
            call.operator.say(text.strip(), actor)
            return {}
        if action == "hang_up":
            call.events.emit(EventType.OPERATOR, action="hang_up", actor=actor)
            await self.calls.hang_up(call_id, "operator_hangup")
            return {}
        if action == "caller_hang_up":  # the caller's own DELETE /api/calls/{id}, routed from another replica
            await self.calls.hang_up(call_id, "caller_hangup")
            return {}
        if action == "hand_back":
            self._takeovers.pop(call_id, None)
            call.operator.hand_back(actor)
            await self.media.close_call(call_id, talkers_only=True)
            return {}
        if action in ("listen", "take_over"):
            sdp = args.get("sdp")
            answer = None
            if isinstance(sdp, str):
                try:
                    answer = await self.media.open(call, sdp, talk=action == "take_over", owner=args.get("by"))
                except (ValueError, KeyError, IndexError, TypeError, AssertionError) as exc:
                    raise ActionError(400, f"invalid SDP offer: {exc or type(exc).__name__}") from None
            elif action == "listen":
                raise ActionError(422, "'listen' needs a WebRTC offer (sdp)")
            if action == "take_over":
                if isinstance(args.get("by"), dict):
                    self._takeovers[call_id] = args["by"]
                await call.operator.take_over(actor)
            else:
                call.events.emit(EventType.OPERATOR, action="listen", actor=actor)
            return {"sdp": answer} if answer else {}
        raise ActionError(400, f"unknown action {action!r}")

