"""Every web route, in one list: the HTTP API and WebSockets that are not call set-up, and the static pages.

Call set-up (WebRTC offers, call tokens, provider streams) is routed by pono.signaling; app.py adds both.
Who may call what is in each handler (pono.web.access.require) and tested by tests/test_access.py.
"""

from __future__ import annotations

from aiohttp import web

from pono.web import (
    admin,
    audit,
    auth,
    call_actions,
    calls,
    console,
    dashboard,
    health,
    keys,
    knowledge,
    pages,
    peaks,
    personas,
    phone_numbers,
    recordings,
    reports,
    users,
    workflows,
)


def routes() -> list[web.AbstractRouteDef]:
    """The route definitions for app.router.add_routes."""
    return [
        # probes and metrics
        web.get("/api/health", health.health),
        web.get("/api/startup", health.startup),
        web.get("/api/ready", health.ready),
        web.get("/metrics", health.metrics_endpoint),
        web.post("/api/admin/drain", admin.drain),
        # calls: history, live list, operator actions
        web.get("/api/calls", calls.list_calls),
        web.get("/api/calls/{call_id}", calls.get_call),
        web.get("/api/calls/{call_id}/recording", recordings.get_recording),
        web.get("/api/calls/{call_id}/recording/peaks", peaks.get_peaks),
        web.post("/api/calls/{call_id}/actions", call_actions.call_action),
        # personas and the numbers that reach them
        web.get("/api/personas", personas.list_personas),
        web.post("/api/personas", personas.create_persona),
        web.get("/api/personas/{persona_id}", personas.get_persona),
        web.put("/api/personas/{persona_id}", personas.update_persona),
        web.delete("/api/personas/{persona_id}", personas.delete_persona),
        web.get("/api/phone-numbers", phone_numbers.get_numbers),
        web.put("/api/phone-numbers/{number}", phone_numbers.put_number),
        web.delete("/api/phone-numbers/{number}", phone_numbers.remove_number),
        # accounts
        web.post("/api/auth/login", auth.login),
        web.post("/api/auth/refresh", auth.refresh),
        web.post("/api/auth/logout", auth.logout),
        web.post("/api/auth/password", auth.change_password),
        web.get("/api/auth/me", auth.me),
        web.get("/api/users", users.get_users),
        web.post("/api/users", users.add_user),
        web.delete("/api/users/{user_id}", users.remove_user),
        web.get("/api/keys", keys.get_keys),
        web.post("/api/keys", keys.add_key),
        web.delete("/api/keys/{key_id}", keys.remove_key),
        web.get("/api/audit", audit.get_audit),
        # knowledge
        web.post("/api/knowledge/{collection}/documents", knowledge.add_document),
        web.get("/api/knowledge/{collection}/search", knowledge.search),
        # workflows: post-call, scheduled and manual runs, and their history
        web.get("/api/workflows", workflows.list_workflows),
        web.post("/api/workflows", workflows.create_workflow),
        web.get("/api/workflows/{workflow_id}", workflows.get_workflow),
        web.put("/api/workflows/{workflow_id}", workflows.update_workflow),
        web.delete("/api/workflows/{workflow_id}", workflows.delete_workflow),
        web.get("/api/workflows/{workflow_id}/runs", workflows.list_runs),
        web.post("/api/workflows/{workflow_id}/runs", workflows.start_run),
        web.post("/api/workflows/{workflow_id}/runs/{run_id}/retry", workflows.retry_run),
        web.get("/api/workflow-runs", workflows.all_runs),
        web.post("/api/workflow-runs/{run_id}/cancel", workflows.cancel_run),
        # the nightly reports (the job worker writes them)
        web.get("/api/reports", reports.list_reports),
        web.get("/api/reports/{day}", reports.get_report),
        # the pages and the console's feed
        web.get("/", pages.call_page),
        web.get("/console", pages.console_page),
        web.get("/api/console/ws", console.console_socket),
        web.get("/api/dashboard", dashboard.get_dashboard),
        web.static("/static", pages.STATIC),
    ]
