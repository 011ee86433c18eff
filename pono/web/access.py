"""Who is asking: bearer tokens (JWT logins and API keys) to principals, roles and scopes; rate limits.

Every endpoint but the call page, its call-token endpoint and the health checks calls `require`.
"""

from __future__ import annotations

from typing import Any, Literal

from aiohttp import web

from pono.auth import bearer
from pono.context import SERVICES
from pono.http import ApiError
from pono.storage.db import CONNECTION_ERRORS
from pono.storage.users import ROLES, SCOPES, Principal

# The roles and scopes as request bodies may name them (the same as storage's, checked below).
Role = Literal["viewer", "operator", "admin"]
Scope = Literal["calls", "personas", "knowledge", "users", "keys", "audit", "metrics", "workflows"]
assert set(Role.__args__) == set(ROLES) and set(Scope.__args__) == set(SCOPES)  # type: ignore[attr-defined]


async def authenticate(request: web.Request, *, changing_password: bool = False) -> Principal:
    """The caller behind the request's bearer token (a login token or an API key).

    Raises ApiError 401 (no token, or a bad one), 403 while the user's password is one-time and must be changed
    (unless `changing_password`: POST /api/auth/password) or 503 (the database is unavailable).
    """
    services = request.app[SERVICES]
    token = bearer(request)
    if not token:
        raise ApiError(401, "a token is required (Authorization: Bearer <login token or API key>)",
                       headers={"WWW-Authenticate": "Bearer"})
    try:
        principal = await services.auth.verify(token)
    except CONNECTION_ERRORS:
        raise ApiError(503, "the database is unavailable; try again shortly") from None
    if principal is None:
        raise ApiError(401, "invalid, expired or revoked token", headers={"WWW-Authenticate": "Bearer"})
    if principal.must_change_password and not changing_password:
        raise ApiError(403, "password change required: set a new one with POST /api/auth/password")
    return principal


async def require(request: web.Request, role: str, area: str) -> Principal:
    """The caller, if their token is good, their role at least `role`, and their key scoped for `area`.

    Also counts the request against the key's (or login's) per-second limit. Raises ApiError 401, 403, 429, 503.
    """
    principal = await authenticate(request)
    if not principal.has(role):
        raise ApiError(403, f"this needs the {role} role")
    if not principal.may(area):
        raise ApiError(403, f"this API key is not scoped for {area}")
    services = request.app[SERVICES]
    if services.storage.live is not None:
        allowed, retry_after = await services.storage.live.hit(
            principal.limit_key, services.settings.key_requests_per_second, 1)
        if not allowed:
            raise ApiError(429, "too many requests for this key; slow down", retry_after_s=retry_after,
                           headers={"Retry-After": str(retry_after)})
    return principal


_UNLIMITED = frozenset({"/api/health", "/api/ready", "/api/startup"})  # probes must never be refused


@web.middleware
async def rate_limit_by_ip(request: web.Request, handler: Any) -> web.StreamResponse:
    """The edge limit: requests per second per client IP, across replicas (fails open without Redis)."""
    services = request.app[SERVICES]
    if request.path not in _UNLIMITED and services.storage.live is not None:
        allowed, retry_after = await services.storage.live.hit(
            f"ip:{request.remote}", services.settings.requests_per_second, 1)
        if not allowed:
            raise ApiError(429, "too many requests from this address; slow down", retry_after_s=retry_after,
                           headers={"Retry-After": str(retry_after)})
    return await handler(request)  # type: ignore[no-any-return]
