"""What a workflow is: its JSON, checked before it is stored (pydantic), and what its trigger and cron mean.

    {"name": "follow-up", "trigger": {"type": "call.ended"},
     "steps": [{"type": "summarize"},
               {"type": "email", "to": "ops@example.com", "subject": "Call {{call.id}}", "body": "{{summary}}"}]}

Triggers: `call.ended` (optional filters: persona, transport, end_reason, min/max duration, tool_called),
`schedule` (`cron`, five fields, in `timezone`), `manual`. Steps run in order; each may set `name`, `timeout_s`,
`retries`, `backoff_s` and `compensate` (a step run, in reverse order, when a later step fails for good).
Templates are Jinja2 (sandboxed, see pono.jobs.templates); conditions are simpleeval expressions.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Annotated, Any, Literal
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from croniter import croniter
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, model_validator
from simpleeval import SimpleEval

from pono.jobs.templates import check_template

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
    try:
        SimpleEval().parse(value)
    except SyntaxError as exc:
        raise ValueError(f"not an expression: {exc.msg}") from None
    return value


def _timezone(value: str) -> str:
    try:
        ZoneInfo(value)
    except (ZoneInfoNotFoundError, ValueError):
        raise ValueError(f"unknown time zone {value!r}") from None
    return value


def _cron(value: str) -> str:
    if len(value.split()) != 5 or not croniter.is_valid(value):
        raise ValueError(f"not a five-field cron expression: {value!r}")
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
    cron: Annotated[str, AfterValidator(_cron)]
    timezone: Annotated[str, AfterValidator(_timezone)] = "UTC"


class ManualTrigger(BaseModel):
    model_config = _Strict
    type: Literal["manual"]


class StepBase(BaseModel):
    model_config = _Strict
    name: str | None = Field(default=None, max_length=100, pattern=r"^[A-Za-z_][A-Za-z0-9_]*$")
    timeout_s: float = Field(default=30.0, gt=0, le=600)
    retries: int = Field(default=2, ge=0, le=10)  # extra tries after a failure that may pass (not a 4xx)
    backoff_s: float = Field(default=1.0, ge=0, le=300)  # before the first retry; doubled for each next


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
    secret_env: str = "PONO_WEBHOOK_SECRET"
    payload: Annotated[dict[str, Any] | None, AfterValidator(_templates)] = None


class HttpStep(StepBase):
    """A JSON request to a CRM-like endpoint; `map` copies response fields (dotted paths) into the context."""

    type: Literal["http"]
    method: Literal["GET", "POST", "PUT", "PATCH", "DELETE"] = "POST"
    url: Template
    body: Annotated[Any, AfterValidator(_templates)] = None
    map: dict[str, str] = Field(default_factory=dict)


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


def next_fire(trigger: dict[str, Any], after: datetime) -> datetime:
    """When a schedule trigger fires next after `after` (timezone-aware): the cron read in the trigger's time
    zone, as a UTC time."""
    zone = ZoneInfo(trigger.get("timezone", "UTC"))
    local = after.astimezone(zone)
    fire: datetime = croniter(trigger["cron"], local).get_next(datetime)
    return fire.astimezone(UTC)


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
