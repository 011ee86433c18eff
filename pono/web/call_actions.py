"""Operator actions on live calls over HTTP (POST /api/calls/{call_id}/actions), and `act`, which the console's
WebSocket shares: it checks the role, audits, and sends the action to whichever replica holds the call."""

from __future__ import annotations

from typing import Any

from aiohttp import web
from pydantic import BaseModel, Field

from pono.context import SERVICES, Services
from pono.http import ApiError, read_json_model
from pono.signaling.api import MAX_SDP_CHARS
from pono.storage.audit import write_audit
from pono.storage.control import ActionError
from pono.storage.users import Principal
from pono.web.access import require

ACTIONS = ("say", "hang_up", "listen", "take_over", "hand_back")
MAX_SAY_CHARS = 1000


class ActionIn(BaseModel):
    action: str = Field(pattern="^(" + "|".join(ACTIONS) + ")$")
    text: str | None = Field(default=None, min_length=1, max_length=MAX_SAY_CHARS)
    sdp: str | None = Field(default=None, min_length=1, max_length=MAX_SDP_CHARS)


async def act(services: Services, who: Principal, call_id: str, body: ActionIn, source_ip: str | None) \
        -> dict[str, Any]:
    """Audit, then run an action wherever the call lives; what it answers (an SDP answer for listen/take_over).

    Raises ApiError: 403 without the operator role, 422, or the executing replica's status (404 no such call).
    """
    if not who.has("operator"):
        raise ApiError(403, "this needs the operator role")
    if body.action == "say" and not body.text:
        raise ApiError(422, "'say' needs some text")
    assert services.storage.db is not None and services.control is not None
    await write_audit(services.storage.db.pool, who.name, f"call.{body.action}", call_id, source_ip)
    # Who acts, so the replica holding the call can end their audio once they may no longer (see OperatorDesk.watch).
    by = {"user_id": who.user_id, "key_id": who.key_id, "generation": who.generation}
    try:
        return await services.control.send(call_id, body.action, {**body.model_dump(exclude_none=True), "by": by},
                                           who.name)
    except ActionError as exc:
        raise ApiError(exc.status, exc.message) from None


async def call_action(request: web.Request) -> web.Response:
    """POST /api/calls/{call_id}/actions {"action", "text"?, "sdp"?} (operator, calls)."""
    who = await require(request, "operator", "calls")
    body = await read_json_model(request, ActionIn)
    result = await act(request.app[SERVICES], who, request.match_info["call_id"], body, request.remote)
    return web.json_response({"call_id": request.match_info["call_id"], "action": body.action, **result})
