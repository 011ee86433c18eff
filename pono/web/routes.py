"""The browser call page: static HTML, JS and CSS, no build step."""

from __future__ import annotations

from pathlib import Path

from aiohttp import web

STATIC = Path(__file__).parent / "static"


async def call_page(request: web.Request) -> web.FileResponse:
    return web.FileResponse(STATIC / "index.html", headers={"Cache-Control": "no-cache"})


def routes() -> list[web.AbstractRouteDef]:
    return [web.get("/", call_page), web.static("/static", STATIC)]
