"""API keys: everyone lists, makes and revokes their own; an admin sees and revokes all."""

from __future__ import annotations

from aiohttp import web
from pydantic import BaseModel, Field

from pono.context import SERVICES
from pono.http import ApiError, read_json_model
from pono.storage.audit import write_audit
from pono.storage.users import create_api_key, list_keys, revoke_key
from pono.web.access import Role, Scope, require
from pono.web.params import database, iso, path_uuid


class KeyIn(BaseModel):
    name: str = Field(min_length=1, max_length=100)
    role: Role
    scopes: list[Scope] = Field(default_factory=list)


async def get_keys(request: web.Request) -> web.Response:
    """GET /api/keys (viewer, keys): the caller's keys, every key for an admin; never the tokens."""
    who = await require(request, "viewer", "keys")
    keys = await list_keys(database(request), who.user_id, everyone=who.has("admin"))
    return web.json_response({"keys": [
        {"id": k["id"], "name": k["name"], "prefix": k["prefix"], "role": k["role"], "scopes": k["scopes"],
         "user": k["user"], "created_at": k["created_at"].isoformat(), "last_used_at": iso(k["last_used_at"]),
         "revoked": k["revoked_at"] is not None} for k in keys]})


async def add_key(request: web.Request) -> web.Response:
    """POST /api/keys {"name", "role", "scopes"} (viewer, keys): 201 with the token, shown this once.

    A key cannot have a higher role than its maker, nor (from a scoped key) scopes its maker lacks: 403.
    """
    who = await require(request, "viewer", "keys")
    body = await read_json_model(request, KeyIn)
    if not who.has(body.role):
        raise ApiError(403, f"a {who.role} cannot make a key with the {body.role} role")
    if (who.scopes and not set(body.scopes) <= set(who.scopes)) or (who.scopes and not body.scopes):
        raise ApiError(403, "a scoped key can only make keys with scopes it has itself")
    pool = database(request)
    key_id, token = await create_api_key(pool, who.user_id, body.role, body.name, list(body.scopes))
    await write_audit(pool, who.name, "key.create", key_id, request.remote, role=body.role, scopes=body.scopes)
    return web.json_response({"id": key_id, "token": token, "name": body.name, "role": body.role,
                              "scopes": body.scopes, "note": "the token is shown once and not kept"}, status=201)


async def remove_key(request: web.Request) -> web.Response:
    """DELETE /api/keys/{key_id} (viewer, keys): 204; someone else's key (unless admin) is a 404 like a missing one."""
    who = await require(request, "viewer", "keys")
    key_id = path_uuid(request, "key_id", "API key")
    services = request.app[SERVICES]
    pool = database(request)
    if not await revoke_key(pool, key_id, who.user_id, any_owner=who.has("admin")):
        raise ApiError(404, f"no API key {key_id}")
    await write_audit(pool, who.name, "key.revoke", str(key_id), request.remote)
    services.auth.forget()
    return web.Response(status=204)
