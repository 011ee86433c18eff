"""DLP: find sensitive values in written and spoken text, and redact them by policy.

Chosen libraries: phonenumbers (phone parsing and validity for every region), python-stdnum (Luhn, IBAN
checksums) and the stdlib's ipaddress, with our own patterns for SSNs, secrets and connection strings and a
spoken-form normaliser. Presidio was evaluated and left out: offline it can only run its pattern
recognizers, which wrap these same checks, while it pulls in spaCy and its email recognizer fetches the
public suffix list over the network at run time.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Literal

from pono.agent.dlp.patterns import compile_pattern
from pono.agent.dlp.recognizers import BUILT_IN, Match, Recognizer, custom
from pono.agent.dlp.spoken import normalize

Action = Literal["redact", "mask_last4", "block_and_warn"]

# When two findings overlap, the more specific kind wins (a Luhn-valid card over a phone-shaped number).
_PRIORITY = ["SECRET", "CONNECTION_STRING", "CREDIT_CARD", "IBAN_CODE", "US_SSN", "EMAIL_ADDRESS", "IP_ADDRESS",
             "PHONE_NUMBER", "PASSWORD"]


@dataclass(frozen=True, slots=True)
class Finding:
    entity_type: str
    start: int  # offsets in the original text
    end: int
    action: str
    recognizer: str

    def to_json(self) -> dict[str, Any]:
        return {"entity_type": self.entity_type, "start": self.start, "end": self.end, "action": self.action,
                "recognizer": self.recognizer}


@dataclass(frozen=True)
class DlpResult:
    text: str  # redacted
    findings: list[Finding]

    @property
    def blocked(self) -> bool:
        return any(f.action == "block_and_warn" for f in self.findings)


@dataclass
class DlpPolicy:
    action: Action = "redact"
    entities: frozenset[str] | None = None  # None: every built-in kind
    custom_patterns: dict[str, str] = field(default_factory=dict)  # entity type → regex
    before_llm: bool = False
    _recognizers: list[Recognizer] = field(default_factory=list, repr=False)

    def __post_init__(self) -> None:
        kinds = BUILT_IN if self.entities is None else {k: v for k, v in BUILT_IN.items() if k in self.entities}
        self._recognizers = [*kinds.values(), *(custom(t, p) for t, p in self.custom_patterns.items())]

    @classmethod
    def from_config(cls, config: dict[str, Any] | None) -> DlpPolicy:
        """A persona's `dlp_policy`: {"action", "entities", "custom": [{"name", "pattern"}], "before_llm"}.

        Raises ValueError (naming the field) for an unknown action or entity, or a custom pattern RE2 can't
        compile (`patterns.compile_pattern`: syntax, backreferences, lookarounds, size).
        """
        config = config or {}
        action = config.get("action", "redact")
        if action not in ("redact", "mask_last4", "block_and_warn"):
            raise ValueError(f"action: must be redact, mask_last4 or block_and_warn, not {action!r}")
        entities = config.get("entities")
        if entities is not None:
            unknown = set(entities) - set(BUILT_IN)
            if unknown:
                raise ValueError(f"entities: unknown kinds {sorted(unknown)}; known: {sorted(BUILT_IN)}")
        patterns: dict[str, str] = {}
        for item in config.get("custom", []):
            name, pattern = str(item.get("name", "")).upper(), item.get("pattern")
            if not re.fullmatch(r"[A-Z][A-Z0-9_]{1,40}", name) or not isinstance(pattern, str):
                raise ValueError("custom: each entry needs a name (A-Z, 0-9, _) and a pattern")
            try:
                compile_pattern(pattern)  # RE2: linear time, so a persona's pattern can't freeze calls
            except ValueError as exc:
                raise ValueError(f"custom: {name} is not a valid regex: {exc}") from None
            patterns[name] = pattern
        return cls(action=action, entities=frozenset(entities) if entities is not None else None,
                   custom_patterns=patterns, before_llm=bool(config.get("before_llm", False)))

    def detect(self, text: str) -> list[Match]:
        matches = [m for r in self._recognizers for m in r(text)]
        normalized = normalize(text)
        if normalized.text != text:
            for r in self._recognizers:
                for m in r(normalized.text):
                    start, end = normalized.span(m.start, m.end)
                    matches.append(Match(m.entity_type, start, end, m.score, m.recognizer + "+spoken"))
        return _resolve(matches)

    def scan(self, text: str, action: Action | None = None) -> DlpResult:
        action = action or self.action
        findings = [Finding(m.entity_type, m.start, m.end, action, m.recognizer) for m in self.detect(text)]
        out, pos = [], 0
        for f in findings:
            out.append(text[pos:f.start])
            out.append(_replacement(f, text[f.start:f.end], action))
            pos = f.end
        out.append(text[pos:])
        return DlpResult("".join(out), findings)


def _rank(m: Match) -> tuple[int, int]:
    priority = _PRIORITY.index(m.entity_type) if m.entity_type in _PRIORITY else len(_PRIORITY)
    return priority, -(m.end - m.start)


def _resolve(matches: list[Match]) -> list[Match]:
    kept: list[Match] = []
    for m in sorted(matches, key=_rank):
        if all(m.end <= k.start or m.start >= k.end for k in kept):
            kept.append(m)
    return sorted(kept, key=lambda m: m.start)


def _replacement(finding: Finding, value: str, action: str) -> str:
    if action == "mask_last4":
        tail = re.sub(r"[^A-Za-z0-9]", "", normalize(value).text)[-4:]
        return f"[{finding.entity_type} ending {tail}]"
    return f"[{finding.entity_type}]"


DEFAULT_POLICY = DlpPolicy()
