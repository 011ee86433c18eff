"""What an operator may do to a live call: make the agent say something, take the call over and hand it
back. The call is given one `OperatorControls`; the console and the control bus reach it as `call.operator`
on the replica that holds the call."""

from __future__ import annotations

import numpy as np

from pono.events import EventStream, EventType
from pono.transport import Transport
from pono.voice.responder import Responder
from pono.voice.scheduler import Priority, SpeechHandle
from pono.voice.state import TurnStateMachine


class OperatorControls:
    """Operator actions on one call: `say`, `take_over`, `hand_back` and the taking-over operator's audio."""

    def __init__(self, events: EventStream, transport: Transport, responder: Responder,
                 state: TurnStateMachine) -> None:
        self.events = events
        self.transport = transport
        self.responder = responder
        self.state = state

    @property
    def taken_over_by(self) -> str | None:
        """The operator who has the call, or None while the agent has it."""
        return self.state.operator

    def say(self, text: str, actor: str) -> SpeechHandle:
        """The agent speaks the operator's words next: after the utterance in play, before queued replies,
        in the agent's voice. Returns the handle, whose playout can be awaited."""
        self.events.emit(EventType.OPERATOR, action="say", actor=actor)
        return self.responder.say(text, kind="operator", priority=Priority.HIGH)

    async def take_over(self, actor: str) -> None:
        """The agent stops and stays quiet; the caller is still transcribed. Audio comes from the operator."""
        self.state.take_over(actor)
        await self.responder.interrupt("operator_takeover", force=True)
        self.events.emit(EventType.OPERATOR, action="take_over", actor=actor)

    def hand_back(self, actor: str) -> None:
        """The agent has the call again; nothing happens if nobody had taken it over."""
        if self.state.hand_back():
            self.events.emit(EventType.OPERATOR, action="hand_back", actor=actor)

    async def operator_audio(self, frame: np.ndarray) -> None:
        """A 16 kHz int16 frame of the operator's voice, straight to the caller, while the call is taken over."""
        if self.state.operator is not None:
            await self.transport.send_audio(frame, 16_000)
