"""The browser call page: static HTML, JS and CSS, no build step."""

from __future__ import annotations

from pathlib import Path

from aiohttp import web

from pono.web.console import console_socket

STATIC = Path(__file__).parent / "static"


async def call_page(request: web.Request) -> web.FileResponse:
    return web.FileResponse(STATIC / "index.html", headers={"Cache-Control": "no-cache"})


async def console_page(request: web.Request) -> web.FileResponse:
    # The page itself is public (a login form); everything it shows comes over authenticated APIs.
    return web.FileResponse(STATIC / "console.html", headers={"Cache-Control": "no-cache"})


def routes() -> list[web.AbstractRouteDef]:
    return [web.get("/", call_page), web.get("/console", console_page), web.get("/api/console/ws", console_socket),
            web.static("/static", STATIC)]
