"""What an operator may do to a live call: make the agent say something, take the call over and hand it
back. Mixed into Call; the console and the control bus call these on the replica that holds the call."""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

import numpy as np

from pono.events import EventStream, EventType

_SAY_WAIT_S = 30.0  # "say" waits for the agent to finish its sentence, but not for ever


class OperatorControls:
    # Provided by Call.
    events: EventStream
    transport: Any
    _reply_task: asyncio.Task[None] | None
    taken_over_by: str | None

    def _start_reply(self, **kwargs: Any) -> asyncio.Task[None]:
        raise NotImplementedError

    async def _cancel_reply(self, reason: str) -> None:
        raise NotImplementedError

    def _set_state(self, state: Any) -> None:
        raise NotImplementedError

    async def say(self, text: str, actor: str) -> None:
        """The agent speaks the operator's words next: after the sentence in flight, in the agent's voice."""
        self.events.emit(EventType.OPERATOR, action="say", actor=actor)
        current = self._reply_task
        if current is not None:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(current), _SAY_WAIT_S)
        self._start_reply(greeting=text)

    async def take_over(self, actor: str) -> None:
        """The agent stops and stays quiet; the caller is still transcribed. Audio comes from the operator."""
        self.taken_over_by = actor
        await self._cancel_reply(reason="operator_takeover")
        self.events.emit(EventType.OPERATOR, action="take_over", actor=actor)
        self._set_state("operator")

    def hand_back(self, actor: str) -> None:
        if self.taken_over_by is None:
            return
        self.taken_over_by = None
        self.events.emit(EventType.OPERATOR, action="hand_back", actor=actor)
        self._set_state("listening")

    async def operator_audio(self, frame: np.ndarray) -> None:
        """A 16 kHz frame of the operator's voice, straight to the caller, while the call is taken over."""
        if self.taken_over_by is not None:
            await self.transport.send_audio(frame, 16_000)
