"""What makes runs: a call that ended (its workflows whose filters hold), a cron schedule that fired, a person.

Each run has an idempotency key, so a trigger seen twice (a replayed journal, a job picked up again after a
crash, two workers' schedule ticks) makes one run.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from datetime import UTC, datetime
from typing import Any

import asyncpg

from pono.jobs.definition import matches, next_fire
from pono.jobs.runner import call_facts, policy_for_call, redact_value
from pono.storage.workflow_runs import create_run
from pono.storage.workflows import enabled_workflows, set_next_fire, take_due_schedules

log = logging.getLogger(__name__)


async def on_call_ended(pool: asyncpg.Pool, call_id: str) -> list[str]:
    """Make a run of each enabled call.ended workflow whose filters hold for the call; the new runs' ids."""
    facts = await call_facts(pool, call_id)
    if facts is None:
        return []  # deleted since, or never stored
    made = []
    for workflow in await enabled_workflows(pool, "call.ended"):
        if matches(workflow["definition"]["trigger"], facts):
            run_id = await create_run(pool, workflow, "call.ended", f"call.ended:{workflow['id']}:{call_id}",
                                      call_id=call_id)
            if run_id is not None:
                made.append(run_id)
    return made


async def fire_due_schedules(pool: asyncpg.Pool, now: datetime | None = None) -> list[str]:
    """Make a run of each schedule workflow due at `now` (default: the clock), and move its next fire time
    on (fire times missed while no worker ran make one run, not many). The new runs' ids."""
    now = now or datetime.now(UTC)
    made = []
    async with pool.acquire() as conn, conn.transaction():
        for workflow in await take_due_schedules(conn, now):
            fired = workflow["next_fire_at"]
            run_id = await create_run(conn, workflow, "schedule", f"schedule:{workflow['id']}:{fired.isoformat()}",
                                      inputs={"fired_at": fired.isoformat()})
            upcoming = next_fire(workflow["definition"]["trigger"], now)
            if upcoming is None:
                log.warning("schedule workflow %s never fires again: its cron finds no time", workflow["id"])
            await set_next_fire(conn, workflow["id"], upcoming)
            if run_id is not None:
                made.append(run_id)
    return made


async def run_by_hand(pool: asyncpg.Pool, workflow: dict[str, Any], call_id: str | None,
                      inputs: dict[str, Any]) -> str:
    """A manual run (of any workflow), on a stored call when `call_id` is given. Its `inputs` are stored and
    shown redacted (by the call's DLP policy, else the default one); the run itself uses them as given.
    Raises asyncpg.ForeignKeyViolationError for a call that is not stored."""
    shown = await asyncio.to_thread(redact_value, inputs, await policy_for_call(pool, call_id))
    run_id = await create_run(pool, workflow, "manual", f"manual:{uuid.uuid4()}", call_id=call_id, inputs=shown,
                              raw_inputs=None if shown == inputs else inputs)
    assert run_id is not None
    return run_id
