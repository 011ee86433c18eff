"""WebRTC signaling endpoints: call tokens, ICE servers, offer/answer, hang-up."""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Literal

from aiohttp import web
from aiortc import RTCPeerConnection, RTCSessionDescription
from pydantic import BaseModel, Field

from pono.agent.personas import UnknownPersona
from pono.auth import bearer
from pono.context import SERVICES, Services
from pono.http import ApiError, read_json_model
from pono.signaling.ice import rtc_configuration
from pono.signaling.webrtc import WebRTCTransport

log = logging.getLogger(__name__)

CALL_TOKEN_TTL_S = 300
MAX_SDP_CHARS = 64 * 1024
_NEGOTIATION_TIMEOUT_S = 10
_CONNECT_TIMEOUT_S = 30


class CallOffer(BaseModel):
    sdp: str = Field(min_length=1, max_length=MAX_SDP_CHARS)
    type: Literal["offer"]
    persona: str | None = Field(default=None, max_length=200)


def _call_token(request: web.Request, services: Services) -> dict[str, object]:
    token = bearer(request)
    claims = services.signer.verify(token, "call") if token else None
    if claims is None:
        raise ApiError(401, "a valid call token is required (POST /api/call-tokens)")
    return claims


async def create_call_token(request: web.Request) -> web.Response:
    """Public: the call page gets one per call. A persona may switch these off or allow fewer."""
    services = request.app[SERVICES]
    assert services.storage.live is not None
    ref = request.query.get("persona") or None
    if ref is not None and len(ref) > 200:
        raise ApiError(422, "invalid query", fields=[{"field": "persona", "message": "at most 200 characters"}])
    try:
        persona = await services.calls.persona(ref)
    except UnknownPersona:
        raise ApiError(404, f"no persona {ref!r}") from None
    if not persona.call_tokens_enabled:
        raise ApiError(403, f"persona {persona.name!r} does not take calls from the public call page")
    limit = min(services.settings.call_tokens_per_minute, persona.call_tokens_per_minute or 1 << 30)
    allowed, retry_after = await services.storage.live.hit(f"call-token:{persona.name}:{request.remote}", limit, 60)
    if not allowed:
        raise ApiError(429, "too many call tokens requested; slow down", retry_after_s=retry_after,
                       headers={"Retry-After": str(retry_after)})
    claims = {"persona": persona.name} if ref is not None else {}
    token = services.signer.issue("call", CALL_TOKEN_TTL_S, **claims)
    return web.json_response({"token": token, "expires_in": CALL_TOKEN_TTL_S, "persona": persona.name},
                             status=201)


async def ice_servers(request: web.Request) -> web.Response:
    services = request.app[SERVICES]
    _call_token(request, services)
    servers = [s.model_dump(exclude_none=True) for s in services.settings.ice_servers]
    return web.json_response({"iceServers": servers})


def _media_sections(sdp: str) -> set[str]:
    if not sdp.lstrip().startswith("v=0"):
        raise ApiError(400, "invalid SDP: it must start with 'v=0'")
    kinds = {line[2:].split(" ", 1)[0] for line in sdp.splitlines() if line.startswith("m=")}
    if not kinds & {"audio", "application"}:
        raise ApiError(400, "the offer has neither an audio nor a data channel (m=audio or m=application)")
    return kinds


async def create_call(request: web.Request) -> web.Response:
    services = request.app[SERVICES]
    claims = _call_token(request, services)
    offer = await read_json_model(request, CallOffer)
    kinds = _media_sections(offer.sdp)
    if not services.models.loaded.is_set() or services.calls.draining:
        raise ApiError(503, "the server is not ready for calls yet", retry_after_s=2)
    if services.calls.full:
        raise ApiError(503, "too many calls in progress", retry_after_s=5)
    # A token got for one persona opens calls with that persona only.
    bound = claims.get("persona")
    if bound is not None and offer.persona not in (None, bound):
        raise ApiError(403, f"this call token is for persona {bound!r}")
    try:
        persona = await services.calls.persona(offer.persona or bound)  # type: ignore[arg-type]
    except UnknownPersona:
        raise ApiError(404, f"no persona {offer.persona or bound!r}") from None
    if not persona.call_tokens_enabled:
        raise ApiError(403, f"persona {persona.name!r} does not take calls from the public call page")
    token_id = str(claims["jti"])
    if not services.spend_call_token(token_id, int(claims["exp"])):  # type: ignore[call-overload]
        raise ApiError(409, "this call token has already opened a call; fetch a new one")

    started = time.perf_counter()
    pc = RTCPeerConnection(rtc_configuration(services.settings.ice_servers))
    transport = WebRTCTransport(pc)
    try:
        try:
            await asyncio.wait_for(
                pc.setRemoteDescription(RTCSessionDescription(sdp=offer.sdp, type="offer")),
                _NEGOTIATION_TIMEOUT_S,
            )
        except (ValueError, KeyError, IndexError, TypeError, AssertionError) as exc:
            raise ApiError(400, f"invalid SDP offer: {exc or type(exc).__name__}") from None
        if "audio" in kinds:
            pc.addTrack(transport.out_track)  # the answer's direction then says whether it is sent
        answer = await pc.createAnswer()
        await asyncio.wait_for(pc.setLocalDescription(answer), _NEGOTIATION_TIMEOUT_S)
    except BaseException:
        await transport.close()
        raise
    call_id = services.calls.new_call_id()
    services.call_tokens[call_id] = token_id
    services.calls.start(call_id, transport, persona=persona, caller=request.remote)
    transport.expect_connection_within(_CONNECT_TIMEOUT_S)
    log.info("call %s answered in %.0f ms (%s)", call_id, 1000 * (time.perf_counter() - started),
             ",".join(sorted(kinds)))
    local = pc.localDescription
    return web.json_response({"sdp": local.sdp, "type": local.type, "call_id": call_id}, status=201)


async def delete_call(request: web.Request) -> web.Response:
    services = request.app[SERVICES]
    claims = _call_token(request, services)
    call_id = request.match_info["call_id"]
    # A call token acts on its own call only; any other id looks like one that does not exist.
    if services.call_tokens.get(call_id) != claims["jti"] or call_id not in services.calls.calls:
        raise ApiError(404, f"no call {call_id}")
    await services.calls.hang_up(call_id, "caller_hangup")
    return web.json_response({"call_id": call_id, "state": "ended"})


def routes() -> list[web.RouteDef]:
    return [
        web.post("/api/call-tokens", create_call_token),
        web.get("/api/ice-servers", ice_servers),
        web.post("/api/calls", create_call),
        web.delete("/api/calls/{call_id}", delete_call),
    ]
