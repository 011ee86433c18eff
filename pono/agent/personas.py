"""Personas as a call sees them: a snapshot taken when the call starts, so later edits affect new calls only."""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from pono.settings import Settings


class UnknownPersona(LookupError):
    """No persona by that name or id (or no default persona); the argument says which was asked for."""


class PersonaUnavailable(UnknownPersona):
    """The persona cannot be verified now: the database is unreachable and no last-known copy of it is kept.

    Calls for it are refused rather than given a guess. It is an UnknownPersona, so whatever refuses an unknown
    persona refuses this one too; HTTP answers it with 503 instead of 404.
    """


@dataclass(frozen=True)
class Persona:
    name: str
    system_prompt: str
    greeting: str
    id: str | None = None
    language: str = "en"
    tts_voice: str | None = None
    llm_model: str | None = None
    llm_params: dict[str, Any] = field(default_factory=dict)
    tools: list[Any] = field(default_factory=list)
    knowledge_collections: list[str] = field(default_factory=list)
    dlp_policy: dict[str, Any] = field(default_factory=dict)
    turn_taking: dict[str, Any] = field(default_factory=dict)
    timezone: str = "UTC"
    call_tokens_enabled: bool = True
    call_tokens_per_minute: int | None = None
    recording: str = "off"  # "off", "on" or "announce" (the notice is said before the greeting)
    recording_notice: str = ""  # "": PONO_RECORDING_NOTICE
    recording_redaction: str = "tone"  # "tone" or "silence" over spoken personal data
    recording_retention_days: int | None = None  # None: PONO_RETENTION_DAYS

    @classmethod
    def from_settings(cls, settings: Settings) -> Persona:
        """The persona of last resort, when Postgres cannot be asked."""
        return cls(name="default", system_prompt=settings.system_prompt, greeting=settings.greeting,
                   recording=settings.recording_default)

    @classmethod
    def from_record(cls, record: Mapping[str, Any]) -> Persona:
        """A snapshot of a stored persona: a dict as the storage repository gives it (JSON fields decoded,
        the id a string). Keys other than the persona's fields are ignored; a missing one raises KeyError."""
        return cls(
            id=str(record["id"]), name=record["name"], system_prompt=record["system_prompt"],
            greeting=record["greeting"], language=record["language"], tts_voice=record["tts_voice"],
            llm_model=record["llm_model"], llm_params=record["llm_params"], tools=record["tools"],
            knowledge_collections=list(record["knowledge_collections"]), dlp_policy=record["dlp_policy"],
            turn_taking=record["turn_taking"], timezone=record["timezone"],
            call_tokens_enabled=record["call_tokens_enabled"],
            call_tokens_per_minute=record["call_tokens_per_minute"],
            # A copy cached before recordings existed has none of these: not recorded.
            recording=record.get("recording", "off"), recording_notice=record.get("recording_notice", ""),
            recording_redaction=record.get("recording_redaction", "tone"),
            recording_retention_days=record.get("recording_retention_days"),
        )


def normalize_number(dialed: str) -> str:
    """+1 (555) 010-2000 and +15550102000 are the same number; a SIP user part may be a name, kept as is."""
    digits = re.sub(r"[\s().-]", "", dialed)
    return digits if re.fullmatch(r"\+?\d+", digits) else dialed.strip().lower()

