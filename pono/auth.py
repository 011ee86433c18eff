"""Signed, short-lived tokens: call tokens for anonymous callers, and the server's secret key.

A call token lets its holder open one call and act on that call only. Tokens are HMAC-SHA256 signed
with a secret generated once into the data dir (mode 0600).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import os
import secrets
import time
from pathlib import Path

from aiohttp import web


def load_secret(path: Path) -> bytes:
    """A random secret kept in the data dir (mode 0600), made on first use."""
    if path.exists():
        return path.read_bytes().strip()
    path.parent.mkdir(parents=True, exist_ok=True)
    value = secrets.token_urlsafe(32).encode()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(value)
    return value


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


class TokenSigner:
    def __init__(self, secret: bytes) -> None:
        self._key = hashlib.sha256(b"pono-token:" + secret).digest()

    def issue(self, scope: str, ttl_s: int, **claims: str) -> str:
        payload = {"scope": scope, "exp": int(time.time()) + ttl_s, "jti": secrets.token_urlsafe(8), **claims}
        body = _b64(json.dumps(payload, separators=(",", ":")).encode())
        return f"{body}.{_b64(self._sign(body))}"

    def verify(self, token: str, scope: str) -> dict[str, object] | None:
        try:
            body, signature = token.split(".", 1)
            if not hmac.compare_digest(_unb64(signature), self._sign(body)):
                return None
            payload = json.loads(_unb64(body))
        except (ValueError, json.JSONDecodeError):
            return None
        if not isinstance(payload, dict) or payload.get("scope") != scope:
            return None
        if not isinstance(payload.get("exp"), int) or payload["exp"] < time.time():
            return None
        return payload

    def _sign(self, body: str) -> bytes:
        return hmac.new(self._key, body.encode(), hashlib.sha256).digest()


def bearer(request: web.Request) -> str | None:
    """The token of an `Authorization: Bearer …` header, or None. Every token Pono issues is printable ASCII,
    so anything else (raw bytes decoded as surrogates, control characters) is no token at all: a 401, never a
    hash of bytes that cannot be encoded."""
    header = request.headers.get("Authorization", "")
    if header.lower().startswith("bearer "):
        token = header[7:].strip()
        return token if token and token.isascii() and token.isprintable() else None
    return None
