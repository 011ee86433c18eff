"""Operator actions on live calls: run here when the call is ours, routed by the control bus when not.

`act` is the one entry point for the REST API and the console's WebSocket: it checks the role, audits,
and sends the action to wherever the call lives.
"""

from __future__ import annotations

from typing import Any

from aiohttp import web
from pydantic import BaseModel, Field

from pono.access import audit, require
from pono.calls import CallManager
from pono.context import SERVICES, Services
from pono.events import EventType
from pono.http import ApiError, read_json_model
from pono.signaling.operator_media import OperatorMedia
from pono.storage.control import ActionError
from pono.storage.users import Principal

ACTIONS = ("say", "hang_up", "listen", "take_over", "hand_back")
MAX_SAY_CHARS = 1000
MAX_SDP_CHARS = 64 * 1024


class ActionIn(BaseModel):
    action: str = Field(pattern="^(" + "|".join(ACTIONS) + ")$")
    text: str | None = Field(default=None, min_length=1, max_length=MAX_SAY_CHARS)
    sdp: str | None = Field(default=None, min_length=1, max_length=MAX_SDP_CHARS)


class OperatorDesk:
    """Executes actions on this replica's calls."""

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
            call._spawn(call.say(text.strip(), actor), "operator-say")
            return {}
        if action == "hang_up":
            call.events.emit(EventType.OPERATOR, action="hang_up", actor=actor)
            await self.calls.hang_up(call_id, "operator_hangup")
            return {}
        if action == "hand_back":
            call.hand_back(actor)
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
                await call.take_over(actor)
            else:
                call.events.emit(EventType.OPERATOR, action="listen", actor=actor)
            return {"sdp": answer} if answer else {}
        raise ActionError(400, f"unknown action {action!r}")


async def act(services: Services, who: Principal, call_id: str, body: ActionIn, source_ip: str | None) \
        -> dict[str, Any]:
    """Audit, then run an action wherever the call lives. Raises ApiError."""
    if not who.has("operator"):
        raise ApiError(403, "this needs the operator role")
    if body.action == "say" and not body.text:
        raise ApiError(422, "'say' needs some text")
    assert services.storage.db is not None and services.control is not None
    await audit(services.storage.db.pool, who.name, f"call.{body.action}", call_id, source_ip)
    try:
        return await services.control.send(call_id, body.action, body.model_dump(exclude_none=True), who.name)
    except ActionError as exc:
        raise ApiError(exc.status, exc.message) from None


async def call_action(request: web.Request) -> web.Response:
    who = await require(request, "operator", "calls")
    body = await read_json_model(request, ActionIn)
    result = await act(request.app[SERVICES], who, request.match_info["call_id"], body, request.remote)
    return web.json_response({"call_id": request.match_info["call_id"], "action": body.action, **result})


def routes() -> list[web.RouteDef]:
    return [web.post("/api/calls/{call_id}/actions", call_action)]
