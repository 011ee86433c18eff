"""Logging in: password login, refresh-token rotation, logout, password change, and who the caller is
(/api/auth/*)."""

from __future__ import annotations

from aiohttp import web
from pydantic import BaseModel, Field

from pono.context import SERVICES, Services
from pono.http import ApiError, read_json_model
from pono.storage.audit import write_audit
from pono.storage.logins import Logins, RefreshReused, TokenPair
from pono.storage.users import Principal, check_password, set_password
from pono.web.access import authenticate
from pono.web.params import database


class LoginIn(BaseModel):
    name: str = Field(min_length=1, max_length=100)
    password: str = Field(min_length=1, max_length=1000)


class RefreshIn(BaseModel):
    refresh_token: str = Field(min_length=1, max_length=200)


class PasswordIn(BaseModel):
    current_password: str = Field(min_length=1, max_length=1000)
    new_password: str = Field(min_length=10, max_length=1000)


def _session(tokens: TokenPair, who: Principal) -> dict[str, object]:
    """A login's answer: the token pair, the user, and whether the password must be changed first."""
    return {**tokens.to_json(), "user": {"id": who.user_id, "name": who.name, "role": who.role},
            "password_change_required": who.must_change_password}


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
    """POST /api/auth/login {"name", "password"}: 200 {"access_token", "refresh_token", "token_type",
    "expires_in": s, "user": {"id", "name", "role"}, "password_change_required": bool}; 401, 429.

    With password_change_required (a one-time password), every call but POST /api/auth/password answers 403.
    """
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
    return web.json_response(_session(tokens, who))


async def refresh(request: web.Request) -> web.Response:
    """POST /api/auth/refresh {"refresh_token"}: a new token pair, as login answers; 401 for a reused refresh token
    (which revokes its login), an expired one, or a login past PONO_LOGIN_MAX_AGE_S."""
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
    return web.json_response(_session(tokens, who))


async def logout(request: web.Request) -> web.Response:
    """POST /api/auth/logout {"refresh_token"}: 204, the login's refresh token revoked; 401 when unknown."""
    services = request.app[SERVICES]
    body = await read_json_model(request, RefreshIn)
    user_id = await _logins(services).revoke(body.refresh_token)
    if user_id is None:
        raise ApiError(401, "invalid refresh token")
    await write_audit(database(request), user_id, "logout", user_id, request.remote)
    return web.Response(status=204)


async def change_password(request: web.Request) -> web.Response:
    """POST /api/auth/password {"current_password", "new_password"} (any login or key of the user, also while a
    one-time password must be changed): 200 with a new login, as login answers.

    Every other session of the user ends: their refresh tokens are revoked and older access tokens stop working.
    401 for a wrong current password, 422 for a new one under 10 characters or equal to the current one, 429.
    """
    services = request.app[SERVICES]
    who = await authenticate(request, changing_password=True)
    body = await read_json_model(request, PasswordIn)
    await _limit_logins(request, who.name)
    pool = database(request)
    if await check_password(pool, who.name, body.current_password) is None:
        await write_audit(pool, who.name, "password.failed", who.user_id, request.remote)
        raise ApiError(401, "the current password is wrong")
    if body.new_password == body.current_password:
        raise ApiError(422, "the new password must differ from the current one")
    changed = await set_password(pool, who.user_id, body.new_password)
    services.auth.forget()  # this replica sees the old tokens end at once; others within the verifier's cache time
    if changed is None:
        raise ApiError(401, "invalid, expired or revoked token")
    await write_audit(pool, who.name, "user.password", who.user_id, request.remote)
    return web.json_response(_session(await _logins(services).issue(changed), changed))


async def me(request: web.Request) -> web.Response:
    """GET /api/auth/me (any valid token): {"id", "name", "role", "key_id", "scopes"}."""
    who = await authenticate(request)
    return web.json_response({"id": who.user_id, "name": who.name, "role": who.role, "key_id": who.key_id,
                              "scopes": list(who.scopes)})
