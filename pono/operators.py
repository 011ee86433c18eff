"""Operator actions on this replica's calls: the control bus hands each one here once it has found the call.

The HTTP route and the console's WebSocket send actions through pono.web.call_actions.act.
"""

from __future__ import annotations

from typing import Any

from pono.calls import CallManager
from pono.events import EventType
from pono.signaling.operator_media import OperatorMedia
from pono.storage.control import ActionError


class OperatorDesk:
    """Executes actions on this replica's calls. `execute` raises ActionError (404 no such call, 400, 422)."""

    def __init__(self, calls: CallManager, media: OperatorMedia) -> None:
        self.calls = calls
        self.media = media

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
            call.operator.hand_back(actor)
            await self.media.close_call(call_id, talkers_only=True)
            return {}
        if action in ("listen", "take_over"):
            sdp = args.get("sdp")
            answer = None
            if isinstance(sdp, str):
                try:
                    answer = await self.media.open(call, sdp, talk=action == "take_over")
                except (ValueError, KeyError, IndexError, TypeError, AssertionError) as exc:
                    raise ActionError(400, f"invalid SDP offer: {exc or type(exc).__name__}") from None
            elif action == "listen":
                raise ActionError(422, "'listen' needs a WebRTC offer (sdp)")
            if action == "take_over":
                await call.operator.take_over(actor)
            else:
                call.events.emit(EventType.OPERATOR, action="listen", actor=actor)
            return {"sdp": answer} if answer else {}
        raise ActionError(400, f"unknown action {action!r}")

