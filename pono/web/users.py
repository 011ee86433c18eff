"""Users (admin): list, create with a password, delete (which revokes their keys and sessions)."""

from __future__ import annotations

import asyncpg
from aiohttp import web
from pydantic import BaseModel, Field

from pono.context import SERVICES
from pono.http import ApiError, read_json_model
from pono.storage.audit import write_audit
from pono.storage.users import create_user, delete_user, list_users
from pono.web.access import Role, require
from pono.web.params import database, path_uuid


class UserIn(BaseModel):
    name: str = Field(min_length=1, max_length=100, pattern=r"^[\w.@-]+$")
    role: Role
    password: str = Field(min_length=10, max_length=1000)


async def get_users(request: web.Request) -> web.Response:
    """GET /api/users (admin, users): {"users": [{"id", "name", "role", "created_at"}]}, oldest first."""
    await require(request, "admin", "users")
    users = await list_users(database(request))
    return web.json_response({"users": [{"id": u["id"], "name": u["name"], "role": u["role"],
                                         "created_at": u["created_at"].isoformat()} for u in users]})


async def add_user(request: web.Request) -> web.Response:
    """POST /api/users {"name", "role", "password"} (admin, users): 201 {"id", "name", "role"}; 409 on a taken name."""
    who = await require(request, "admin", "users")
    body = await read_json_model(request, UserIn)
    pool = database(request)
    try:
        user_id = await create_user(pool, body.name, body.role, body.password)
    except asyncpg.UniqueViolationError:
        raise ApiError(409, f"a user named {body.name!r} already exists") from None
    await write_audit(pool, who.name, "user.create", user_id, request.remote, role=body.role)
    return web.json_response({"id": user_id, "name": body.name, "role": body.role}, status=201)


async def remove_user(request: web.Request) -> web.Response:
    """DELETE /api/users/{user_id} (admin, users): 204; 404; 409 for oneself."""
    who = await require(request, "admin", "users")
    user_id = path_uuid(request, "user_id", "user")
    if str(user_id) == who.user_id:
        raise ApiError(409, "you cannot delete yourself")
    services = request.app[SERVICES]
    if not await delete_user(database(request), user_id, who.name, request.remote):
        raise ApiError(404, f"no user {user_id}")
    services.auth.forget()
    return web.Response(status=204)
