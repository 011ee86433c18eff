"""Where DLP applies: write records before they are stored or journaled, and events before operators see them."""

from __future__ import annotations

import re
from typing import Any

from pono.agent.dlp.engine import DEFAULT_POLICY, DlpPolicy
from pono.agent.dlp.spoken import normalize

# A write record as the storage writer queues it: {"key": idempotency key, "kind", "call_id", "turn", ...}.
Record = dict[str, Any]

# Events whose text an operator sees; agent deltas are redacted as the text accumulated so far, since a
# card number can arrive split across several deltas.
TEXT_EVENTS = ("transcript.partial", "transcript.final", "agent.final")
TOOL_EVENTS = ("tool.call", "tool.result")


def redact_records(records: list[Record], policies: dict[str, DlpPolicy]) -> list[Record]:
    """Blocking (about a millisecond per turn): run it in a worker thread.

    `policies` maps a call id to its policy (DEFAULT_POLICY for calls not in it). Turn texts are replaced by
    their redacted form, tool arguments and results have every string redacted, and each finding becomes a
    "dlp_finding" record of its own, right after its turn. Records already marked "redacted" pass unchanged.
    """
    out: list[Record] = []
    for rec in records:
        if rec["kind"] == "tool_call" and not rec.get("redacted"):
            policy = policies.get(rec["call_id"], DEFAULT_POLICY)
            out.append({**rec, "arguments": _redact_json(rec["arguments"], policy),
                        "result": _redact_json(rec["result"], policy), "redacted": True})
            continue
        if rec["kind"] != "turn" or rec.get("redacted"):
            out.append(rec)
            continue
        policy = policies.get(rec["call_id"], DEFAULT_POLICY)
        # Storage always redacts; block_and_warn is about what reaches the LLM, not what is kept.
        result = policy.scan(rec["text"], "redact" if policy.action == "block_and_warn" else None)
        out.append({**rec, "text": result.text, "redacted": True})
        for f in result.findings:
            out.append({"key": f"{rec['call_id']}:{rec['turn']}:dlp:{f.start}:{f.entity_type}",
                        "kind": "dlp_finding", "call_id": rec["call_id"], "turn": rec["turn"],
                        "entity_type": f.entity_type, "start": f.start, "end": f.end, "action": f.action,
                        "recognizer": f.recognizer})
    return out


def _redact_json(value: Any, policy: DlpPolicy) -> Any:
    """Tool arguments and results are JSON: redact every string in them, keep the structure."""
    if isinstance(value, str):
        return policy.scan(value, "redact").text
    if isinstance(value, list):
        return [_redact_json(v, policy) for v in value]
    if isinstance(value, dict):
        return {k: _redact_json(v, policy) for k, v in value.items()}
    return value


_DIGIT_RUN = re.compile(r"\d(?:[\s.-]?\d){3,}")


def mask_digit_runs(text: str) -> str:
    """Unfinished text (a partial transcript, a reply still streaming) may hold the first half of a card
    number that no recognizer can validate yet: every run of 4+ digits, written or spoken, is masked."""
    normalized = normalize(text)
    spans = [normalized.span(m.start(), m.end()) for m in _DIGIT_RUN.finditer(normalized.text)]
    out, pos = [], 0
    for start, end in spans:
        if start < pos:
            continue
        out.append(text[pos:start])
        out.append("[digits]")
        pos = end
    out.append(text[pos:])
    return "".join(out)


def redact_event(event: dict[str, Any], policy: DlpPolicy | None, agent_text: dict[int, str]) -> dict[str, Any]:
    """The operator's copy of an event (a JSON dict), with personal data redacted. Blocking: run it in a worker
    thread. `policy` None means DEFAULT_POLICY; `agent_text` (turn → agent text so far) is updated by deltas."""
    policy = policy if policy is not None else DEFAULT_POLICY
    kind = event.get("type")
    if kind == "agent.delta":
        turn = event.get("turn") or 0
        agent_text[turn] = agent_text.get(turn, "") + str(event.get("text", ""))
        text = mask_digit_runs(policy.scan(agent_text[turn], "redact").text)
        return {**event, "text": text, "cumulative": True}
    if kind in TOOL_EVENTS:
        return {k: _redact_json(v, policy) if k in ("arguments", "result", "error") else v for k, v in event.items()}
    if kind in TEXT_EVENTS and event.get("text"):
        if kind == "agent.final":
            agent_text.pop(event.get("turn") or 0, None)
        result = policy.scan(str(event["text"]), "redact")
        text = mask_digit_runs(result.text) if kind == "transcript.partial" else result.text
        if kind != "transcript.partial" and result.findings:
            # Operators learn what kind of data was said, never the value.
            return {**event, "text": text, "dlp": sorted({f.entity_type for f in result.findings})}
        return {**event, "text": text}
    return event
