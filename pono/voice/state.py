"""The call's turn state machine: who has the floor, as the caller and the operators see it.

    listening ──caller speaks──▶ user_speaking ──turn ends──▶ thinking ──first audio──▶ speaking
        ▲                             ▲                                                   │
        └──────────reply done─────────┼───────────────────────────────────────────────────┤
                                      └──────────────────barge-in─────────────────────────┘
    any state ──take over──▶ operator ──hand back──▶ listening

It knows nothing about audio, models or tasks: the call loop reports what happened, the machine decides
the state and tells its observer about every change. While an operator has the call, the state stays
`operator` whatever the caller or a queued utterance does.
"""

from __future__ import annotations

from collections.abc import Callable
from enum import StrEnum


class CallState(StrEnum):
    LISTENING = "listening"
    USER_SPEAKING = "user_speaking"
    THINKING = "thinking"
    SPEAKING = "speaking"
    OPERATOR = "operator"  # taken over: the agent is quiet, an operator talks


class TurnStateMachine:
    """The current `CallState` and who (if anyone) has taken the call over.

    `on_change(state)` is called once per actual change, synchronously; it must not block.
    """

    def __init__(self, on_change: Callable[[CallState], None]) -> None:
        self.state = CallState.LISTENING
        self.operator: str | None = None
        self._on_change = on_change

    def _go(self, state: CallState) -> None:
        if self.operator is not None and state is not CallState.OPERATOR:
            return  # while an operator has the call, that is its state whoever speaks
        if state is not self.state:
            self.state = state
            self._on_change(state)

    def caller_started(self, *, agent_busy: bool) -> None:
        """Speech was confirmed. While the agent talks it is not (yet) a turn: a barge-in decides that."""
        if not agent_busy:
            self._go(CallState.USER_SPEAKING)

    def barge_in(self) -> None:
        """The caller interrupted the agent: the floor is theirs."""
        self._go(CallState.USER_SPEAKING)

    def thinking(self) -> None:
        """A turn ended (or a message arrived) and the agent is working on its answer."""
        self._go(CallState.THINKING)

    def speaking(self) -> None:
        """The agent's first audio of an utterance went out."""
        self._go(CallState.SPEAKING)

    def agent_done(self) -> None:
        """Nothing plays or waits to play: back to listening, unless the caller already has the floor."""
        if self.state in (CallState.THINKING, CallState.SPEAKING):
            self._go(CallState.LISTENING)

    def take_over(self, actor: str) -> None:
        """An operator has the call until `hand_back`."""
        self.operator = actor
        self._go(CallState.OPERATOR)

    def hand_back(self) -> bool:
        """The agent has the call again. Returns False if it was not taken over."""
        if self.operator is None:
            return False
        self.operator = None
        self._go(CallState.LISTENING)
        return True
