"""What call set-up needs from the application, as Protocols: signalling never imports the composition root.

The app stores its services object under `SIGNALING` (pono/app.py); anything with these attributes will do,
which keeps call set-up testable on its own and the import rule (tests/test_layout.py) honest.
"""

from __future__ import annotations

from typing import Any, Protocol

from aiohttp import web

from pono.agent.personas import Persona
from pono.auth import TokenSigner
from pono.settings import Settings
from pono.signaling.phone.calls import CallHost, ModelsState
from pono.storage.control import ControlBus
from pono.storage.live import LiveState


class CallDesk(CallHost, Protocol):
    """The CallManager as call set-up sees it: CallHost plus persona lookup by name and hang-up."""

    async def persona(self, ref: str | None) -> Persona:
        """The persona a new call asked for (or the default). Raises UnknownPersona, PersonaUnavailable."""
        ...

    async def hang_up(self, call_id: str, reason: str = "hangup") -> bool:
        """End a call held by this replica; False when it holds no such call."""
        ...


class LiveStorage(Protocol):
    live: LiveState | None


class SignalingServices(Protocol):
    """The application's services that call set-up reads (pono.context.Services has them all)."""

    settings: Settings
    models: ModelsState  # the speech models: no call before they are loaded
    calls: CallDesk
    signer: TokenSigner  # replaced at start-up by one keyed with the replicas' shared secret
    storage: LiveStorage
    control: ControlBus | None


SIGNALING: web.AppKey[Any] = web.AppKey("signaling")
