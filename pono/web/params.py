"""What handlers read off a request: the database pool, ids in the path, and paging parameters."""

from __future__ import annotations

import base64
import json
import uuid
from datetime import datetime
from typing import Any

import asyncpg
from aiohttp import web

from pono.context import SERVICES
from pono.http import ApiError


def database(request: web.Request) -> asyncpg.Pool:
    """The Postgres pool (storage has started before any request is served)."""
    db = request.app[SERVICES].storage.db
    assert db is not None
    return db.pool


def path_uuid(request: web.Request, name: str, what: str) -> uuid.UUID:
    """The path parameter `name` as a UUID. Raises ApiError 404 ("no {what} ...") when it is not one."""
    raw = request.match_info[name]
    try:
        return uuid.UUID(raw)
    except ValueError:
        raise ApiError(404, f"no {what} {raw}") from None


def query_int(request: web.Request, name: str, default: int, most: int) -> int:
    """?name=, an integer from 1 to `most` (`default` when absent). Raises ApiError 422 naming the field."""
    raw = request.query.get(name, str(default))
    if not (raw.isascii() and raw.isdigit()) or not 1 <= int(raw) <= most:
        raise ApiError(422, "invalid query", fields=[{"field": name, "message": f"an integer from 1 to {most}"}])
    return int(raw)


def page_limit(request: web.Request, default: int = 50, most: int = 200) -> int:
    """?limit=, an integer from 1 to `most`. Raises ApiError 422."""
    return query_int(request, "limit", default, most)


def encode_cursor(at: datetime, row_id: str) -> str:
    """An opaque ?cursor= for the position (time, id) of the last row of a page."""
    return base64.urlsafe_b64encode(json.dumps([at.isoformat(), row_id]).encode()).decode()


def decode_cursor(raw: str | None) -> tuple[datetime, str] | None:
    """The (time, id) position in a ?cursor= from `encode_cursor`; None when absent. Raises ApiError 422."""
    if not raw:
        return None
    try:
        at, row_id = json.loads(base64.urlsafe_b64decode(raw.encode()))
        return datetime.fromisoformat(at), str(row_id)
    except (ValueError, TypeError, RecursionError):
        raise ApiError(422, "invalid query", fields=[{"field": "cursor", "message": "not a cursor from this API"}]) \
            from None


def paginate(rows: list[Any], limit: int, at: str) -> tuple[list[Any], str | None]:
    """A page of `rows` (fetched with `limit + 1`, so one past the page tells there is more) and the ?cursor= of
    the next page (None on the last), from the page's last row's time column `at` and "id"."""
    page = rows[:limit]
    return page, encode_cursor(page[-1][at], page[-1]["id"]) if len(rows) > limit else None


def iso(value: datetime | None) -> str | None:
    """A time as ISO 8601 for a response body, or None."""
    return value.isoformat() if value else None
