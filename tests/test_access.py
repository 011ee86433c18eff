"""Who may do what: the permission matrix from one table, logins, keys, rate limits, the audit log."""

from __future__ import annotations

import asyncio
import base64
import json
import uuid
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import jwt
import pytest
from conftest import RunningServer
from helpers import settings_for_new_calls

from pono.context import SERVICES
from pono.storage.users import create_api_key, create_user

MISSING = str(uuid.uuid4())

# (method, path, JSON body or None, least role, area). Whoever passes gets anything but 401/403
# (200, 201, 204, 404 for ids that do not exist, 422 for the deliberately empty bodies).
PROTECTED: list[tuple[str, str, Any, str, str]] = [
    ("GET", "/api/calls", None, "viewer", "calls"),
    ("GET", "/api/calls?state=live", None, "viewer", "calls"),
    ("GET", f"/api/calls/{MISSING}", None, "viewer", "calls"),
    ("GET", f"/api/calls/{MISSING}/recording", None, "viewer", "calls"),
    ("GET", f"/api/calls/{MISSING}/recording/peaks", None, "viewer", "calls"),
    ("GET", "/api/dashboard", None, "viewer", "calls"),
    ("GET", "/api/reports", None, "viewer", "calls"),
    ("GET", "/api/reports/2001-01-01", None, "viewer", "calls"),  # no report that day: a 404 is still allowed
    ("POST", f"/api/calls/{MISSING}/actions", {"action": "hang_up"}, "operator", "calls"),
    ("GET", "/api/personas", None, "viewer", "personas"),
    ("GET", f"/api/personas/{MISSING}", None, "viewer", "personas"),
    ("POST", "/api/personas", {}, "admin", "personas"),
    ("PUT", f"/api/personas/{MISSING}", {}, "admin", "personas"),
    ("DELETE", f"/api/personas/{MISSING}", None, "admin", "personas"),
    ("POST", "/api/knowledge/matrix/documents?source=a.txt", {}, "admin", "knowledge"),
    ("GET", "/api/knowledge/matrix/search?q=hours", None, "viewer", "knowledge"),
    ("GET", "/api/users", None, "admin", "users"),
    ("POST", "/api/users", {}, "admin", "users"),
    ("DELETE", f"/api/users/{MISSING}", None, "admin", "users"),
    ("GET", "/api/keys", None, "viewer", "keys"),
    ("POST", "/api/keys", {}, "viewer", "keys"),
    ("DELETE", f"/api/keys/{MISSING}", None, "viewer", "keys"),
    ("GET", "/api/audit", None, "admin", "audit"),
    ("GET", "/metrics", None, "viewer", "metrics"),
    ("GET", "/api/auth/me", None, "viewer", "any"),
    ("POST", "/api/auth/password", {}, "viewer", "any"),
    ("GET", "/api/phone-numbers", None, "viewer", "personas"),
    ("PUT", "/api/phone-numbers/+15550100", {}, "admin", "personas"),
    ("DELETE", "/api/phone-numbers/+15550199", None, "admin", "personas"),
    ("POST", "/api/admin/drain", {}, "admin", "calls"),  # {} is a 422: the shared test server never drains
    ("GET", "/api/workflows", None, "viewer", "workflows"),
    ("POST", "/api/workflows", {}, "admin", "workflows"),
    ("GET", f"/api/workflows/{MISSING}", None, "viewer", "workflows"),
    ("PUT", f"/api/workflows/{MISSING}", {}, "admin", "workflows"),
    ("DELETE", f"/api/workflows/{MISSING}", None, "admin", "workflows"),
    ("GET", f"/api/workflows/{MISSING}/runs", None, "viewer", "workflows"),
    ("POST", f"/api/workflows/{MISSING}/runs", {}, "operator", "workflows"),
    ("POST", f"/api/workflows/{MISSING}/runs/{MISSING}/retry", None, "operator", "workflows"),
    ("GET", "/api/workflow-runs", None, "viewer", "workflows"),
    ("POST", f"/api/workflow-runs/{MISSING}/cancel", None, "operator", "workflows"),
]
# Open to anyone, or guarded by something other than a login (call tokens, refresh tokens, the WS handshake).
PUBLIC = {("GET", "/"), ("GET", "/console"), ("GET", "/api/health"), ("GET", "/api/ready"), ("GET", "/api/startup"),
          ("POST", "/api/call-tokens"), ("POST", "/api/auth/login"), ("POST", "/api/auth/refresh"),
          ("POST", "/api/auth/logout"), ("GET", "/static")}
CALL_TOKEN_ONLY = {("GET", "/api/ice-servers"), ("POST", "/api/calls"), ("DELETE", "/api/calls/{call_id}")}
# Covered in tests/test_console.py and tests/test_twilio.py (the provider's own token, not a login).
WEBSOCKETS = {("GET", "/api/console/ws"), ("GET", "/api/phone/twilio")}
ROLES = ("viewer", "operator", "admin")


@pytest.fixture(scope="module")
async def principals(server: RunningServer, admin_token: str) -> dict[str, str]:
    pool = server.app[SERVICES].storage.db.pool
    tokens = {"admin": admin_token}
    for role in ("viewer", "operator"):
        user = await create_user(pool, f"{role}-{uuid.uuid4().hex[:6]}", role)
        tokens[role] = (await create_api_key(pool, user, role, "matrix"))[1]
    # An admin key scoped to the knowledge base only.
    user = await create_user(pool, f"scoped-{uuid.uuid4().hex[:6]}", "admin")
    tokens["knowledge-only admin"] = (await create_api_key(pool, user, "admin", "scoped", ["knowledge"]))[1]
    async with aiohttp.ClientSession() as http, http.post(f"{server.url}/api/call-tokens") as r:
        tokens["call token"] = (await r.json())["token"]
    return tokens


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


def _canonical(path: str) -> str:
    return path.split("?")[0]


def test_the_matrix_covers_every_route(server: RunningServer) -> None:
    routes = {(r.method, r.resource.canonical) for r in server.app.router.routes() if r.method != "HEAD"}
    covered = PUBLIC | CALL_TOKEN_ONLY | WEBSOCKETS
    for method, path, *_ in PROTECTED:
        matches = {(m, canon) for m, canon in routes if m == method and _matches(canon, _canonical(path))}
        assert matches, f"{method} {path} is not a route"
        covered |= matches
    assert routes - covered == set(), "routes missing from the permission matrix"


def _matches(canonical: str, path: str) -> bool:
    a, b = canonical.strip("/").split("/"), path.strip("/").split("/")
    return len(a) == len(b) and all(x == y or x.startswith("{") for x, y in zip(a, b, strict=True))


async def test_permission_matrix(server: RunningServer, principals: dict[str, str],
                                 http: aiohttp.ClientSession) -> None:
    failures = []
    for method, path, body, least, area in PROTECTED:
        for who in ("anonymous", "call token", *ROLES, "knowledge-only admin"):
            headers = {} if who == "anonymous" else {"Authorization": f"Bearer {principals[who]}"}
            async with http.request(method, server.url + path, json=body, headers=headers) as r:
                status = r.status
                payload = await r.read()
            if who in ("anonymous", "call token"):
                expected = "401"
            elif who == "knowledge-only admin":
                expected = "ok" if area in ("knowledge", "any") else "403"
            else:
                expected = "ok" if ROLES.index(who) >= ROLES.index(least) else "403"
            got = str(status) if status in (401, 403) else "ok"
            if got != expected:
                failures.append(f"{method} {path} as {who}: {status} (expected {expected}) {payload[:120]!r}")
            if status >= 400:
                assert r.content_type == "application/json", f"{method} {path}: errors are JSON"
    assert not failures, "\n".join(failures)


async def test_public_endpoints_need_no_token(server: RunningServer, http: aiohttp.ClientSession) -> None:
    for path in ("/", "/console", "/api/health", "/api/startup"):
        async with http.get(server.url + path) as r:
            assert r.status == 200, path
            assert r.headers["X-Frame-Options"] == "DENY"
            assert r.headers["X-Content-Type-Options"] == "nosniff"
            assert "default-src 'self'" in r.headers["Content-Security-Policy"]
            assert r.headers["Referrer-Policy"] == "no-referrer"
    async with http.get(server.url + "/api/health", headers={"X-Forwarded-Proto": "https"}) as r:
        assert "max-age" in r.headers["Strict-Transport-Security"]


async def _new_user(server: RunningServer, admin_token: str, http: aiohttp.ClientSession, role: str) \
        -> tuple[str, str]:
    name, password = f"{role}-{uuid.uuid4().hex[:6]}", "correct horse battery"
    async with http.post(f"{server.url}/api/users", json={"name": name, "role": role, "password": password},
                         headers={"Authorization": f"Bearer {admin_token}"}) as r:
        assert r.status == 201, await r.text()
    return name, password


async def test_login_refresh_rotation_and_logout(server: RunningServer, admin_token: str,
                                                 http: aiohttp.ClientSession) -> None:
    name, password = await _new_user(server, admin_token, http, "operator")
    async with http.post(f"{server.url}/api/auth/login", json={"name": name, "password": "wrong password!"}) as r:
        assert r.status == 401
    async with http.post(f"{server.url}/api/auth/login", json={"name": name, "password": password}) as r:
        assert r.status == 200
        first = await r.json()
    assert first["expires_in"] == 3600 and first["user"]["role"] == "operator"
    claims = jwt.decode(first["access_token"], options={"verify_signature": False})
    assert claims["exp"] - claims["iat"] == 3600
    auth = {"Authorization": f"Bearer {first['access_token']}"}
    async with http.get(f"{server.url}/api/auth/me", headers=auth) as r:
        assert (await r.json())["name"] == name
    async with http.get(f"{server.url}/api/calls", headers=auth) as r:
        assert r.status == 200
    async with http.get(f"{server.url}/api/users", headers=auth) as r:
        assert r.status == 403  # an operator is not an admin

    # Tampered: the role claim raised to admin, the signature left as it was.
    head, body, sig = first["access_token"].split(".")
    forged = json.loads(base64.urlsafe_b64decode(body + "=" * (-len(body) % 4)))
    forged["role"] = "admin"
    forged_body = base64.urlsafe_b64encode(json.dumps(forged).encode()).rstrip(b"=").decode()
    forged_token = f"{head}.{forged_body}.{sig}"
    async with http.get(f"{server.url}/api/users", headers={"Authorization": f"Bearer {forged_token}"}) as r:
        assert r.status == 401
    # Expired: properly signed (with the server's key, read from its database) but past its time.
    pool = server.app[SERVICES].storage.db.pool
    secret = await pool.fetchval("SELECT value FROM server_secrets WHERE name = 'jwt'")
    expired = jwt.encode({**claims, "exp": claims["iat"] - 10}, secret.encode(), algorithm="HS256")
    async with http.get(f"{server.url}/api/auth/me", headers={"Authorization": f"Bearer {expired}"}) as r:
        assert r.status == 401

    # Refresh rotates: the new pair works, the old refresh token is spent.
    async with http.post(f"{server.url}/api/auth/refresh", json={"refresh_token": first["refresh_token"]}) as r:
        assert r.status == 200
        second = await r.json()
    assert second["refresh_token"] != first["refresh_token"]
    # Reuse of the spent token means theft: refused, and the whole login (the new token too) is revoked.
    async with http.post(f"{server.url}/api/auth/refresh", json={"refresh_token": first["refresh_token"]}) as r:
        assert r.status == 401
    async with http.post(f"{server.url}/api/auth/refresh", json={"refresh_token": second["refresh_token"]}) as r:
        assert r.status == 401
    stored = await pool.fetchval("SELECT count(*) FROM refresh_tokens WHERE token_hash = $1",
                                 second["refresh_token"])
    assert stored == 0, "refresh tokens are stored hashed"

    # Log out: that login's refresh token stops working.
    async with http.post(f"{server.url}/api/auth/login", json={"name": name, "password": password}) as r:
        third = await r.json()
    async with http.post(f"{server.url}/api/auth/logout", json={"refresh_token": third["refresh_token"]}) as r:
        assert r.status == 204
    async with http.post(f"{server.url}/api/auth/refresh", json={"refresh_token": third["refresh_token"]}) as r:
        assert r.status == 401

    async with http.get(f"{server.url}/api/audit?action=login",
                        headers={"Authorization": f"Bearer {admin_token}"}) as r:
        entries = [e for e in (await r.json())["entries"] if e["actor"] in (name,) or e["target"]]
    actions = {e["action"] for e in entries if e["actor"] == name}
    assert {"login", "login.failed"} <= actions
    assert all(e["source_ip"] == "127.0.0.1" for e in entries if e["actor"] == name)


async def test_login_bad_input(server: RunningServer, http: aiohttp.ClientSession) -> None:
    url = f"{server.url}/api/auth/login"
    async with http.post(url, data="name=a&password=b", headers={"Content-Type": "text/plain"}) as r:
        assert r.status == 415 and "error" in await r.json()
    async with http.post(url, data="{not json", headers={"Content-Type": "application/json"}) as r:
        assert r.status == 400
    async with http.post(url, json={"name": "x"}) as r:
        assert r.status == 422
    async with http.post(url, data=b"{" + b" " * (1 << 20) + b"}", headers={"Content-Type": "application/json"}) as r:
        assert r.status == 413 and "error" in await r.json()


async def test_login_brute_force_is_rate_limited(server: RunningServer, admin_token: str,
                                                 http: aiohttp.ClientSession) -> None:
    name, password = await _new_user(server, admin_token, http, "viewer")
    with settings_for_new_calls(server, logins_per_minute=5):
        statuses = []
        for _ in range(8):
            async with http.post(f"{server.url}/api/auth/login", json={"name": name, "password": "guess-guess"}) as r:
                statuses.append(r.status)
                if r.status == 429:
                    retry_after = int(r.headers["Retry-After"])
        assert statuses[:5] == [401] * 5 and set(statuses[5:]) == {429}
        assert 1 <= retry_after <= 60
        # The right password does not get through either, until the window passes.
        async with http.post(f"{server.url}/api/auth/login", json={"name": name, "password": password}) as r:
            assert r.status == 429


async def test_per_ip_and_per_key_limits(server: RunningServer, principals: dict[str, str],
                                         http: aiohttp.ClientSession) -> None:
    async def one(path: str) -> tuple[int, str | None]:
        async with http.get(server.url + path, headers={"Authorization": f"Bearer {principals['viewer']}"}) as r:
            return r.status, r.headers.get("Retry-After")

    with settings_for_new_calls(server, requests_per_second=20):
        results = await asyncio.gather(*(one("/api/personas") for _ in range(60)))
        assert any(status == 429 and retry for status, retry in results)
        assert sum(status == 200 for status, _ in results) <= 40  # at most two 1 s windows' worth
        health = await asyncio.gather(*(one("/api/health") for _ in range(60)))
        assert all(status == 200 for status, _ in health), "health checks are never limited"
    await asyncio.sleep(1.1)
    with settings_for_new_calls(server, key_requests_per_second=5):
        results = await asyncio.gather(*(one("/api/personas") for _ in range(30)))
        assert any(status == 429 for status, _ in results)


async def test_api_keys_scoped_shown_once_and_revocable(server: RunningServer, principals: dict[str, str],
                                                        admin_token: str, http: aiohttp.ClientSession) -> None:
    operator = {"Authorization": f"Bearer {principals['operator']}"}
    async with http.post(f"{server.url}/api/keys", json={"name": "too much", "role": "admin"}, headers=operator) as r:
        assert r.status == 403  # no key above one's own role
    async with http.post(f"{server.url}/api/keys", json={"name": "ci", "role": "viewer", "scopes": ["calls"]},
                         headers=operator) as r:
        assert r.status == 201
        made = await r.json()
    async with http.post(f"{server.url}/api/keys", json={"name": "x", "role": "viewer", "scopes": ["root"]},
                         headers=operator) as r:
        assert r.status == 422
    key = {"Authorization": f"Bearer {made['token']}"}
    async with http.get(f"{server.url}/api/calls", headers=key) as r:
        assert r.status == 200
    async with http.get(f"{server.url}/api/personas", headers=key) as r:
        assert r.status == 403  # scoped to calls
    async with http.get(f"{server.url}/api/keys", headers=operator) as r:
        listed = {k["id"]: k for k in (await r.json())["keys"]}
    assert made["id"] in listed and "token" not in listed[made["id"]]
    assert listed[made["id"]]["prefix"] == made["token"][:12] and listed[made["id"]]["last_used_at"]
    # Someone else's key looks like one that does not exist.
    async with http.delete(f"{server.url}/api/keys/{made['id']}",
                           headers={"Authorization": f"Bearer {principals['viewer']}"}) as r:
        assert r.status == 404
    async with http.delete(f"{server.url}/api/keys/{made['id']}", headers=operator) as r:
        assert r.status == 204
    async with http.get(f"{server.url}/api/calls", headers=key) as r:
        assert r.status == 401
    async with http.get(f"{server.url}/api/audit?action=key", headers={"Authorization": f"Bearer {admin_token}"}) as r:
        actions = {(e["action"], e["target"]) for e in (await r.json())["entries"]}
    assert {("key.create", made["id"]), ("key.revoke", made["id"])} <= actions


async def test_call_tokens_per_persona(server: RunningServer, admin_token: str, http: aiohttp.ClientSession) -> None:
    admin = {"Authorization": f"Bearer {admin_token}"}
    closed, limited = f"internal-{uuid.uuid4().hex[:6]}", f"limited-{uuid.uuid4().hex[:6]}"
    for name, extra in ((closed, {"call_tokens_enabled": False}), (limited, {"call_tokens_per_minute": 2})):
        async with http.post(f"{server.url}/api/personas", headers=admin,
                             json={"name": name, "system_prompt": "Be brief.", **extra}) as r:
            assert r.status == 201, await r.text()
    async with http.post(f"{server.url}/api/call-tokens?persona={closed}") as r:
        assert r.status == 403
    async with http.post(f"{server.url}/api/call-tokens?persona=nobody-{uuid.uuid4().hex[:4]}") as r:
        assert r.status == 404
    statuses = []
    for _ in range(3):
        async with http.post(f"{server.url}/api/call-tokens?persona={limited}") as r:
            statuses.append(r.status)
            body = await r.json()
    assert statuses == [201, 201, 429] and "Retry-After" in r.headers
    # A default-persona token cannot open a call with the closed persona either.
    async with http.post(f"{server.url}/api/call-tokens") as r:
        token = (await r.json())["token"]
    offer = {"type": "offer", "sdp": "v=0\r\nm=audio 9 UDP/TLS/RTP/SAVPF 111\r\n", "persona": closed}
    async with http.post(f"{server.url}/api/calls", json=offer, headers={"Authorization": f"Bearer {token}"}) as r:
        assert r.status == 403, await r.text()
    assert body["error"]
