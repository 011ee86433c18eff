"""Phone numbers → personas: which persona answers a dialed number. Numbers are stored normalised by the
caller (see pono.agent.personas.normalize_number); this module compares them as given."""

from __future__ import annotations

import asyncpg


async def list_numbers(pool: asyncpg.Pool) -> list[dict[str, str]]:
    """Every mapping to a persona that is not deleted, by number: [{"number", "persona": persona name}]."""
    rows = await pool.fetch("SELECT n.number, p.name FROM phone_numbers n JOIN personas p ON p.id = n.persona_id"
                            " WHERE p.deleted_at IS NULL ORDER BY n.number")
    return [{"number": r["number"], "persona": r["name"]} for r in rows]


async def set_number(pool: asyncpg.Pool, number: str, persona_id: str) -> None:
    """Map `number` to the persona with this id (a UUID string), replacing any earlier mapping."""
    await pool.execute("INSERT INTO phone_numbers (number, persona_id) VALUES ($1, $2)"
                       " ON CONFLICT (number) DO UPDATE SET persona_id = excluded.persona_id", number, persona_id)


async def delete_number(pool: asyncpg.Pool, number: str) -> bool:
    """Remove a mapping; False when there was none."""
    return await pool.fetchval("DELETE FROM phone_numbers WHERE number = $1 RETURNING number", number) is not None


async def persona_id_for_number(pool: asyncpg.Pool, number: str) -> str | None:
    """The id (UUID string) of the persona `number` maps to, or None when unmapped or the persona is deleted."""
    persona_id = await pool.fetchval(
        "SELECT n.persona_id FROM phone_numbers n JOIN personas p ON p.id = n.persona_id"
        " WHERE n.number = $1 AND p.deleted_at IS NULL", number)
    return str(persona_id) if persona_id else None
