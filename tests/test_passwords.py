"""Passwords and login lifetimes: a password change ends every session, a login ends at its max age however often
it is refreshed, and a one-time password must be changed before anything else."""

from __future__ import annotations

import asyncio
import json
import os
import sys
import uuid
from typing import Any

import aiohttp
import asyncpg
import jwt
from conftest import RunningServer
from helpers import empty_database

from pono.context import SERVICES
from pono.storage.migrate import apply_migrations
from pono.storage.users import bootstrap_admin, check_password, hash_token


async def _new_user(server: RunningServer, http: aiohttp.ClientSession, admin_token: str) -> tuple[str, str]:
    name, password = f"pw-{uuid.uuid4().hex[:6]}", "first password 1"
    async with http.post(f"{server.url}/api/users", json={"name": name, "role": "operator", "password": password},
                         headers={"Authorization": f"Bearer {admin_token}"}) as r:
        assert r.status == 201, await r.text()
    return name, password


async def _login(server: RunningServer, http: aiohttp.ClientSession, name: str, password: str) -> dict[str, Any]:
    async with http.post(f"{server.url}/api/auth/login", json={"name": name, "password": password}) as r:
        assert r.status == 200, await r.text()
        return await r.json()


async def _status(http: aiohttp.ClientSession, method: str, url: str, token: str | None = None,
                  body: Any = None) -> int:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    async with http.request(method, url, json=body, headers=headers) as r:
        return r.status


async def test_a_password_change_ends_every_session(server: RunningServer, admin_token: str) -> None:
    async with aiohttp.ClientSession() as http:
        name, password = await _new_user(server, http, admin_token)
        first, second = await _login(server, http, name, password), await _login(server, http, name, password)
        url = f"{server.url}/api/auth/password"
        change = {"current_password": password, "new_password": "second password 2"}
        assert await _status(http, "POST", url, first["access_token"],
                             {**change, "current_password": "not my password"}) == 401
        assert await _status(http, "POST", url, first["access_token"], {**change, "new_password": password}) == 422
        assert await _status(http, "POST", url, first["access_token"], {**change, "new_password": "short"}) == 422
        async with http.post(url, json=change, headers={"Authorization": f"Bearer {first['access_token']}"}) as r:
            assert r.status == 200, await r.text()
            third = await r.json()
        for old in (first, second):
            assert await _status(http, "POST", f"{server.url}/api/auth/refresh", None,
                                 {"refresh_token": old["refresh_token"]}) == 401
            assert await _status(http, "GET", f"{server.url}/api/auth/me", old["access_token"]) == 401
        assert await _status(http, "GET", f"{server.url}/api/auth/me", third["access_token"]) == 200
        assert await _status(http, "POST", f"{server.url}/api/auth/refresh", None,
                             {"refresh_token": third["refresh_token"]}) == 200
        assert await _status(http, "POST", f"{server.url}/api/auth/login", None,
                             {"name": name, "password": password}) == 401
        await _login(server, http, name, change["new_password"])


async def test_the_cli_password_reset_ends_every_session(server: RunningServer, admin_token: str,
                                                         postgres_url: str, tmp_path) -> None:
    async with aiohttp.ClientSession() as http:
        name, password = await _new_user(server, http, admin_token)
        session = await _login(server, http, name, password)
        env = {**os.environ, "DATABASE_URL": postgres_url, "PONO_DATA_DIR": str(tmp_path)}
        process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "pono", "users", "passwd", "--name", name, env=env, stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
        out, _ = await process.communicate(b"a password from the cli\n")
        assert process.returncode == 0, out
        assert await _status(http, "POST", f"{server.url}/api/auth/refresh", None,
                             {"refresh_token": session["refresh_token"]}) == 401
        assert await _status(http, "GET", f"{server.url}/api/auth/me", session["access_token"]) == 401
        await _login(server, http, name, "a password from the cli")


async def test_a_login_ends_at_its_max_age(server: RunningServer, admin_token: str) -> None:
    logins = server.app[SERVICES].auth.logins
    pool = server.app[SERVICES].storage.db.pool
    max_age = logins.max_age_s
    async with aiohttp.ClientSession() as http:
        name, password = await _new_user(server, http, admin_token)
        # Refreshed or not, a login past its max age is over.
        logins.max_age_s = 1
        try:
            session = await _login(server, http, name, password)
            assert session["expires_in"] <= 1
            await asyncio.sleep(1.5)
            assert await _status(http, "POST", f"{server.url}/api/auth/refresh", None,
                                 {"refresh_token": session["refresh_token"]}) == 401
        finally:
            logins.max_age_s = max_age
        # A refresh near the end gets tokens that end with the login, not a fresh week.
        session = await _login(server, http, name, password)
        login_at = await pool.fetchval(
            "UPDATE refresh_tokens SET login_at = now() - make_interval(secs => $2) WHERE token_hash = $1"
            " RETURNING login_at", hash_token(session["refresh_token"]), max_age - 120)
        async with http.post(f"{server.url}/api/auth/refresh", json={"refresh_token": session["refresh_token"]}) as r:
            assert r.status == 200, await r.text()
            rotated = await r.json()
        assert rotated["expires_in"] <= 120
        ends = login_at.timestamp() + max_age
        assert jwt.decode(rotated["access_token"], options={"verify_signature": False})["exp"] <= ends
        expires = await pool.fetchval("SELECT expires_at FROM refresh_tokens WHERE token_hash = $1",
                                      hash_token(rotated["refresh_token"]))
        assert expires.timestamp() <= ends + 0.001


async def test_the_first_admin_gets_a_one_time_password(postgres_url: str) -> None:
    database = await empty_database(postgres_url)
    conn = await asyncpg.connect(postgres_url, database=database)
    try:
        await apply_migrations(conn)
    finally:
        await conn.close()
    pool = await asyncpg.create_pool(postgres_url, database=database, min_size=1, max_size=2)
    try:
        name, password = await bootstrap_admin(pool)
        who = await check_password(pool, name, password)
        assert who is not None and who.role == "admin" and who.must_change_password
        assert await bootstrap_admin(pool) is None
    finally:
        await pool.close()


async def test_a_one_time_password_must_be_changed_first(server: RunningServer, admin_token: str) -> None:
    pool = server.app[SERVICES].storage.db.pool
    async with aiohttp.ClientSession() as http:
        name, password = await _new_user(server, http, admin_token)
        await pool.execute("UPDATE users SET must_change_password = true WHERE name = $1", name)
        session = await _login(server, http, name, password)
        assert session["password_change_required"] is True
        for method, path in (("GET", "/api/calls"), ("GET", "/api/auth/me"), ("GET", "/api/keys")):
            async with http.request(method, f"{server.url}{path}",
                                    headers={"Authorization": f"Bearer {session['access_token']}"}) as r:
                assert r.status == 403 and "password change required" in (await r.json())["error"], path
        ws = await http.ws_connect(f"{server.url.replace('http', 'ws')}/api/console/ws")
        await ws.send_str(json.dumps({"type": "auth", "token": session["access_token"]}))
        msg = await ws.receive(timeout=10)
        assert msg.type == aiohttp.WSMsgType.CLOSE and msg.data == 4403 and "password" in msg.extra, msg
        async with http.post(f"{server.url}/api/auth/password",
                             json={"current_password": password, "new_password": "my own password 3"},
                             headers={"Authorization": f"Bearer {session['access_token']}"}) as r:
            assert r.status == 200, await r.text()
            changed = await r.json()
        assert changed["password_change_required"] is False
        assert await _status(http, "GET", f"{server.url}/api/calls", changed["access_token"]) == 200
