"""Accounts API: log in, refresh, log out; users and API keys (admin); the audit log."""

from __future__ import annotations

import json
import uuid
from typing import Literal

import asyncpg
from aiohttp import web
from pydantic import BaseModel, Field

from pono.access import audit, authenticate, require
from pono.context import SERVICES, Services
from pono.http import ApiError, read_json_model
from pono.storage.logins import RefreshReused
from pono.storage.users import ROLES, SCOPES, check_password, create_api_key, create_user

Role = Literal["viewer", "operator", "admin"]
Scope = Literal["calls", "personas", "knowledge", "users", "keys", "audit", "metrics"]
assert set(Role.__args__) == set(ROLES) and set(Scope.__args__) == set(SCOPES)  # type: ignore[attr-defined]


class LoginIn(BaseModel):
    name: str = Field(min_length=1, max_length=100)
    password: str = Field(min_length=1, max_length=1000)


class RefreshIn(BaseModel):
    refresh_token: str = Field(min_length=1, max_length=200)


class UserIn(BaseModel):
    name: str = Field(min_length=1, max_length=100, pattern=r"^[\w.@-]+$")
    role: Role
    password: str = Field(min_length=10, max_length=1000)


class KeyIn(BaseModel):
    name: str = Field(min_length=1, max_length=100)
    role: Role
    scopes: list[Scope] = Field(default_factory=list)


def _pool(services: Services) -> asyncpg.Pool:
    assert services.storage.db is not None
    return services.storage.db.pool


def _logins(services: Services):  # type: ignore[no-untyped-def]
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
    services = request.app[SERVICES]
    body = await read_json_model(request, LoginIn)
    await _limit_logins(request, body.name)
    pool = _pool(services)
    who = await check_password(pool, body.name, body.password)
    if who is None:
        await audit(pool, body.name, "login.failed", None, request.remote)
        raise ApiError(401, "wrong name or password")
    tokens = await _logins(services).issue(who)
    await audit(pool, who.name, "login", who.user_id, request.remote)
    return web.json_response({**tokens.to_json(), "user": {"id": who.user_id, "name": who.name, "role": who.role}})


async def refresh(request: web.Request) -> web.Response:
    services = request.app[SERVICES]
    body = await read_json_model(request, RefreshIn)
    try:
        rotated = await _logins(services).rotate(body.refresh_token)
    except RefreshReused as exc:
        await audit(_pool(services), str(exc), "login.refresh_reused", str(exc), request.remote)
        raise ApiError(401, "this refresh token was already used; every session of its login is now revoked") \
            from None
    if rotated is None:
        raise ApiError(401, "invalid or expired refresh token")
    who, tokens = rotated
    return web.json_response({**tokens.to_json(), "user": {"id": who.user_id, "name": who.name, "role": who.role}})


async def logout(request: web.Request) -> web.Response:
    services = request.app[SERVICES]
    body = await read_json_model(request, RefreshIn)
    user_id = await _logins(services).revoke(body.refresh_token)
    if user_id is None:
        raise ApiError(401, "invalid refresh token")
    await audit(_pool(services), user_id, "logout", user_id, request.remote)
    return web.Response(status=204)


async def me(request: web.Request) -> web.Response:
    who = await authenticate(request)
    return web.json_response({"id": who.user_id, "name": who.name, "role": who.role, "key_id": who.key_id,
                              "scopes": list(who.scopes)})


# -- users (admin) ----------------------------------------------------------------------------
def _uuid(request: web.Request, name: str, what: str) -> uuid.UUID:
    raw = request.match_info[name]
    try:
        return uuid.UUID(raw)
    except ValueError:
        raise ApiError(404, f"no {what} {raw}") from None


async def list_users(request: web.Request) -> web.Response:
    await require(request, "admin", "users")
    rows = await _pool(request.app[SERVICES]).fetch(
        "SELECT id, name, role, created_at FROM users WHERE deleted_at IS NULL ORDER BY created_at")
    return web.json_response({"users": [{"id": str(r["id"]), "name": r["name"], "role": r["role"],
                                         "created_at": r["created_at"].isoformat()} for r in rows]})


async def add_user(request: web.Request) -> web.Response:
    who = await require(request, "admin", "users")
    body = await read_json_model(request, UserIn)
    pool = _pool(request.app[SERVICES])
    try:
        user_id = await create_user(pool, body.name, body.role, body.password)
    except asyncpg.UniqueViolationError:
        raise ApiError(409, f"a user named {body.name!r} already exists") from None
    await audit(pool, who.name, "user.create", user_id, request.remote, role=body.role)
    return web.json_response({"id": user_id, "name": body.name, "role": body.role}, status=201)


async def delete_user(request: web.Request) -> web.Response:
    who = await require(request, "admin", "users")
    user_id = _uuid(request, "user_id", "user")
    if str(user_id) == who.user_id:
        raise ApiError(409, "you cannot delete yourself")
    services = request.app[SERVICES]
    pool = _pool(services)
    async with pool.acquire() as conn, conn.transaction():
        done = await conn.fetchval("UPDATE users SET deleted_at = now() WHERE id = $1 AND deleted_at IS NULL"
                                   " RETURNING id", user_id)
        if done is None:
            raise ApiError(404, f"no user {user_id}")
        await conn.execute("UPDATE api_keys SET revoked_at = now() WHERE user_id = $1 AND revoked_at IS NULL",
                           user_id)
        await conn.execute("UPDATE refresh_tokens SET revoked_at = now() WHERE user_id = $1 AND revoked_at IS NULL",
                           user_id)
        await audit(conn, who.name, "user.delete", str(user_id), request.remote)
    services.auth.forget()
    return web.Response(status=204)


# -- API keys: everyone manages their own; an admin sees and revokes all ---------------------------
async def list_keys(request: web.Request) -> web.Response:
    who = await require(request, "viewer", "keys")
    rows = await _pool(request.app[SERVICES]).fetch(
        "SELECT k.id, k.name, k.prefix, k.role, k.scopes, k.created_at, k.last_used_at, k.revoked_at, u.name AS user"
        " FROM api_keys k JOIN users u ON u.id = k.user_id WHERE ($1::boolean OR k.user_id = $2::uuid)"
        " ORDER BY k.created_at", who.has("admin"), who.user_id)
    return web.json_response({"keys": [
        {"id": str(r["id"]), "name": r["name"], "prefix": r["prefix"], "role": r["role"], "scopes": r["scopes"],
         "user": r["user"], "created_at": r["created_at"].isoformat(),
         "last_used_at": r["last_used_at"].isoformat() if r["last_used_at"] else None,
         "revoked": r["revoked_at"] is not None} for r in rows]})


async def add_key(request: web.Request) -> web.Response:
    who = await require(request, "viewer", "keys")
    body = await read_json_model(request, KeyIn)
    if not who.has(body.role):
        raise ApiError(403, f"a {who.role} cannot make a key with the {body.role} role")
    if (who.scopes and not set(body.scopes) <= set(who.scopes)) or (who.scopes and not body.scopes):
        raise ApiError(403, "a scoped key can only make keys with scopes it has itself")
    pool = _pool(request.app[SERVICES])
    key_id, token = await create_api_key(pool, who.user_id, body.role, body.name, list(body.scopes))
    await audit(pool, who.name, "key.create", key_id, request.remote, role=body.role, scopes=body.scopes)
    return web.json_response({"id": key_id, "token": token, "name": body.name, "role": body.role,
                              "scopes": body.scopes, "note": "the token is shown once and not kept"}, status=201)


async def revoke_key(request: web.Request) -> web.Response:
    who = await require(request, "viewer", "keys")
    key_id = _uuid(request, "key_id", "API key")
    services = request.app[SERVICES]
    pool = _pool(services)
    done = await pool.fetchval(
        "UPDATE api_keys SET revoked_at = now() WHERE id = $1 AND revoked_at IS NULL"
        " AND ($2::boolean OR user_id = $3::uuid) RETURNING id", key_id, who.has("admin"), who.user_id)
    if done is None:  # someone else's key looks like one that does not exist
        raise ApiError(404, f"no API key {key_id}")
    await audit(pool, who.name, "key.revoke", str(key_id), request.remote)
    services.auth.forget()
    return web.Response(status=204)


async def list_audit(request: web.Request) -> web.Response:
    await require(request, "admin", "audit")
    raw = request.query.get("limit", "100")
    if not raw.isdigit() or not 1 <= int(raw) <= 1000:
        raise ApiError(422, "invalid query", fields=[{"field": "limit", "message": "an integer from 1 to 1000"}])
    action = request.query.get("action") or None
    rows = await _pool(request.app[SERVICES]).fetch(
        "SELECT at, actor, action, target, source_ip, details FROM audit_log"
        " WHERE ($1::text IS NULL OR action LIKE $1 || '%') ORDER BY id DESC LIMIT $2", action, int(raw))
    return web.json_response({"entries": [
        {"at": r["at"].isoformat(), "actor": r["actor"], "action": r["action"], "target": r["target"],
         "source_ip": r["source_ip"], "details": json.loads(r["details"])} for r in rows]})


def routes() -> list[web.RouteDef]:
    return [
        web.post("/api/auth/login", login),
        web.post("/api/auth/refresh", refresh),
        web.post("/api/auth/logout", logout),
        web.get("/api/auth/me", me),
        web.get("/api/users", list_users),
        web.post("/api/users", add_user),
        web.delete("/api/users/{user_id}", delete_user),
        web.get("/api/keys", list_keys),
        web.post("/api/keys", add_key),
        web.delete("/api/keys/{key_id}", revoke_key),
        web.get("/api/audit", list_audit),
    ]
