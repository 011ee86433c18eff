"""Workflow limits without a server: templates and conditions stop at their caps and at a hard time limit in a
helper process that is then replaced; schedules never fire twice for one wall-clock slot; bad built-in job
crons stop the start with exit 2."""

from __future__ import annotations

import asyncio
import os
import sys
from datetime import UTC, datetime, timedelta
from zoneinfo import ZoneInfo

import pytest
from pydantic import ValidationError

from pono.jobs.conditions import ConditionFailed
from pono.jobs.definition import next_fire
from pono.jobs.sandbox import Sandbox
from pono.jobs.templates import TemplateFailed
from pono.settings import Settings


async def test_templates_and_conditions_stop_at_limits_and_the_helper_is_replaced() -> None:
    sandbox = Sandbox(size=1, limit_s=0.5)
    try:
        # A condition within every cap that still takes seconds (10,000 rounds of work on 100 KB strings) runs
        # out of time in its helper, which is killed: the event loop never ran it.
        slow = "len([('x' * 99999).lower().upper().lower().upper().count('z') for a in 'y' * 9999]) > 0"
        with pytest.raises(ConditionFailed, match=r"stopped after 0\.5 s"):
            await sandbox.holds(slow, {})
        assert await sandbox.holds("input.n > 1", {"input": {"n": 2}})  # a fresh helper answers
        for expression, error in (("'x'.ljust(10**9).count('y') == 0", "may not call the method 'ljust'"),
                                  ("2 ** 10**6 > 1", "an exponent of 1000000"),
                                  ("[1][3] == 1", "IndexError")):
            with pytest.raises(ConditionFailed, match=error):
                await sandbox.holds(expression, {})
        for template, error in (("{{ 'x'.ljust(10**9) }}", "a width of 1000000000"),
                                ("{{ 'x' * 10**9 }}", "repeating 1 characters"),
                                ("{% for i in range(10001) %}{% endfor %}", "range\\(\\) of 10001 items"),
                                ("{% for i in range(10000) %}{{ 'y' * 1000 }}{% endfor %}", "output passed")):
            with pytest.raises(TemplateFailed, match=error):
                await sandbox.render([template], {})
        assert await sandbox.render(["Call {{call.id}}: {{disposition}}"], {"call": {"id": "c1"},
                                                                           "disposition": None}) == ["Call c1: "]
    finally:
        await sandbox.close()


def test_a_wall_clock_slot_fires_once_when_clocks_go_back() -> None:
    """01:30 happens twice in New York on 2 November 2025: a daily 01:30 schedule fires at the first, then the
    next day (it fired at 05:30 and again at 06:30 UTC). A slot skipped by clocks going forward fires after the
    gap."""
    zone = ZoneInfo("America/New_York")
    daily = {"cron": "30 1 * * *", "timezone": "America/New_York"}
    first = next_fire(daily, datetime(2025, 11, 2, 4, 0, tzinfo=UTC))
    assert first == datetime(2025, 11, 2, 5, 30, tzinfo=UTC)
    again = next_fire(daily, first + timedelta(seconds=1))
    assert again is not None and again.astimezone(zone).date().isoformat() == "2025-11-03"
    # Even a worker that wakes inside the repeated hour does not fire that slot again.
    assert next_fire(daily, datetime(2025, 11, 2, 6, 10, tzinfo=UTC)) == again
    forward = next_fire({"cron": "30 2 * * *", "timezone": "Europe/Paris"}, datetime(2025, 3, 30, tzinfo=UTC))
    assert forward == datetime(2025, 3, 30, 1, 30, tzinfo=UTC)  # 03:30 CEST, just after the gap
    assert next_fire({"cron": "0 0 31 2 *"}, datetime.now(UTC)) is None  # never: not an endless search


async def test_bad_job_crons_are_settings_errors(tmp_path: os.PathLike[str]) -> None:
    for field, value in (("jobs_purge_cron", "0 0 31 2 *"), ("jobs_report_cron", "every night")):
        with pytest.raises(ValidationError, match=field):
            Settings(**{field: value})
    env = {**os.environ, "PONO_JOBS_PURGE_CRON": "0 0 31 2 *", "PONO_DATA_DIR": str(tmp_path),
           "DATABASE_URL": "postgresql://pono@127.0.0.1:1/none", "PONO_DB_CONNECT_ATTEMPTS": "1"}
    process = await asyncio.create_subprocess_exec(sys.executable, "-m", "pono", "jobs", env=env,
                                                   stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    _, err = await asyncio.wait_for(process.communicate(), 60)
    assert process.returncode == 2
    assert "jobs_purge_cron: the cron expression '0 0 31 2 *' never fires" in err.decode()
