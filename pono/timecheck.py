"""Checks for the time zones and cron expressions people and settings give Pono (personas, workflows, the
built-in job schedules), so a bad one is refused with a clear message instead of failing later.

Both raise ValueError naming the problem (a 422 for the field, or a settings error at start-up).
"""

from __future__ import annotations

from datetime import UTC, datetime
from zoneinfo import ZoneInfo

from croniter import CroniterError, croniter

CRON_HORIZON_YEARS = 5  # a cron expression must fire within this many years, else it is refused


def check_timezone(value: str) -> str:
    """`value` when it names an IANA time zone ("Europe/Paris", "UTC"). Raises ValueError otherwise: also for
    what makes ZoneInfo itself fail oddly (a folder such as "Europe", "__pycache__", a name too long for the
    file system, a NUL byte)."""
    if not isinstance(value, str) or not value or len(value) > 64:
        raise ValueError(f"unknown time zone {value!r:.80}")
    try:
        ZoneInfo(value)
    except (KeyError, ValueError, OSError, TypeError):  # ZoneInfoNotFoundError is a KeyError
        raise ValueError(f"unknown time zone {value!r}") from None
    return value


def check_cron(value: str) -> str:
    """`value` when it is a five-field cron expression that fires within CRON_HORIZON_YEARS years from now.
    Raises ValueError otherwise ("0 0 31 2 *", February 31st, never fires)."""
    if not isinstance(value, str) or len(value.split()) != 5 or not croniter.is_valid(value):
        raise ValueError(f"not a five-field cron expression: {value!r:.200}")
    try:
        croniter(value, datetime.now(UTC), max_years_between_matches=CRON_HORIZON_YEARS).get_next(datetime)
    except (CroniterError, ValueError, OverflowError):
        raise ValueError(f"the cron expression {value!r} never fires within {CRON_HORIZON_YEARS} years") from None
    return value
