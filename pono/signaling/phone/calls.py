"""What the phone signalling needs from whoever runs calls (in the app, the CallManager), as a Protocol,
so that signalling does not import the composition root."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Mapping
from typing import Any, Protocol

from pono.agent.personas import Persona
from pono.transport import Transport


class CallEvents(Protocol):
    def subscribe(self, callback: Callable[[Any], None]) -> Any: ...


class RunningCall(Protocol):
    """A started call: its event stream, and why it ended (set before hanging up to record the reason)."""

    events: CallEvents
    end_reason: str


class ModelsState(Protocol):
    loaded: asyncio.Event  # set once the speech models are loaded


class CallHost(Protocol):
    """Starts and tracks calls. `calls` maps Pono's call id to the running call."""

    draining: bool  # shutting down: take no new calls

    @property
    def models(self) -> ModelsState: ...

    @property
    def calls(self) -> Mapping[str, RunningCall]: ...

    @property
    def full(self) -> bool: ...

    def new_call_id(self) -> str:
        """A fresh call id (uuid hex): what storage, the console and the logs know the call by."""
        ...

    def start(self, call_id: str, transport: Transport, persona: Persona | None = None,
              caller: str | None = None, *, reserved: bool = False) -> RunningCall:
        """Start the call; `reserved`: it takes the place held by `reserve()`."""
        ...

    def reserve(self) -> bool:
        """Hold one of PONO_MAX_CALLS for a call being set up, before the first await; False when full."""
        ...

    def release(self) -> None:
        """Give back a place from `reserve()` whose call never started."""
        ...

    async def persona_for_number(self, dialed: str) -> Persona:
        """The persona answering a dialed number (the default one when none is mapped)."""
        ...
