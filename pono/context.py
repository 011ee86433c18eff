"""What request handlers share: one Services object stored on the aiohttp application."""

from __future__ import annotations

from dataclasses import dataclass

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


SERVICES = web.AppKey("services", Services)
