"""What a workflow is: its JSON, checked before it is stored (pydantic), and what its trigger and cron mean.

    {"name": "follow-up", "trigger": {"type": "call.ended"},
     "steps": [{"type": "summarize"},
               {"type": "email", "to": "ops@example.com", "subject": "Call {{call.id}}", "body": "{{summary}}"}]}

Triggers: `call.ended` (optional filters: persona, transport, end_reason, min/max duration, tool_called),
`schedule` (`cron`, five fields, in `timezone`), `manual`. Steps run in order; each may set `name`, `timeout_s`,
`retries`, `backoff_s` and `compensate` (a step run, in reverse order, when a later step fails for good).
Templates are Jinja2 (sandboxed, see pono.jobs.templates); conditions are simpleeval expressions (see
pono.jobs.conditions). What a run would refuse is refused here too, naming the field: private attributes in
templates and conditions, calls a condition may not make, secrets outside PONO_WEBHOOK_SECRET[_*] and
PONO_HTTP_SECRET_*, URLs that are not http(s), crons that never fire, unknown time zones.
"""

from __future__ import annotations

import re
from datetime import UTC, datetime
from typing import Annotated, Any, Literal
from zoneinfo import ZoneInfo

from croniter import CroniterError, croniter
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, model_validator

from pono.agent.tools.webhook import check_secret_env
from pono.jobs.conditions import check_expression
from pono.jobs.templates import check_template
from pono.timecheck import CRON_HORIZON_YEARS, check_cron, check_timezone

_Strict = ConfigDict(extra="forbid")


def _template(value: str) -> str:
    check_template(value)  # raises ValueError naming the problem: a 422 for the field
    return value


def _templates(value: Any) -> Any:
    """Every string inside a JSON value is a template."""
    if isinstance(value, str):
        check_template(value)
    elif isinstance(value, list):
        for v in value:
            _templates(v)
    elif isinstance(value, dict):
        for v in value.values():
            _templates(v)
    return value


def _expression(value: str) -> str:
    check_expression(value)  # raises ValueError naming what a condition may not hold
    return value


HTTP_SECRET_ENV = re.compile(r"^PONO_HTTP_SECRET_[A-Z0-9_]{1,64}$")
# Headers an http step may not set: the transport's own, and the idempotency key the runner sets.
_RESERVED_HEADERS = frozenset({"host", "content-length", "transfer-encoding", "connection", "idempotency-key",
                               "upgrade", "te", "trailer", "keep-alive", "proxy-authorization"})


def _http_secret_env(value: str | None) -> str | None:
    """An http step's secret: PONO_HTTP_SECRET_* (or a webhook secret, PONO_WEBHOOK_SECRET[_*])."""
    if value is not None and not HTTP_SECRET_ENV.match(value):
        try:
            check_secret_env(value)
        except ValueError:
            raise ValueError(f"secret_env must start with PONO_HTTP_SECRET_ (or be PONO_WEBHOOK_SECRET[_*]), "
                             f"not {value!r:.100}") from None
    return value


def _headers(value: dict[str, str]) -> dict[str, str]:
    for name in value:
        if not re.fullmatch(r"[A-Za-z0-9-]{1,64}", name) or name.lower() in _RESERVED_HEADERS:
            raise ValueError(f"{name!r:.80} is not a header a step may set")
    return value


def _header_name(value: str) -> str:
    _headers({value: ""})
    return value


Template = Annotated[str, Field(max_length=20_000), AfterValidator(_template)]


class CallEndedTrigger(BaseModel):
    """Runs for each call that ends, if every filter given holds."""

    model_config = _Strict
    type: Literal["call.ended"]
    persona: list[str] | str | None = None
    transport: list[str] | str | None = None
    end_reason: list[str] | str | None = None
    min_duration_s: float | None = Field(default=None, ge=0)
    max_duration_s: float | None = Field(default=None, ge=0)
    tool_called: str | None = None


class ScheduleTrigger(BaseModel):
    """Runs each time the cron expression fires in its time zone."""

    model_config = _Strict
    type: Literal["schedule"]
    cron: Annotated[str, Field(max_length=200), AfterValidator(check_cron)]
    timezone: Annotated[str, Field(max_length=64), AfterValidator(check_timezone)] = "UTC"


class ManualTrigger(BaseModel):
    model_config = _Strict
    type: Literal["manual"]


class StepBase(BaseModel):
    model_config = _Strict
    name: str | None = Field(default=None, max_length=100, pattern=r"^[A-Za-z_][A-Za-z0-9_]*$")
    timeout_s: float = Field(default=30.0, gt=0, le=600)
    retries: int = Field(default=2, ge=0, le=10)  # extra tries after a failure that may pass (not a 4xx)
    # Before the first retry; doubled for each next, each wait at most 5 min and all of them at most 1 h
    # (pono.jobs.runner), so one step never holds a worker for days.
    backoff_s: float = Field(default=1.0, ge=0, le=300)


class SummarizeStep(StepBase):
    """The LLM summarises the redacted transcript: summary, action items, disposition (kept on the call)."""

    type: Literal["summarize"]
    instructions: str = Field(default="", max_length=4000)


class EmailStep(StepBase):
    type: Literal["email"]
    to: list[Template] | Template
    subject: Template
    body: Template


class WebhookStep(StepBase):
    """POSTs the run's context (or `payload`), signed like webhook tools, to an allow-listed host."""

    type: Literal["webhook"]
    url: str = Field(pattern=r"^https?://", max_length=2000)
    secret_env: Annotated[str, AfterValidator(check_secret_env)] = "PONO_WEBHOOK_SECRET"
    payload: Annotated[dict[str, Any] | None, AfterValidator(_templates)] = None


class HttpStep(StepBase):
    """A JSON request to a CRM-like endpoint; `map` copies response fields (dotted paths) into the context.
    `headers` (templates) are sent as given; `secret_env` names the variable whose value goes in
    `secret_header`: "Authorization: Bearer <secret>" by default, the bare secret in any other header."""

    type: Literal["http"]
    method: Literal["GET", "POST", "PUT", "PATCH", "DELETE"] = "POST"
    url: Annotated[str, Field(pattern=r"^https?://", max_length=2000), AfterValidator(_template)]
    body: Annotated[Any, AfterValidator(_templates)] = None
    map: dict[str, str] = Field(default_factory=dict)
    headers: Annotated[dict[str, Template], Field(max_length=20), AfterValidator(_headers)] = Field(
        default_factory=dict)
    secret_env: Annotated[str | None, AfterValidator(_http_secret_env)] = None
    secret_header: Annotated[str, AfterValidator(_header_name)] = "Authorization"


class ConditionStep(StepBase):
    """The steps after it run only if the expression (over the context) holds."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)
    type: Literal["condition"]
    expression: Annotated[str, Field(alias="if", max_length=2000), AfterValidator(_expression)]


Action = Annotated[SummarizeStep | EmailStep | WebhookStep | HttpStep | ConditionStep, Field(discriminator="type")]


# A workflow's steps may name a compensating step (one level: a compensation has none of its own).
class Summarize(SummarizeStep):
    compensate: Action | None = None


class Email(EmailStep):
    compensate: Action | None = None


class Webhook(WebhookStep):
    compensate: Action | None = None


class Http(HttpStep):
    compensate: Action | None = None


class Condition(ConditionStep):
    compensate: Action | None = None


Step = Annotated[Summarize | Email | Webhook | Http | Condition, Field(discriminator="type")]


class Workflow(BaseModel):
    """A workflow as POST/PUT /api/workflows take it."""

    model_config = _Strict
    name: str = Field(min_length=1, max_length=100, pattern=r"^[\w .-]+$")
    enabled: bool = True
    trigger: Annotated[CallEndedTrigger | ScheduleTrigger | ManualTrigger, Field(discriminator="type")]
    steps: list[Step] = Field(min_length=1, max_length=50)

    @model_validator(mode="after")
    def _unique_names(self) -> Workflow:
        names = [s.name for s in self.steps if s.name]
        if len(names) != len(set(names)):
            raise ValueError("step names must be unique")
        return self


def step_name(step: dict[str, Any], idx: int) -> str:
    """A step's name: its own, else "<type>_<index>" (its outputs are found under it in `steps`)."""
    return str(step.get("name") or f"{step['type']}_{idx}")


def next_fire(trigger: dict[str, Any], after: datetime) -> datetime | None:
    """When a schedule trigger fires next, strictly after `after` (timezone-aware), as a UTC time; None when
    its cron never fires (within CRON_HORIZON_YEARS years).

    The cron is read on the trigger's local wall clock, and each wall-clock slot fires once: at its first
    occurrence when clocks go back (01:30 happens twice; the second is not a new slot), and at the instant after
    the gap when they go forward (02:30 that does not exist fires at 03:30). So fire times only ever increase."""
    zone = ZoneInfo(trigger.get("timezone", "UTC"))
    wall = after.astimezone(zone).replace(tzinfo=None)
    try:
        slots = croniter(trigger["cron"], wall, max_years_between_matches=CRON_HORIZON_YEARS)
        for _ in range(1000):  # a repeated hour skips at most 60 one-minute slots
            slot: datetime = slots.get_next(datetime)
            fire = slot.replace(tzinfo=zone, fold=0).astimezone(UTC)
            if fire > after:
                return fire
    except (CroniterError, ValueError, OverflowError):
        return None
    return None  # not reached: one of the next 1000 slots lies after `after`


def matches(trigger: dict[str, Any], call: dict[str, Any]) -> bool:
    """Whether a call.ended trigger's filters all hold for `call`: {"persona", "transport", "end_reason",
    "duration_s": float, "tools": list[str] (names of the tools it called)}."""
    for field in ("persona", "transport", "end_reason"):
        wanted = trigger.get(field)
        if wanted is not None and call.get(field) not in ([wanted] if isinstance(wanted, str) else wanted):
            return False
    duration = call.get("duration_s") or 0.0
    if trigger.get("min_duration_s") is not None and duration < trigger["min_duration_s"]:
        return False
    if trigger.get("max_duration_s") is not None and duration > trigger["max_duration_s"]:
        return False
    return trigger.get("tool_called") is None or trigger["tool_called"] in call.get("tools", [])
