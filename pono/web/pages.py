"""The static pages: the browser call page and the operator console, their JS and CSS; no build step."""

from __future__ import annotations

from pathlib import Path

from aiohttp import web

STATIC = Path(__file__).parent / "static"


async def call_page(request: web.Request) -> web.FileResponse:
    """GET /: the call page (public)."""
    return web.FileResponse(STATIC / "index.html", headers={"Cache-Control": "no-cache"})


async def console_page(request: web.Request) -> web.FileResponse:
    """GET /console: the operator console (public)."""
    # The page itself is public (a login form); everything it shows comes over authenticated APIs.
    return web.FileResponse(STATIC / "console.html", headers={"Cache-Control": "no-cache"})
