"""Workflows: list, read (viewer); create, replace, delete (admin, audited; deleting cancels its runs); their
runs (viewer); a run by hand, the retry of a failed or cancelled run and the cancel of a queued or running one
(operator, audited). A workflow body is checked whole (pono.jobs.definition) before it is stored: malformed
JSON is a 400; an unknown step type, a cron that never fires, a bad time zone, a template or condition that
reaches out of its sandbox, a secret outside the allowed variables or a URL that is not http(s) a 422 naming
the field."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from typing import Any

import asyncpg
from aiohttp import web
from pydantic import BaseModel, ConfigDict, Field

from pono.http import ApiError, read_json_model
from pono.jobs.definition import Workflow, next_fire
from pono.jobs.triggers import run_by_hand
from pono.storage import workflow_runs as runs
from pono.storage import workflows as stored
from pono.storage.audit import write_audit
from pono.web.access import require
from pono.web.params import database, decode_cursor, iso, page_limit, paginate, path_uuid

RUN_STATUSES = ("queued", "running", "succeeded", "failed", "cancelled")


def workflow_json(workflow: dict[str, Any]) -> dict[str, Any]:
    """A workflow as the API shows it: {"id", "name", "enabled", "trigger", "steps", "next_fire_at",
    "created_at", "updated_at"}."""
    definition = workflow["definition"]
    return {"id": workflow["id"], "name": workflow["name"], "enabled": workflow["enabled"],
            "trigger": definition["trigger"], "steps": definition["steps"],
            "next_fire_at": iso(workflow["next_fire_at"]),
            "created_at": iso(workflow["created_at"]), "updated_at": iso(workflow["updated_at"])}


def run_json(run: dict[str, Any], steps: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    """A run as the API shows it (input, outputs and errors as stored: redacted), with its step runs when
    given. `cancel_reason`: set once a cancel was asked for (the run is "cancelled" when its runner stopped)."""
    body = {"id": run["id"], "workflow_id": run["workflow_id"], "workflow": run["workflow"], "call_id": run["call_id"],
            "trigger": run["trigger"], "status": run["status"], "execution": run["execution"],
            "attempts": run["attempts"], "error": run["error"], "input": run["input"],
            "cancel_reason": run["cancel_reason"], "workflow_deleted": run["workflow_deleted"],
            "created_at": iso(run["created_at"]), "started_at": iso(run["started_at"]),
            "finished_at": iso(run["finished_at"])}
    if steps is not None:
        body["steps"] = [{**s, "started_at": iso(s["started_at"]), "finished_at": iso(s["finished_at"])}
                         for s in steps]
    return body


async def runs_with_steps(pool: asyncpg.Pool, found: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Runs as the API shows them, each with its step runs."""
    return [run_json(r, await runs.step_runs(pool, r["id"])) for r in found]


async def list_workflows(request: web.Request) -> web.Response:
    """GET /api/workflows?limit=&cursor= (viewer, workflows): oldest first."""
    await require(request, "viewer", "workflows")
    limit = page_limit(request)
    rows = await stored.list_workflows(database(request), decode_cursor(request.query.get("cursor")), limit + 1)
    page, next_cursor = paginate(rows, limit, "created_at")
    return web.json_response({"workflows": [workflow_json(w) for w in page], "next_cursor": next_cursor})


async def get_workflow(request: web.Request) -> web.Response:
    """GET /api/workflows/{workflow_id} (viewer, workflows)."""
    await require(request, "viewer", "workflows")
    workflow_id = path_uuid(request, "workflow_id", "workflow")
    workflow = await stored.get_workflow(database(request), workflow_id)
    if workflow is None:
        raise ApiError(404, f"no workflow {workflow_id}")
    return web.json_response(workflow_json(workflow))


async def _save(request: web.Request, workflow_id: uuid.UUID | None) -> web.Response:
    who = await require(request, "admin", "workflows")
    body = await read_json_model(request, Workflow)
    definition = body.model_dump(mode="json", by_alias=True, exclude_none=True, include={"trigger", "steps"})
    trigger = definition["trigger"]
    values = {"name": body.name, "definition": definition, "trigger_type": trigger["type"], "enabled": body.enabled,
              "next_fire_at": next_fire(trigger, datetime.now(UTC)) if trigger["type"] == "schedule" else None}
    try:
        workflow = await stored.save_workflow(database(request), workflow_id, values, who.name, request.remote)
    except stored.WorkflowNotFound:
        raise ApiError(404, f"no workflow {workflow_id}") from None
    except asyncpg.UniqueViolationError:
        raise ApiError(409, f"a workflow named {body.name!r} already exists") from None
    return web.json_response(workflow_json(workflow), status=201 if workflow_id is None else 200)


async def create_workflow(request: web.Request) -> web.Response:
    """POST /api/workflows (admin, workflows): a workflow (pono.jobs.definition.Workflow); 201, 409 on a taken name."""
    return await _save(request, None)


async def update_workflow(request: web.Request) -> web.Response:
    """PUT /api/workflows/{workflow_id} (admin, workflows): replaces it whole; runs already made keep the
    definition they started with. 404, 409."""
    return await _save(request, path_uuid(request, "workflow_id", "workflow"))


async def delete_workflow(request: web.Request) -> web.Response:
    """DELETE /api/workflows/{workflow_id} (admin, workflows): 204; it triggers nothing from now on."""
    who = await require(request, "admin", "workflows")
    workflow_id = path_uuid(request, "workflow_id", "workflow")
    try:
        await stored.delete_workflow(database(request), workflow_id, who.name, request.remote)
    except stored.WorkflowNotFound:
        raise ApiError(404, f"no workflow {workflow_id}") from None
    return web.Response(status=204)


def _status(request: web.Request) -> str | None:
    status = request.query.get("status") or None
    if status is not None and status not in RUN_STATUSES:
        raise ApiError(422, "invalid query", fields=[{"field": "status", "message": " or ".join(RUN_STATUSES)}])
    return status


async def list_runs(request: web.Request) -> web.Response:
    """GET /api/workflows/{workflow_id}/runs?status=&limit=&cursor= (viewer, workflows): newest first, each
    with its step runs (status, attempts, timings, redacted outputs and errors)."""
    await require(request, "viewer", "workflows")
    workflow_id = path_uuid(request, "workflow_id", "workflow")
    pool = database(request)
    if await stored.get_workflow(pool, workflow_id) is None:
        raise ApiError(404, f"no workflow {workflow_id}")
    return await _runs_page(request, pool, workflow_id)


async def all_runs(request: web.Request) -> web.Response:
    """GET /api/workflow-runs?status=&call_id=&limit=&cursor= (viewer, workflows): every workflow's runs (or one
    call's), newest first."""
    await require(request, "viewer", "workflows")
    return await _runs_page(request, database(request), None, request.query.get("call_id") or None)


async def _runs_page(request: web.Request, pool: asyncpg.Pool, workflow_id: uuid.UUID | None,
                     call_id: str | None = None) -> web.Response:
    limit = page_limit(request)
    found = await runs.list_runs(pool, workflow_id=workflow_id, call_id=call_id, status=_status(request),
                                 before=decode_cursor(request.query.get("cursor")), count=limit + 1)
    page, next_cursor = paginate(found, limit, "created_at")
    return web.json_response({"runs": await runs_with_steps(pool, page), "next_cursor": next_cursor})


class ManualRun(BaseModel):
    """POST /api/workflows/{id}/runs: on which call (optional), with what `input` (stored and shown redacted)."""

    model_config = ConfigDict(extra="forbid")
    call_id: str | None = Field(default=None, max_length=200)
    input: dict[str, Any] = Field(default_factory=dict)


async def start_run(request: web.Request) -> web.Response:
    """POST /api/workflows/{workflow_id}/runs (operator, workflows): {"call_id"?, "input"?} → 202 with the queued
    run (any workflow may be run by hand; on a stored call when `call_id` is given). Audited."""
    who = await require(request, "operator", "workflows")
    workflow_id = path_uuid(request, "workflow_id", "workflow")
    body = await read_json_model(request, ManualRun)
    pool = database(request)
    workflow = await stored.get_workflow(pool, workflow_id)
    if workflow is None:
        raise ApiError(404, f"no workflow {workflow_id}")
    try:
        run_id = await run_by_hand(pool, workflow, body.call_id, body.input)
    except asyncpg.ForeignKeyViolationError:
        raise ApiError(422, "invalid request body", fields=[{"field": "call_id", "message": "no such call"}]) \
            from None
    await write_audit(pool, who.name, "workflow.run", run_id, request.remote, workflow=str(workflow_id))
    run = await runs.get_run(pool, run_id)
    assert run is not None
    return web.json_response(run_json(run, []), status=202)


async def retry_run(request: web.Request) -> web.Response:
    """POST /api/workflows/{workflow_id}/runs/{run_id}/retry (operator, workflows): a failed or cancelled run
    runs again, all its steps, as a new execution → 202; 409 when it has neither failed nor been cancelled, or
    its workflow was deleted. Audited."""
    who = await require(request, "operator", "workflows")
    workflow_id = path_uuid(request, "workflow_id", "workflow")
    run_id = path_uuid(request, "run_id", "run")
    pool = database(request)
    run = await runs.get_run(pool, run_id)
    if run is None or run["workflow_id"] != str(workflow_id):
        raise ApiError(404, f"no run {run_id} of workflow {workflow_id}")
    try:
        run = await runs.retry_run(pool, run_id, who.name, request.remote)
    except runs.RunNotRetryable as exc:
        raise ApiError(409, f"only a failed or cancelled run of a live workflow can be retried; this one is {exc}") \
            from None
    return web.json_response(run_json(run, await runs.step_runs(pool, run["id"])), status=202)


async def cancel_run(request: web.Request) -> web.Response:
    """POST /api/workflow-runs/{run_id}/cancel (operator, workflows): a queued run is cancelled at once; a running
    one stops at its next await, after the compensations of its steps done → 202 with the run (its
    `cancel_reason` set); 409 when it has already ended. Audited."""
    who = await require(request, "operator", "workflows")
    run_id = path_uuid(request, "run_id", "run")
    pool = database(request)
    try:
        run = await runs.cancel_run(pool, run_id, who.name, request.remote)
    except LookupError:
        raise ApiError(404, f"no run {run_id}") from None
    except runs.RunNotCancellable as exc:
        raise ApiError(409, f"only a queued or running run can be cancelled; this one is {exc}") from None
    return web.json_response(run_json(run, await runs.step_runs(pool, run["id"])), status=202)
