"""Call tokens: what lets an anonymous caller open one call, with one persona, and hang that call up.

A token is HMAC-signed (pono.auth.TokenSigner, keyed by a secret every replica shares) and names the persona it
was minted for: the one asked with ?persona=, else the default. It opens one call on one replica, once: spending
it is a SET NX in Redis, so no other replica, nor this one after a restart, takes it again. The caller hangs up
with the same token (DELETE /api/calls/{id}); the hang-up goes over the control bus to whichever replica holds
the call.
"""

from __future__ import annotations

import logging
import time

from aiohttp import web
from redis.exceptions import RedisError

from pono.agent.personas import Persona, PersonaUnavailable, UnknownPersona
from pono.auth import bearer
from pono.http import ApiError
from pono.signaling.services import SIGNALING, SignalingServices
from pono.storage.control import ActionError

log = logging.getLogger(__name__)

CALL_TOKEN_TTL_S = 300
CALLER_HANG_UP = "caller_hang_up"  # the control-bus action a caller's DELETE becomes (pono.operators runs it)


def verify_call_token(request: web.Request, services: SignalingServices) -> dict[str, object]:
    """The claims of the request's call token: {"scope": "call", "exp": unix s, "jti", "persona": name,
    "persona_id": id or "", "issued": unix s as text}. Raises ApiError 401 when there is none or it does not
    verify (forged, expired)."""
    token = bearer(request)
    claims = services.signer.verify(token, "call") if token else None
    if claims is None or not isinstance(claims.get("persona"), str):
        raise ApiError(401, "a valid call token is required (POST /api/call-tokens)")
    return claims


async def load_persona(services: SignalingServices, ref: str | None) -> Persona:
    """The persona `ref` (an id or name; None: the default), for a token or a call. Raises ApiError 404, or 503
    when it cannot be verified (the database is unreachable and no last-known copy is kept)."""
    try:
        return await services.calls.persona(ref)
    except PersonaUnavailable:
        raise ApiError(503, f"persona {ref!r} cannot be verified while the database is unavailable; try again "
                       "shortly", retry_after_s=5) from None
    except UnknownPersona:
        raise ApiError(404, f"no persona {ref!r}") from None


async def create_call_token(request: web.Request) -> web.Response:
    """POST /api/call-tokens[?persona=<id or name>] (public): 201 {"token", "expires_in": s, "persona": name}.

    The token opens one call with that persona (the default when none is asked). 403 when the persona takes no
    calls from the public page, 404 when there is no such persona, 429 past the per-IP limit (the persona's own
    call_tokens_per_minute when lower than PONO_CALL_TOKENS_PER_MINUTE), 503 when the persona cannot be verified
    or this replica is draining.
    """
    services = request.app[SIGNALING]
    assert services.storage.live is not None
    if services.calls.draining:  # a token now could only open a call this replica will refuse
        raise ApiError(503, "this server is draining; try again", retry_after_s=5)
    ref = request.query.get("persona") or None
    if ref is not None and len(ref) > 200:
        raise ApiError(422, "invalid query", fields=[{"field": "persona", "message": "at most 200 characters"}])
    persona = await load_persona(services, ref)
    if not persona.call_tokens_enabled:
        raise ApiError(403, f"persona {persona.name!r} does not take calls from the public call page")
    limit = min(services.settings.call_tokens_per_minute, persona.call_tokens_per_minute or 1 << 30)
    allowed, retry_after = await services.storage.live.hit(f"call-token:{persona.name}:{request.remote}", limit, 60)
    if not allowed:
        raise ApiError(429, "too many call tokens requested; slow down", retry_after_s=retry_after,
                       headers={"Retry-After": str(retry_after)})
    token = services.signer.issue("call", CALL_TOKEN_TTL_S, persona=persona.name, persona_id=persona.id or "",
                                  issued=f"{time.time():.3f}")
    return web.json_response({"token": token, "expires_in": CALL_TOKEN_TTL_S, "persona": persona.name},
                             status=201)


async def token_persona(services: SignalingServices, claims: dict[str, object], asked: str | None) -> Persona:
    """The persona a call opened with this token gets: the token's own, looked up again now.

    `asked` is the offer's "persona" (an id or name) or None. Raises ApiError 403 when it names another persona or
    the persona no longer takes public calls, 404 when it is gone, 503 when it cannot be verified.
    """
    name, persona_id = str(claims["persona"]), str(claims.get("persona_id") or "")
    if asked is not None and asked not in (name, persona_id):
        raise ApiError(403, f"this call token is for persona {name!r}; fetch one with ?persona=")
    persona = await load_persona(services, persona_id or None)
    if not persona.call_tokens_enabled:
        raise ApiError(403, f"persona {persona.name!r} does not take calls from the public call page")
    return persona


async def spend_call_token(services: SignalingServices, claims: dict[str, object], call_id: str) -> None:
    """Spend the token on `call_id`, once across every replica. Raises ApiError 409 when it was spent before (or
    may have been: issued before Redis last lost its memory), 503 when Redis cannot say (a token that cannot be
    checked opens nothing)."""
    assert services.storage.live is not None
    expires = int(claims["exp"])  # type: ignore[call-overload]
    try:
        issued_at = float(str(claims.get("issued") or expires - CALL_TOKEN_TTL_S))
    except ValueError:
        issued_at = 0.0
    try:
        first = await services.storage.live.spend_call_token(str(claims["jti"]), call_id,
                                                             expires - int(time.time()) + 60, issued_at)
    except (RedisError, OSError):
        raise ApiError(503, "call tokens cannot be checked right now (Redis is unavailable); try again shortly",
                       retry_after_s=2) from None
    if not first:
        raise ApiError(409, "this call token has already opened a call; fetch a new one")


async def delete_call(request: web.Request) -> web.Response:
    """DELETE /api/calls/{call_id} with the call token that opened the call: 200 {"call_id", "state": "ended"}.

    Works on any replica: the hang-up reaches the one holding the call over the control bus. 404 for a call
    this token did not open or that is no longer live, 401 without a valid token, 503/504 when the bus fails.
    """
    services = request.app[SIGNALING]
    claims = verify_call_token(request, services)
    call_id = request.match_info["call_id"]
    assert services.storage.live is not None and services.control is not None
    try:
        opened = await services.storage.live.call_of_token(str(claims["jti"]))
    except (RedisError, OSError):
        raise ApiError(503, "the call registry (Redis) is unavailable; try again shortly", retry_after_s=2) from None
    # A call token acts on its own call only; any other id looks like one that does not exist.
    if opened != call_id:
        raise ApiError(404, f"no call {call_id}")
    try:
        if call_id in services.calls.calls:  # here: no need to wait for the registry to list it
            await services.calls.hang_up(call_id, "caller_hangup")
        else:
            await services.control.send(call_id, CALLER_HANG_UP, {}, "caller")
    except ActionError as exc:  # 404 when it ended meanwhile
        raise ApiError(exc.status, exc.message) from None
    return web.json_response({"call_id": call_id, "state": "ended"})
