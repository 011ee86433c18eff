"""DLP across turns: personal data that arrives in pieces ("my card is four one one one" … "one one one one")
is found in the recent turns of one speaker read together, and redacted in each turn that holds a piece.

A per-turn scan never sees a card number spoken over several turns. The window joins the speaker's last turns
(at most `max_turns`, none older than `max_age_s`) with spaces, scans the joined text, and reports each
finding that crosses a turn boundary as a redaction of every turn it touches. Redacted turns stay redacted in
the window, so a finding is reported once.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from pono.agent.dlp.engine import DlpPolicy, Finding


@dataclass
class _Turn:
    turn: int
    text: str
    at: float  # seconds, any monotonic clock


@dataclass
class CrossTurnRedaction:
    """What a cross-turn finding changes: `texts` maps each touched turn to its redacted text; `findings`
    are (turn, Finding with offsets in that turn's *original* text) — one per piece, never the value."""

    texts: dict[int, str] = field(default_factory=dict)
    findings: list[tuple[int, Finding]] = field(default_factory=list)


class SpeakerWindow:
    """The recent turns of one speaker, scanned together with the call's DLP policy.

    `add()` is blocking (a DLP scan of a few hundred characters, about a millisecond): run it in a worker
    thread. It is not thread-safe: one call's turns are added one at a time, in order.
    """

    def __init__(self, policy: DlpPolicy, *, max_turns: int = 6, max_age_s: float = 120.0) -> None:
        self.policy = policy
        self.max_age_s = max_age_s
        self._turns: deque[_Turn] = deque(maxlen=max_turns)

    def add(self, turn: int, text: str, at: float) -> CrossTurnRedaction | None:
        """Add the speaker's turn `turn` said at time `at`; return the redactions a finding across turns
        needs (None when there is none)."""
        while self._turns and at - self._turns[0].at > self.max_age_s:
            self._turns.popleft()
        self._turns.append(_Turn(turn, text, at))
        if len(self._turns) < 2:
            return None
        spans: list[tuple[_Turn, int, int]] = []
        pos = 0
        for t in self._turns:
            spans.append((t, pos, pos + len(t.text)))
            pos += len(t.text) + 1
        joined = " ".join(t.text for t in self._turns)
        crossing = [f for f in self.policy.scan(joined, "redact").findings
                    if sum(1 for _, s, e in spans if f.start < e and f.end > s) > 1]
        if not crossing:
            return None
        out = CrossTurnRedaction()
        for t, s, e in spans:
            pieces = [(max(f.start, s) - s, min(f.end, e) - s, f) for f in crossing if f.start < e and f.end > s]
            if not pieces:
                continue
            redacted, cursor = [], 0
            for start, end, f in pieces:
                redacted += [t.text[cursor:start], f"[{f.entity_type}]"]
                cursor = end
                out.findings.append((t.turn, Finding(f.entity_type, start, end, f.action, f.recognizer + "+window")))
            redacted.append(t.text[cursor:])
            t.text = "".join(redacted)
            out.texts[t.turn] = t.text
        return out
