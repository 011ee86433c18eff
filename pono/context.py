"""What request handlers share: one Services object stored on the aiohttp application."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from aiohttp import web

from pono.agent.llm import LLMClient
from pono.auth import TokenSigner
from pono.calls import CallManager
from pono.metrics import Metrics
from pono.settings import Settings
from pono.signaling.phone.server import SipServer
from pono.storage.control import ControlBus
from pono.storage.service import Storage
from pono.storage.verifier import Authenticator
from pono.voice.models import SpeechModels


@dataclass
class Services:
    settings: Settings
    models: SpeechModels
    llm: LLMClient
    metrics: Metrics
    calls: CallManager
    signer: TokenSigner
    metrics_token: str
    storage: Storage
    auth: Authenticator
    startup_complete: bool = False
    startup_error: str | None = None
    llm_reachable: bool = False
    control: ControlBus | None = None  # operator actions, routed to the replica holding the call
    sip: SipServer | None = None  # when PONO_SIP_PORT is set
    call_tokens: dict[str, str] = field(default_factory=dict)  # call id → token id that opened it
    _spent_tokens: dict[str, int] = field(default_factory=dict)  # token id → expiry

    def spend_call_token(self, token_id: str, expires: int) -> bool:
        """Mark a call token used; False if it already opened a call. A token opens one call only."""
        now = time.time()
        for old in [t for t, exp in self._spent_tokens.items() if exp < now]:
            del self._spent_tokens[old]
        for call_id in [c for c in self.call_tokens if c not in self.calls.calls]:
            del self.call_tokens[call_id]
        if token_id in self._spent_tokens:
            return False
        self._spent_tokens[token_id] = expires
        return True


SERVICES = web.AppKey("services", Services)
