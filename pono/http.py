"""HTTP plumbing shared by every endpoint: JSON errors, strict JSON bodies, security headers."""

from __future__ import annotations

import json
import logging
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from aiohttp import web
from aiohttp.http_exceptions import PayloadEncodingError
from aiohttp.web_protocol import RequestPayloadError
from pydantic import BaseModel, ValidationError

from pono import textsafe

log = logging.getLogger(__name__)

M = TypeVar("M", bound=BaseModel)
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class ApiError(web.HTTPException):
    """An HTTP error whose body is JSON: {"error": message, ...details}."""

    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None, **details: Any) -> None:
        self.status_code = status
        super().__init__(
            text=json.dumps({"error": message, **details}), content_type="application/json", headers=headers
        )


async def read_json_model(request: web.Request, model: type[M]) -> M:
    if request.content_type != "application/json":
        raise ApiError(415, f"expected Content-Type application/json, got {request.content_type or 'none'}")
    try:
        raw = await request.read()  # raises 413 past client_max_size
        body = textsafe.loads(raw)  # lone surrogates repaired here, at the edge
    except web.HTTPRequestEntityTooLarge:
        raise
    except (RequestPayloadError, PayloadEncodingError) as exc:  # a Content-Encoding the body does not match
        raise ApiError(400, f"body cannot be decoded: {exc}") from None
    except (ValueError, UnicodeDecodeError) as exc:
        raise ApiError(400, f"body is not valid JSON: {exc}") from None
    except RecursionError:
        raise ApiError(400, "body is not valid JSON: nested too deeply") from None
    if not isinstance(body, dict):
        raise ApiError(400, "body must be a JSON object")
    try:
        return model.model_validate(body)
    except ValidationError as exc:
        fields = [{"field": ".".join(map(str, e["loc"])), "message": e["msg"]} for e in exc.errors()]
        raise ApiError(422, "invalid request body", fields=fields) from None


_SECURITY_HEADERS = {
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
    "Content-Security-Policy": (
        "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
        "connect-src 'self'; media-src 'self' blob: mediastream:; frame-ancestors 'none'"
    ),
}


def _has_nul(request: web.Request) -> bool:
    """Whether the decoded path or query holds U+0000, which no Postgres text column or parameter can hold."""
    return "\x00" in request.path or any("\x00" in k or "\x00" in v for k, v in request.query.items())


@web.middleware
async def errors_as_json(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Every error as a JSON body ({"error": ...}); a URL with NUL in it is a 400 before any handler sees it."""
    if _has_nul(request):
        raise ApiError(400, "NUL characters are not allowed in the URL")
    try:
        response = await handler(request)
    except ApiError:
        raise
    except web.HTTPException as exc:
        if exc.status < 400 or exc.content_type == "application/json":
            raise
        if exc.status == 413:
            message = "request body too large"
        else:
            message = exc.reason
        raise ApiError(exc.status, message) from None
    except Exception:
        log.exception("unhandled error on %s %s", request.method, request.path)
        raise ApiError(500, "internal server error") from None
    return response


async def add_security_headers(request: web.Request, response: web.StreamResponse) -> None:
    for name, value in _SECURITY_HEADERS.items():
        response.headers.setdefault(name, value)
    if request.secure or request.headers.get("X-Forwarded-Proto") == "https":
        response.headers.setdefault("Strict-Transport-Security", "max-age=31536000; includeSubDomains")
