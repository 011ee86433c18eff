"""What of a call's event stream lasts: events in, idempotent write records out.

Each record carries an idempotency key (call id + turn index + kind); the SQL behind each kind is an
insert that ignores a conflict on that key, so a replayed or retried record never duplicates a row.
"""

from __future__ import annotations

from typing import Any

from pono.events import CallEvent, EventType
from pono.storage.jobs import CALL_ENDED, job_record

Record = dict[str, Any]


def record(kind: str, call_id: str, turn: int | None, **data: Any) -> Record:
    return {"key": f"{call_id}:{'' if turn is None else turn}:{kind}", "kind": kind, "call_id": call_id,
            "turn": turn, **data}


class CallRecorder:
    """Turns one call's events into records; keeps the little state that spans events (start times,
    latency marks that arrive before the turn they belong to)."""

    def __init__(self, replica: str, caller: str | None = None) -> None:
        self.replica = replica
        self.caller = caller
        self._speech_started: float | None = None
        self._agent_started: dict[int, float] = {}
        self._latency: dict[int, dict[str, float]] = {}

    def __call__(self, event: CallEvent) -> Record | list[Record] | None:
        t, d = event.type, event.data
        if t is EventType.CALL_STARTED:
            return record("call_started", event.call_id, None, transport=d.get("transport"),
                          persona=d.get("persona"), caller=d.get("caller", self.caller), replica=self.replica,
                          at=event.ts)
        if t is EventType.SPEECH_STARTED:
            self._speech_started = event.ts
        elif t is EventType.AGENT_DELTA and event.turn is not None:
            self._agent_started.setdefault(event.turn, event.ts)
        elif t is EventType.LATENCY and event.turn is not None:
            self._latency[event.turn] = dict(d.get("marks", {}))
        elif t is EventType.TRANSCRIPT_FINAL and d.get("text") and event.turn is not None:
            started = self._speech_started if d.get("source") == "voice" else event.ts
            self._speech_started = None
            return record("turn", event.call_id, event.turn, role="user", text=d["text"], source=d.get("source"),
                          started_at=started or event.ts, ended_at=event.ts, interrupted=False, latency={})
        elif t is EventType.AGENT_FINAL and event.turn is not None:
            return record("turn", event.call_id, event.turn, role="agent", text=d.get("text", ""), source="agent",
                          started_at=self._agent_started.pop(event.turn, event.ts), ended_at=event.ts,
                          interrupted=bool(d.get("interrupted")), latency=self._latency.pop(event.turn, {}),
                          truncated=bool(d.get("truncated")))
        elif t is EventType.TOOL_RESULT and event.turn is not None:
            return record("tool_call", event.call_id, event.turn, tool_call_id=d["id"], name=d["name"],
                          arguments=d.get("arguments"), result=d.get("result"), error=d.get("error"),
                          duration_ms=d.get("duration_ms")) | {"key": f"{event.call_id}:{event.turn}:tool:{d['id']}"}
        elif t is EventType.DLP_REDACTED:
            # Earlier turns held pieces of personal data: their stored text is replaced, and each piece is a
            # finding of its turn (offsets only).
            out = [record("turn_text", event.call_id, int(turn), text=text) | {
                       "key": f"{event.call_id}:{turn}:retext:{event.turn}"} for turn, text in d["turns"].items()]
            out += [record("dlp_finding", event.call_id, f["turn"], entity_type=f["entity_type"], start=f["start"],
                           end=f["end"], action=f["action"], recognizer=f["recognizer"]) | {
                        "key": f"{event.call_id}:{f['turn']}:dlp:{f['start']}:{f['entity_type']}"}
                    for f in d["findings"]]
            return out
        elif t is EventType.CALL_ENDED:
            # The post-call trigger is a job written with the call's end (journaled with it while Postgres is away).
            return [record("call_ended", event.call_id, None, reason=d.get("reason"), at=event.ts),
                    job_record(CALL_ENDED, f"{event.call_id}::job:call_ended", call_id=event.call_id)]
        return None
