"""The calls this process holds: start each call's loop, wire its observers, and free it when it ends."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid

from pono.agent.conversation import Conversation
from pono.agent.dlp.apply import redact_event
from pono.agent.dlp.engine import DEFAULT_POLICY, DlpPolicy
from pono.agent.llm import LLMClient
from pono.agent.personas import Persona, PersonaUnavailable, UnknownPersona, normalize_number
from pono.agent.tools.specs import build_registry
from pono.caller_view import CallerView
from pono.events import CallEvent, EventType
from pono.logs import call_context
from pono.metrics import Metrics
from pono.recordings import Recordings
from pono.settings import Settings
from pono.storage.db import CONNECTION_ERRORS
from pono.storage.numbers import persona_id_for_number
from pono.storage.personas import find_persona
from pono.storage.service import Storage
from pono.tracing import CallTracing
from pono.transport import Transport
from pono.voice.call import Call
from pono.voice.models import SpeechModels
from pono.voice.tap import TappedTransport
from pono.voice.turns import TurnConfig

log = logging.getLogger(__name__)

DRAIN_GOODBYE = "This line has to close now for maintenance. Please call again in a moment. Goodbye."


class CallManager:
    def __init__(self, settings: Settings, models: SpeechModels, llm: LLMClient, metrics: Metrics,
                 storage: Storage | None = None, tracing: CallTracing | None = None) -> None:
        self.settings = settings
        self.tracing = tracing
        self.storage = storage
        self.models = models
        self.llm = llm
        self.metrics = metrics
        self.calls: dict[str, Call] = {}
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self._views: dict[str, CallerView] = {}
        self.draining = False
        self._reserved = 0  # places held by calls still being set up
        self._no_calls = asyncio.Event()  # set when the last call ends (the drain waits for it)
        self.recordings = Recordings(settings, storage, models)

    @property
    def full(self) -> bool:
        """True when live calls plus calls being set up (reserved) fill PONO_MAX_CALLS."""
        return len(self.calls) + self._reserved >= self.settings.max_calls

    def reserve(self) -> bool:
        """Hold a place for a call being set up, before the first await; False when full.

        Checking `full` and starting the call later would let concurrent set-ups all pass the check. The
        place is given back by `start(..., reserved=True)` or `release()`."""
        if self.full or self.draining:
            return False
        self._reserved += 1
        return True

    def release(self) -> None:
        """Give back a place from `reserve()` whose call was never started (a bad offer, an error)."""
        self._reserved = max(0, self._reserved - 1)

    def new_call_id(self) -> str:
        return uuid.uuid4().hex

    async def persona(self, ref: str | None) -> Persona:
        """The persona a new call asked for: `ref` is an id or a name, None the default.

        Raises UnknownPersona when there is none. With Postgres unreachable, the last-known copy (Redis, then this
        process) is used; with none, PersonaUnavailable, except for the default (None), which then falls back to
        the configured persona. Each successful load refreshes the last-known copy.
        """
        if self.storage is None or self.storage.db is None:
            return Persona.from_settings(self.settings)
        try:
            found = await find_persona(self.storage.db.pool, ref)
        except CONNECTION_ERRORS as exc:
            return await self._last_known(ref, type(exc).__name__)
        if found is None:
            raise UnknownPersona(ref or "default")
        await self.storage.persona_cache.remember(found)
        return Persona.from_record(found)

    async def persona_for_number(self, dialed: str) -> Persona:
        """The persona a dialed number maps to (the default when none). Raises UnknownPersona; with Postgres
        unreachable, the last-known mapping and persona, or PersonaUnavailable for a number never seen."""
        if self.storage is None or self.storage.db is None:
            return Persona.from_settings(self.settings)
        number, pool, cache = normalize_number(dialed), self.storage.db.pool, self.storage.persona_cache
        try:
            persona_id = await persona_id_for_number(pool, number)
            found = await find_persona(pool, persona_id)
        except CONNECTION_ERRORS as exc:
            known, persona_id = await cache.recall_number(number)
            if not known:
                log.warning("personas unavailable (%s) and number %s never seen: refused", type(exc).__name__,
                            number)
                raise PersonaUnavailable(f"the persona of {number}") from None
            return await self._last_known(persona_id, type(exc).__name__)
        if found is None:
            raise UnknownPersona(persona_id or "default")
        await cache.remember_number(number, persona_id)
        await cache.remember(found)
        return Persona.from_record(found)

    async def _last_known(self, ref: str | None, why: str) -> Persona:
        """Postgres is unreachable: the persona's last-known copy, the configured one for the default when none
        is known, else PersonaUnavailable."""
        assert self.storage is not None
        cached = await self.storage.persona_cache.recall(ref)
        if cached is not None:
            log.warning("personas unavailable (%s): using the last-known copy of %s", why, cached["name"])
            return Persona.from_record(cached)
        if ref is None:
            log.warning("personas unavailable (%s) and no default known: using the configured one", why)
            return Persona.from_settings(self.settings)
        log.warning("personas unavailable (%s) and no copy of %r: refused", why, ref[:60])
        raise PersonaUnavailable(ref)

    def start(self, call_id: str, transport: Transport, persona: Persona | None = None,
              caller: str | None = None, *, reserved: bool = False) -> Call:
        """Start a call's loop on `transport` and wire its observers. `reserved`: a place taken with
        `reserve()` becomes this call's."""
        if reserved:
            self.release()
        s = self.settings
        persona = persona or Persona.from_settings(s)
        transport = TappedTransport(transport)  # operators may listen in
        tools, mcp_servers = build_registry(persona.tools, s.webhook_allowed_hosts, mcp_servers=s.mcp_servers,
                                            max_response_bytes=s.webhook_max_response_bytes)
        turn_taking = persona.turn_taking
        llm_options = {"model": persona.llm_model or None,
                       "temperature": persona.llm_params.get("temperature"),
                       "max_tokens": persona.llm_params.get("max_tokens")}
        call = Call(
            call_id,
            transport,
            self.models,
            self.llm,
            Conversation(persona.system_prompt),
            TurnConfig(threshold=s.vad_threshold,
                       min_speech_ms=turn_taking.get("min_speech_ms", s.min_speech_ms),
                       hangover_ms=turn_taking.get("hangover_ms", s.hangover_ms),
                       max_utterance_ms=int(s.max_utterance_s * 1000),
                       # The model's answer needs the model: a persona may turn it off, not on where it isn't.
                       end_of_turn=(s.end_of_turn_model and bool(turn_taking.get("end_of_turn", True))
                                    and self.models.end_of_turn is not None),
                       end_of_turn_threshold=turn_taking.get("end_of_turn_threshold", s.end_of_turn_threshold),
                       check_after_ms=s.end_of_turn_check_ms,
                       recheck_after_ms=s.end_of_turn_recheck_ms,
                       short_hangover_ms=turn_taking.get("short_hangover_ms", s.short_hangover_ms),
                       long_hangover_ms=turn_taking.get("long_hangover_ms", s.long_hangover_ms)),
            barge_in_min_ms=turn_taking.get("barge_in_min_ms", s.barge_in_min_ms),
            partial_interval_s=s.stt_partial_interval_s,
            greeting=persona.greeting if s.speak_greeting else "",
            # A recording notice is said even where greetings are off, and cannot be interrupted: callers must hear it.
            notice=self.recordings.notice(persona),
            persona=persona.name,
            preemptive=s.preemptive_reply,
            llm_options={k: v for k, v in llm_options.items() if v is not None},
            dlp=_dlp_policy(persona),
            tools=tools,
            tool_limits={"max_rounds": s.tool_max_rounds, "slow_after_s": s.tool_filler_after_s},
            timezone=persona.timezone,
            knowledge=self.storage.knowledge if self.storage is not None else None,
            collections=persona.knowledge_collections,
            language=persona.language,
            voice=persona.tts_voice,
            text_messages_per_10s=s.call_text_messages_per_10s,
            max_duration_s=s.call_max_s,
            idle_timeout_s=s.call_idle_timeout_s,
            dtmf_interdigit_s=s.dtmf_interdigit_ms / 1000,
        )
        # Observers of the call's event stream: the caller's own view, and metrics.
        view = CallerView(transport.send_text, redact_event, call.dlp)  # the caller's subset, redacted
        call.events.subscribe(view.observe, flush=view.flush)
        self._views[call_id] = view
        call.events.subscribe(self.metrics.observe)
        call.events.subscribe(_log_event)
        if self.tracing is not None:
            call.events.subscribe(self.tracing.observer(call_id, transport.kind, persona.name))
        if self.storage is not None:
            self.storage.attach(call_id, call.events, transport.kind, persona.name, caller, call.dlp)
        self.recordings.start(call_id, persona, transport, call.events, call.dlp)
        self.calls[call_id] = call
        call.serve_mcp(mcp_servers)
        self.metrics.calls_total.labels(transport.kind).inc()
        self.metrics.active_calls.labels(transport.kind).inc()
        task = asyncio.create_task(call.run(), name=f"call-{call_id}", context=call_context(call_id))
        self._tasks[call_id] = task
        task.add_done_callback(lambda t: self._ended(call_id, transport.kind, t))
        return call

    def _ended(self, call_id: str, kind: str, task: asyncio.Task[None]) -> None:
        self.calls.pop(call_id, None)
        self._tasks.pop(call_id, None)
        if not self.calls:
            self._no_calls.set()
        view = self._views.pop(call_id, None)
        if view is not None and task.cancelled():
            view.stop()  # a call cancelled before it could say call.ended
        self.metrics.active_calls.labels(kind).dec()
        if self.storage is not None:
            self.storage.detach(call_id)
        self.recordings.finish(call_id)
        if not task.cancelled() and task.exception() is not None:
            log.error("call %s crashed", call_id, exc_info=task.exception())

    async def hang_up(self, call_id: str, reason: str = "hangup") -> bool:
        call = self.calls.get(call_id)
        if call is None:
            return False
        await call.hang_up(reason)
        task = self._tasks.get(call_id)
        if task is not None:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await asyncio.wait_for(asyncio.shield(task), 5)
        return True

    def start_draining(self) -> None:
        """Take no new calls from now on (readiness turns 503, offers and INVITEs get 503); live calls go on."""
        if not self.draining:
            self.draining = True
            log.info("draining: no new calls; %d in progress", len(self.calls))
            if self.storage is not None and self.storage.live is not None:
                self.storage.live.mark_draining()

    def resume(self) -> None:
        """Take calls again after `start_draining` (an admin changed their mind)."""
        self.draining = False
        if self.storage is not None and self.storage.live is not None:
            self.storage.live.mark_draining(False)

    async def drain(self, timeout_s: float, goodbye: str = DRAIN_GOODBYE) -> None:
        """Stop taking calls, let the live ones end by themselves for up to `timeout_s`, then say `goodbye`
        to those still going and hang them up cleanly (SIP BYE, Twilio stop, WebRTC close)."""
        self.start_draining()
        if self.calls:
            self._no_calls.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._no_calls.wait(), timeout_s)
        if self.calls:
            log.info("drain timeout: ending %d calls with a goodbye", len(self.calls))
            await asyncio.gather(*(call.end_with_goodbye("drain_timeout", goodbye)
                                   for call in list(self.calls.values())), return_exceptions=True)
            tasks = list(self._tasks.values())
            if tasks:
                await asyncio.wait(tasks, timeout=10)

    async def close_all(self, reason: str = "shutdown") -> None:
        self.draining = True
        await asyncio.gather(*(self.hang_up(cid, reason) for cid in list(self.calls)), return_exceptions=True)
        await self.recordings.drain()


def _dlp_policy(persona: Persona) -> DlpPolicy:
    try:
        return DlpPolicy.from_config(persona.dlp_policy)
    except ValueError as exc:  # saved through the API it was validated; a hand-edited row may not be
        log.error("persona %s has an invalid DLP policy (%s); using the default", persona.name, exc)
        return DEFAULT_POLICY


_LOGGED = (EventType.CALL_STARTED, EventType.CALL_ENDED, EventType.BARGE_IN, EventType.ERROR, EventType.OPERATOR,
           EventType.TRANSFER, EventType.LATENCY)


def _log_event(event: CallEvent) -> None:
    # Transcript text never goes to the log: only which step happened, for which call and turn.
    if event.type in _LOGGED:
        details = {k: v for k, v in event.data.items() if k != "text"}
        log.info("%s", event.type, extra={"call_id": event.call_id, "turn": event.turn, "details": details})
