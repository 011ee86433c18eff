"""Optional digest authentication of the SIP trunk (RFC 3261 §22.4, RFC 2617 §3.2, MD5 with qop=auth).

Nonces are stateless and signed: "<issued epoch s>.<16 random hex>.<HMAC>", keyed by a secret every replica
shares (the constructor's `secret`, from the database) mixed with the trunk credentials, so a nonce one
replica issued is good on the others. A nonce lives NONCE_TTL_S; each use must carry a larger `nc` than the
last one this process saw for that nonce (RFC 2617 §3.2.2), and the `uri` must be the Request-URI.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
import time

_REALM = "pono"
NONCE_TTL_S = 300
_MAX_TRACKED_NONCES = 10_000
_FIELD = re.compile(r'(\w+)\s*=\s*(?:"((?:[^"\\]|\\.)*)"|([^\s,]*))')


def _md5(text: str) -> str:
    return hashlib.md5(text.encode(), usedforsecurity=False).hexdigest()


def parse_fields(header: str) -> dict[str, str]:
    """The name=value pairs of a `Digest …` header (quoted or not), names lower-cased."""
    return {m.group(1).lower(): m.group(2) if m.group(2) is not None else m.group(3)
            for m in _FIELD.finditer(header)}


class DigestAuth:
    """Challenges and checks `Authorization: Digest` headers for one user.

    `secret`: bytes all replicas share (pono.storage.users.shared_secret); None keys the nonces with the
    credentials alone, which every replica also has but which is weaker if the password leaks.
    """

    def __init__(self, user: str, password: str, secret: bytes | None = None) -> None:
        self.user = user
        self._password = password
        self._key = hmac.new(secret or b"pono-sip-digest", f"{user}:{password}".encode(), "sha256").digest()
        self._seen_nc: dict[str, tuple[float, int]] = {}  # nonce → (issued, the highest nc used with it)

    def _mac(self, issued: str, salt: str) -> str:
        return hmac.new(self._key, f"{issued}.{salt}".encode(), "sha256").hexdigest()[:24]

    def challenge(self, stale: bool = False) -> str:
        """A WWW-Authenticate value with a fresh nonce; stale=true tells the client only the nonce expired."""
        issued, salt = str(int(time.time())), secrets.token_hex(8)
        nonce = f"{issued}.{salt}.{self._mac(issued, salt)}"
        return (f'Digest realm="{_REALM}", nonce="{nonce}", algorithm=MD5, qop="auth"'
                + (", stale=TRUE" if stale else ""))

    def verify(self, header: str | None, method: str, request_uri: str) -> str | None:
        """None when the header authenticates `method` on `request_uri`; otherwise why not, "stale" when
        only the nonce is too old (answer with challenge(stale=True))."""
        if not header or not header[:7].lower() == "digest ":
            return "no digest credentials"
        fields = parse_fields(header[7:])
        nonce = fields.get("nonce", "")
        issued, salt, mac = [*nonce.split("."), "", ""][:3]
        if not issued.isdigit() or not hmac.compare_digest(mac.encode(), self._mac(issued, salt).encode()):
            return "a nonce we did not issue"
        if fields.get("username") != self.user or fields.get("realm") != _REALM:
            return "wrong username or realm"
        if fields.get("algorithm", "MD5").upper() != "MD5" or fields.get("qop") != "auth":
            return "only MD5 with qop=auth is accepted"
        if fields.get("uri") != request_uri:
            return "the digest uri is not the Request-URI"
        nc_text = fields.get("nc", "")
        if not re.fullmatch(r"[0-9a-fA-F]{8}", nc_text) or not fields.get("cnonce"):
            return "nc and cnonce are required"
        ha1 = _md5(f"{self.user}:{_REALM}:{self._password}")
        ha2 = _md5(f"{method}:{request_uri}")
        expected = _md5(f"{ha1}:{nonce}:{nc_text}:{fields['cnonce']}:auth:{ha2}")
        if not hmac.compare_digest(expected.encode(), fields.get("response", "").encode()):
            return "wrong credentials"
        now = time.time()
        if now - int(issued) > NONCE_TTL_S:
            return "stale"
        nc = int(nc_text, 16)
        previous = self._seen_nc.get(nonce)
        if previous is not None and nc <= previous[1]:
            return "a replayed nonce count"
        self._seen_nc[nonce] = (float(issued), nc)
        if len(self._seen_nc) > _MAX_TRACKED_NONCES:  # expired nonces are refused anyway: forget them
            self._seen_nc = {n: v for n, v in self._seen_nc.items() if now - v[0] <= NONCE_TTL_S}
        return None
