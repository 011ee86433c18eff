"""Real peers for the workflow tests: an SMTP server (aiosmtpd) and an HTTP target (aiohttp) that fails on
plan, keeps idempotency keys, and records what it was sent."""

from __future__ import annotations

import asyncio
import json
from email import message_from_bytes, policy
from email.message import EmailMessage
from typing import Any

from aiohttp import web
from aiosmtpd.controller import Controller

from pono.agent.embedded import free_port


class Mailbox:
    """A real SMTP server on loopback (aiosmtpd, in its own thread) that keeps every message it accepts."""

    def __init__(self) -> None:
        self.port = free_port()
        self.messages: list[EmailMessage] = []
        self.controller: Controller | None = None

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:  # aiosmtpd's handler hook
        self.messages.append(message_from_bytes(envelope.content, policy=policy.default))  # type: ignore[arg-type]
        return "250 OK"

    async def start(self) -> None:
        self.controller = Controller(self, hostname="127.0.0.1", port=self.port)
        await asyncio.to_thread(self.controller.start)

    async def stop(self) -> None:
        if self.controller is not None:
            await asyncio.to_thread(self.controller.stop)
            self.controller = None


class Target:
    """An HTTP service for webhook and http steps. POST/GET /{name}: answers the statuses planned for `name`
    (then 200 with `replies[name]`, else {"id": "T-<n>"}), records each request (method, query, headers, body).
    /once/{name} keeps idempotency keys: the first request with a key has the side effect (and may be held open
    until `release`), every later one gets the same answer."""

    def __init__(self) -> None:
        self.requests: list[dict[str, Any]] = []
        self.plans: dict[str, list[int]] = {}
        self.replies: dict[str, Any] = {}
        self.side_effects: list[str] = []
        self.answers: dict[str, Any] = {}
        self.hold_first = False
        self.held = asyncio.Event()
        self.release = asyncio.Event()
        self.port = 0
        self._runner: web.AppRunner | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def sent(self, name: str) -> list[dict[str, Any]]:
        return [r for r in self.requests if r["name"] == name]

    async def _handle(self, request: web.Request) -> web.Response:
        name = request.match_info["name"]
        raw = await request.read()
        self.requests.append({"name": name, "method": request.method, "query": request.query_string,
                              "headers": dict(request.headers), "raw": raw, "body": json.loads(raw) if raw else None})
        plan = self.plans.get(name)
        if plan:
            return web.json_response({"error": "planned failure"}, status=plan.pop(0))
        if name in self.replies:
            return web.json_response(self.replies[name])
        return web.json_response({"id": f"T-{len(self.requests)}", "ok": True})

    async def _once(self, request: web.Request) -> web.Response:
        key = request.headers.get("Idempotency-Key", "")
        self.requests.append({"name": f"once/{request.match_info['name']}", "headers": dict(request.headers),
                              "raw": await request.read(), "body": None})
        if key in self.answers:
            return web.json_response(self.answers[key])
        self.side_effects.append(key)
        self.answers[key] = {"done": key}
        if self.hold_first:
            self.held.set()
            await self.release.wait()
        return web.json_response(self.answers[key])

    async def start(self) -> None:
        app = web.Application()
        app.add_routes([web.route("*", "/once/{name}", self._once), web.route("*", "/{name}", self._handle)])
        self._runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.5)
        await self._runner.setup()
        self.port = free_port()
        await web.TCPSite(self._runner, "127.0.0.1", self.port).start()

    async def stop(self) -> None:
        self.release.set()
        if self._runner is not None:
            await self._runner.cleanup()
