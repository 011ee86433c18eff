"""Personas as a call sees them: a snapshot taken when the call starts, so later edits affect new calls only."""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass, field
from typing import Any

import asyncpg

from pono.settings import Settings


class UnknownPersona(LookupError):
    pass


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
    turn_taking: dict[str, int] = field(default_factory=dict)
    timezone: str = "UTC"
    call_tokens_enabled: bool = True
    call_tokens_per_minute: int | None = None

    @classmethod
    def from_settings(cls, settings: Settings) -> Persona:
        """The persona of last resort, when Postgres cannot be asked."""
        return cls(name="default", system_prompt=settings.system_prompt, greeting=settings.greeting)

    @classmethod
    def from_row(cls, row: asyncpg.Record) -> Persona:
        return cls(
            id=str(row["id"]), name=row["name"], system_prompt=row["system_prompt"], greeting=row["greeting"],
            language=row["language"], tts_voice=row["tts_voice"], llm_model=row["llm_model"],
            llm_params=json.loads(row["llm_params"]), tools=json.loads(row["tools"]),
            knowledge_collections=list(row["knowledge_collections"]), dlp_policy=json.loads(row["dlp_policy"]),
            turn_taking=json.loads(row["turn_taking"]), timezone=row["timezone"],
            call_tokens_enabled=row["call_tokens_enabled"], call_tokens_per_minute=row["call_tokens_per_minute"],
        )


_COLUMNS = ("id, name, system_prompt, greeting, language, tts_voice, llm_model, llm_params, tools,"
            " knowledge_collections, dlp_policy, turn_taking, timezone, call_tokens_enabled, call_tokens_per_minute")


async def load_persona(pool: asyncpg.Pool, ref: str | None) -> Persona:
    """The persona named or identified by `ref`, or the default one. Raises UnknownPersona."""
    if ref is None:
        row = await pool.fetchrow(f"SELECT {_COLUMNS} FROM personas WHERE is_default AND deleted_at IS NULL")
    else:
        try:
            persona_id = uuid.UUID(ref)
        except ValueError:
            persona_id = None
        row = await pool.fetchrow(
            f"SELECT {_COLUMNS} FROM personas WHERE deleted_at IS NULL AND (id = $1 OR name = $2)",
            persona_id, ref)
    if row is None:
        raise UnknownPersona(ref or "default")
    return Persona.from_row(row)


def normalize_number(dialed: str) -> str:
    """+1 (555) 010-2000 and +15550102000 are the same number; a SIP user part may be a name, kept as is."""
    digits = re.sub(r"[\s().-]", "", dialed)
    return digits if re.fullmatch(r"\+?\d+", digits) else dialed.strip().lower()


async def persona_for_number(pool: asyncpg.Pool, dialed: str) -> Persona:
    """The persona mapped to a dialed number, or the default one."""
    persona_id = await pool.fetchval(
        "SELECT n.persona_id FROM phone_numbers n JOIN personas p ON p.id = n.persona_id"
        " WHERE n.number = $1 AND p.deleted_at IS NULL", normalize_number(dialed))
    return await load_persona(pool, str(persona_id) if persona_id else None)
