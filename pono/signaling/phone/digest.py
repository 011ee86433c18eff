"""Optional digest authentication of the SIP trunk (RFC 2617/8760, MD5, qop=auth)."""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
import time

_REALM = "pono"
_NONCE_TTL_S = 300


def _md5(text: str) -> str:
    return hashlib.md5(text.encode(), usedforsecurity=False).hexdigest()


class DigestAuth:
    def __init__(self, user: str, password: str) -> None:
        self.user = user
        self._password = password
        self._key = secrets.token_bytes(16)

    def challenge(self) -> str:
        issued = str(int(time.time()))
        nonce = issued + "." + hmac.new(self._key, issued.encode(), "sha256").hexdigest()[:24]
        return f'Digest realm="{_REALM}", nonce="{nonce}", algorithm=MD5, qop="auth"'

    def check(self, header: str | None, method: str) -> bool:
        if not header or not header.lower().startswith("digest "):
            return False
        fields = dict(re.findall(r'(\w+)="?([^",]*)"?', header[7:]))
        nonce = fields.get("nonce", "")
        issued, _, mac = nonce.partition(".")
        if not issued.isdigit() or not hmac.compare_digest(
                mac, hmac.new(self._key, issued.encode(), "sha256").hexdigest()[:24]):
            return False
        if time.time() - int(issued) > _NONCE_TTL_S or fields.get("username") != self.user:
            return False
        ha1 = _md5(f"{self.user}:{_REALM}:{self._password}")
        ha2 = _md5(f"{method}:{fields.get('uri', '')}")
        if fields.get("qop"):
            expected = _md5(f"{ha1}:{nonce}:{fields.get('nc', '')}:{fields.get('cnonce', '')}:{fields['qop']}:{ha2}")
        else:
            expected = _md5(f"{ha1}:{nonce}:{ha2}")
        return hmac.compare_digest(expected, fields.get("response", ""))
