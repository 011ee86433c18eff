"""Recognizers: each finds one kind of sensitive value in written text.

Validation comes from maintained libraries where they exist (phonenumbers for phone numbers, python-stdnum
for Luhn and IBAN checksums, the stdlib's ipaddress), the rest are patterns with context rules that keep
order numbers, dates, prices and zip codes out.
"""

from __future__ import annotations

import ipaddress
import math
import re
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass

import phonenumbers
from stdnum import iban, luhn

from pono.agent.dlp.patterns import compile_pattern


@dataclass(frozen=True, slots=True)
class Match:
    entity_type: str
    start: int
    end: int
    score: float
    recognizer: str


Recognizer = Callable[[str], list[Match]]


def _context(text: str, start: int, end: int, words: re.Pattern[str], window: int = 40) -> bool:
    return bool(words.search(text[max(0, start - window):start])) or bool(words.search(text[end:end + 12]))


# -- US social security numbers ---------------------------------------------------------------
_SSN = re.compile(r"(?<![\d-])(?!000|666|9\d\d)(\d{3})([- ]?)(?!00)(\d{2})\2(?!0000)(\d{4})(?![\d-])")
_SSN_CONTEXT = re.compile(r"(?i)\b(ssn|social|security|ss#|s\.s\.n)\b")


def ssn(text: str) -> list[Match]:
    out = []
    for m in _SSN.finditer(text):
        separated = m.group(2) != ""
        # Nine bare digits are an SSN only when the words around say so; 123-45-6789 is one by its shape.
        if separated or _context(text, m.start(), m.end(), _SSN_CONTEXT):
            out.append(Match("US_SSN", m.start(), m.end(), 0.9 if separated else 0.8, "ssn"))
    return out


# -- payment cards ----------------------------------------------------------------------------
_CARD = re.compile(r"(?<![\d-])(?:\d[ -]?){11,19}\d(?![\d-])")
_CARD_PREFIX = re.compile(r"^(4|5[1-5]|2[2-7]|3[47]|6(?:011|5|4[4-9])|35|30[0-5]|36|38)")
_CARD_CONTEXT = re.compile(r"(?i)\b(card|visa|master ?card|amex|american express|discover|credit|debit|cvv|cvc)\b")


def credit_card(text: str) -> list[Match]:
    """Card numbers: 13-19 digits with an issuer's prefix that pass the Luhn check; and, where the words around
    speak of a card, any 12-20 digit run: speech recognition that hears one digit too many or too few ("4111
    1111 1111 1111" heard as 19 ones) breaks the checksum, not the secret."""
    out = []
    for m in _CARD.finditer(text):
        digits = re.sub(r"\D", "", m.group())
        if 13 <= len(digits) <= 19 and _CARD_PREFIX.match(digits) and luhn.is_valid(digits):
            out.append(Match("CREDIT_CARD", m.start(), m.end(), 1.0, "luhn"))
        elif _context(text, m.start(), m.end(), _CARD_CONTEXT):
            out.append(Match("CREDIT_CARD", m.start(), m.end(), 0.8, "card_context"))
    return out


# -- email ------------------------------------------------------------------------------------
# On RE2: with Python's re this pattern rescans a run like "1.1.1.1..." from every start, quadratic in its
# length, and DLP runs on webhook answers of up to 64 KiB.
_EMAIL = compile_pattern(r"(?i)\b[a-z0-9._%+-]+@[a-z0-9-]+(?:\.[a-z0-9-]+)*\.[a-z]{2,24}\b")


def email(text: str) -> list[Match]:
    return [Match("EMAIL_ADDRESS", m.start(), m.end(), 1.0, "email") for m in _EMAIL.finditer(text)]


# -- phone numbers ----------------------------------------------------------------------------
_PHONE_CONTEXT = re.compile(r"(?i)\b(call|phone|number|mobile|cell|reach|text|dial|fax|tel|contact)\b")
_NOT_PHONE_CONTEXT = re.compile(r"(?i)\b(order|tracking|confirmation|invoice|reference|ref|booking|ticket|"
                                r"serial|model|part|sku|case|claim|policy|account|flight)\b")


def phone(text: str, regions: tuple[str, ...] = ("US", "GB", "DE", "FR", "IN", "AU")) -> list[Match]:
    out: dict[tuple[int, int], Match] = {}
    for region in regions:
        for m in phonenumbers.PhoneNumberMatcher(text, region, leniency=phonenumbers.Leniency.VALID):
            digits = re.sub(r"\D", "", m.raw_string)
            # A bare digit run without + or separators is as likely an order number: it needs context.
            formatted = m.raw_string.startswith("+") or re.search(r"[\s().-]", m.raw_string.strip())
            if _context(text, m.start, m.end, _NOT_PHONE_CONTEXT, window=25) and not m.raw_string.startswith("+"):
                continue
            if len(digits) >= 7 and (formatted or _context(text, m.start, m.end, _PHONE_CONTEXT)):
                out.setdefault((m.start, m.end), Match("PHONE_NUMBER", m.start, m.end, 0.85, "phonenumbers"))
        if text.count("+") == 0 and out:
            break  # national numbers found with the first region; no need to try others
    return list(out.values())


# -- IBAN -------------------------------------------------------------------------------------
_IBAN = re.compile(r"\b[A-Z]{2}\d{2}(?: ?[A-Z0-9]{1,4}){3,9}\b")


def iban_code(text: str) -> list[Match]:
    out = []
    for m in _IBAN.finditer(text):
        # The pattern may run on into following words ("... 19 AT MY BANK"): try the longest prefix that
        # ends on a group boundary and carries a valid checksum.
        ends = [m.start() + g.end() for g in re.finditer(r"[A-Z0-9]+", m.group())]
        for end in reversed(ends):
            if end - m.start() >= 15 and iban.is_valid(text[m.start():end].replace(" ", "")):
                out.append(Match("IBAN_CODE", m.start(), end, 1.0, "stdnum.iban"))
                break
    return out


# -- IP addresses -----------------------------------------------------------------------------
_IPV4 = re.compile(r"(?<![\d.])(?:\d{1,3}\.){3}\d{1,3}(?![\d.])")
_IPV6 = re.compile(r"(?i)(?<![:\w])(?:[0-9a-f]{0,4}:){2,7}[0-9a-f]{0,4}(?![:\w])")


def ip_address(text: str) -> list[Match]:
    out = []
    for pattern in (_IPV4, _IPV6):
        for m in pattern.finditer(text):
            try:
                ipaddress.ip_address(m.group())
            except ValueError:
                continue
            if ":" in m.group() and m.group().count(":") < 2:
                continue
            out.append(Match("IP_ADDRESS", m.start(), m.end(), 0.9, "ipaddress"))
    return out


# -- secrets ----------------------------------------------------------------------------------
_SECRET_PATTERNS: list[tuple[str, re.Pattern[str]]] = [
    ("openai", re.compile(r"\bsk-(?:proj-|svcacct-|admin-)?[A-Za-z0-9_-]{20,}")),
    ("aws_access_key", re.compile(r"\b(?:AKIA|ASIA|AGPA|AIDA|AROA)[0-9A-Z]{16}\b")),
    ("github", re.compile(r"\b(?:gh[pousr]_[A-Za-z0-9]{36,}|github_pat_[A-Za-z0-9_]{22,})\b")),
    ("stripe", re.compile(r"\b(?:sk|rk|pk)_(?:live|test)_[A-Za-z0-9]{16,}\b")),
    ("jwt", re.compile(r"\beyJ[A-Za-z0-9_-]{8,}\.eyJ[A-Za-z0-9_-]{8,}\.[A-Za-z0-9_-]{8,}")),
    ("slack", re.compile(r"\bxox[abprs]-[A-Za-z0-9-]{10,}")),
]
_AWS_SECRET = re.compile(r"(?<![A-Za-z0-9/+=])[A-Za-z0-9/+=]{40}(?![A-Za-z0-9/+=])")
_SECRET_CONTEXT = re.compile(r"(?i)\b(key|token|secret|password|passwd|credential|api|bearer|auth)\b")
_CANDIDATE = re.compile(r"(?<![\w/+=-])[A-Za-z0-9_/+=-]{20,}(?![\w/+=-])")


def entropy(value: str) -> float:
    counts = Counter(value)
    return -sum(c / len(value) * math.log2(c / len(value)) for c in counts.values())


def secret(text: str) -> list[Match]:
    out = [Match("SECRET", m.start(), m.end(), 1.0, name) for name, p in _SECRET_PATTERNS for m in p.finditer(text)]
    for m in _AWS_SECRET.finditer(text):
        if _context(text, m.start(), m.end(), _SECRET_CONTEXT) and entropy(m.group()) > 4.0:
            out.append(Match("SECRET", m.start(), m.end(), 0.8, "aws_secret"))
    for m in _CANDIDATE.finditer(text):
        value = m.group()
        classes = sum(bool(re.search(p, value)) for p in (r"[a-z]", r"[A-Z]", r"\d"))
        if classes < 2 or value.isdigit():
            continue
        score = entropy(value)
        # High entropy alone (a random token) or moderate entropy next to a word like "token" or "key".
        if (score > 4.3 and len(value) >= 24 and classes == 3) or \
                (score > 3.5 and _context(text, m.start(), m.end(), _SECRET_CONTEXT)):
            out.append(Match("SECRET", m.start(), m.end(), 0.7, "entropy"))
    return out


# -- connection strings and passwords ---------------------------------------------------------
# A connection string is sensitive when it carries a password (user:password@ or password=); one without
# says only where a server is, which logs and error messages need.
_DSN = re.compile(r"(?i)\b(?:postgres(?:ql)?|mysql|mariadb|mongodb(?:\+srv)?|redis|rediss|amqps?|mssql|sqlserver"
                  r"|oracle|jdbc:[a-z]+)://(?:[^\s\"'<>/@:]*:[^\s\"'<>@]+@[^\s\"'<>]+"
                  r"|[^\s\"'<>]*[?&;]password=[^\s\"'<>]+)")
_PASSWORD = re.compile(r"(?i)\b(?:password|passwd|pwd|passcode|pass phrase|passphrase)\b\s*(?P<sep>is|=|:)?\s*"
                       r"(?P<value>\"[^\"]+\"|'[^']+'|[^\s,;]+)")
_SECRET_LOOKING = re.compile(r"[\d\W_]|[a-z][A-Z]")  # a digit, a symbol or a case change inside
# Words that say something about a password rather than being one: "the password is wrong", "password and".
_ABOUT_A_PASSWORD = frozenset({
    "is", "please", "reset", "again", "for", "to", "and", "or", "but", "not", "wrong", "incorrect", "correct",
    "invalid", "expired", "the", "a", "my", "your", "too", "still", "same", "different", "required", "needed",
    "changed", "working", "fine", "ok", "okay", "right", "long", "short", "weak", "strong", "manager", "case",
    "sensitive", "field", "box", "protected", "change", "changes", "expires", "hint", "it", "that", "this",
})


def connection_string(text: str) -> list[Match]:
    out = [Match("CONNECTION_STRING", m.start(), m.end(), 1.0, "dsn") for m in _DSN.finditer(text)]
    for m in _PASSWORD.finditer(text):
        value = m.group("value")
        bare = value.strip("\"'")
        if value.lower() in _ABOUT_A_PASSWORD or len(bare) < 4:
            continue
        # Without "is", "=" or ":" a plain word is what the sentence goes on with ("my password expired"), not
        # the password; with one, "my password is sunshine" is the password.
        if m.group("sep") is None and value == bare and not _SECRET_LOOKING.search(bare):
            continue
        out.append(Match("PASSWORD", m.start("value"), m.end("value"), 0.9, "password"))
    return out


BUILT_IN: dict[str, Recognizer] = {
    "US_SSN": ssn,
    "CREDIT_CARD": credit_card,
    "EMAIL_ADDRESS": email,
    "PHONE_NUMBER": phone,
    "IBAN_CODE": iban_code,
    "IP_ADDRESS": ip_address,
    "SECRET": secret,
    "CONNECTION_STRING": connection_string,
}


def custom(entity_type: str, pattern: str) -> Recognizer:
    """A recognizer for a persona's own pattern, run on RE2 (linear time; `patterns.compile_pattern`).

    Raises ValueError for a pattern RE2 refuses (personas are validated before they are saved)."""
    compiled = compile_pattern(pattern)

    def recognize(text: str) -> list[Match]:
        return [Match(entity_type, m.start(), m.end(), 1.0, f"custom:{entity_type}")
                for m in compiled.finditer(text) if m.end() > m.start()]

    return recognize
