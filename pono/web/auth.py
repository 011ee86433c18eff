"""Logging in: password login, refresh-token rotation, logout, and who the caller is (/api/auth/*)."""

from __future__ import annotations

from aiohttp import web
from pydantic import BaseModel, Field

from pono.context import SERVICES, Services
from pono.http import ApiError, read_json_model
from pono.storage.audit import write_audit
from pono.storage.logins import Logins, RefreshReused
from pono.storage.users import check_password
from pono.web.access import authenticate
from pono.web.params import database


class LoginIn(BaseModel):
    name: str = Field(min_length=1, max_length=100)
    password: str = Field(min_length=1, max_length=1000)


class RefreshIn(BaseModel):
    refresh_token: str = Field(min_length=1, max_length=200)


def _logins(services: Services) -> Logins:
    if services.auth.logins is None:
        raise ApiError(503, "the server is starting; try again shortly")
    return services.auth.logins


async def _limit_logins(request: web.Request, name: str) -> None:
    """Password guessing is slowed per address and per account, whichever runs out first."""
    services = request.app[SERVICES]
    assert services.storage.live is not None
    s = services.settings
    for key, limit in ((f"login-ip:{request.remote}", s.login_ip_per_minute),
                       (f"login-name:{name.lower()}", s.logins_per_minute)):
        allowed, retry_after = await services.storage.live.hit(key, limit, 60)
        if not allowed:
            raise ApiError(429, "too many login attempts; wait and try again", retry_after_s=retry_after,
                           headers={"Retry-After": str(retry_after)})


async def login(request: web.Request) -> web.Response:
    """POST /api/auth/login {"name", "password"}: access and refresh tokens and the user; 401, 429."""
    services = request.app[SERVICES]
    body = await read_json_model(request, LoginIn)
    await _limit_logins(request, body.name)
    pool = database(request)
    who = await check_password(pool, body.name, body.password)
    if who is None:
        await write_audit(pool, body.name, "login.failed", None, request.remote)
        raise ApiError(401, "wrong name or password")
    tokens = await _logins(services).issue(who)
    await write_audit(pool, who.name, "login", who.user_id, request.remote)
    return web.json_response({**tokens.to_json(), "user": {"id": who.user_id, "name": who.name, "role": who.role}})


async def refresh(request: web.Request) -> web.Response:
    """POST /api/auth/refresh {"refresh_token"}: a new token pair; a reused refresh token revokes its login (401)."""
    services = request.app[SERVICES]
    body = await read_json_model(request, RefreshIn)
    try:
        rotated = await _logins(services).rotate(body.refresh_token)
    except RefreshReused as exc:
        await write_audit(database(request), str(exc), "login.refresh_reused", str(exc), request.remote)
        raise ApiError(401, "this refresh token was already used; every session of its login is now revoked") \
            from None
    if rotated is None:
        raise ApiError(401, "invalid or expired refresh token")
    who, tokens = rotated
    return web.json_response({**tokens.to_json(), "user": {"id": who.user_id, "name": who.name, "role": who.role}})


async def logout(request: web.Request) -> web.Response:
    """POST /api/auth/logout {"refresh_token"}: 204, the login's refresh token revoked; 401 when unknown."""
    services = request.app[SERVICES]
    body = await read_json_model(request, RefreshIn)
    user_id = await _logins(services).revoke(body.refresh_token)
    if user_id is None:
        raise ApiError(401, "invalid refresh token")
    await write_audit(database(request), user_id, "logout", user_id, request.remote)
    return web.Response(status=204)


async def me(request: web.Request) -> web.Response:
    """GET /api/auth/me (any valid token): {"id", "name", "role", "key_id", "scopes"}."""
    who = await authenticate(request)
    return web.json_response({"id": who.user_id, "name": who.name, "role": who.role, "key_id": who.key_id,
                              "scopes": list(who.scopes)})
