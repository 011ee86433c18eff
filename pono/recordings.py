"""Recording calls, from the composition root: one `CallRecording` per call whose persona records, its row and
redactions through the storage writer, and its file made final (uploaded, in S3 mode) when the call ends, or,
for calls a killed process left behind, at the next start (`recover`)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import Any

from pono.agent.dlp.engine import DlpPolicy
from pono.agent.personas import Persona
from pono.events import CallEvent, EventStream, EventType
from pono.settings import Settings
from pono.storage.recordings import recording_record, unfinished_recordings
from pono.storage.service import Storage
from pono.voice.models import SpeechModels
from pono.voice.recording.ogg import CODEC, file_digest, salvage
from pono.voice.recording.recorder import CallRecording
from pono.voice.tap import TappedTransport

log = logging.getLogger(__name__)


class Recordings:
    """The recordings of this process's calls. Needs storage with Postgres (no database: nothing recorded)."""

    def __init__(self, settings: Settings, storage: Storage | None, models: SpeechModels) -> None:
        self.settings = settings
        self.storage = storage
        self.models = models
        self._live: dict[str, tuple[CallRecording, TappedTransport, str, float, int | None]] = {}
        self._finishing: set[asyncio.Task[None]] = set()
        self._finishing_ids: set[str] = set()  # calls whose recording is being finished
        self._recovery: asyncio.Task[int] | None = None

    def notice(self, persona: Persona) -> str:
        """What the call says first when its persona announces recording ("" otherwise): said whole, before the
        greeting and apart from it, so that neither speech nor typed text can cut the caller's consent short."""
        if persona.recording != "announce":
            return ""
        return (persona.recording_notice or self.settings.recording_notice).strip()

    def start(self, call_id: str, persona: Persona, transport: TappedTransport, events: EventStream,
              policy: DlpPolicy) -> None:
        """Record the call when its persona says so and it carries audio. Subscribe after storage's own
        observer: the recording's row follows the call's."""
        storage = self.storage
        if persona.recording == "off" or storage is None or storage.writer is None or not transport.has_audio:
            return
        writer, store, s = storage.writer, storage.recordings, self.settings
        started = time.time()
        key = store.key_for(call_id, started)
        whisper = self.models.stt.whisper if self.models.stt is not None else None

        def redacted(found: dict[str, Any]) -> None:
            turn = found["turn"] if found["turn"] is not None else -1
            writer.put({"key": f"{call_id}:{turn}:audio:{found['channel']}:{found['start']}:{found['entity_type']}",
                        "kind": "audio_redaction", "call_id": call_id, **found, "turn": turn})

        loop = asyncio.get_running_loop()

        def marked(mark: dict[str, Any]) -> None:
            # Operator audio in the recording, for the console: an operator.action event of its own, emitted
            # after the event being observed (if any) has reached every observer.
            loop.call_soon(lambda: events.emit(EventType.OPERATOR, **mark))

        recording = CallRecording(store.spool_path(key), policy=policy, mode=persona.recording_redaction,
                                  whisper=whisper, language=persona.language, on_redaction=redacted,
                                  lag_s=s.recording_lag_s, cap_s=s.recording_max_hold_s, on_mark=marked)
        retention = persona.recording_retention_days

        def observe(event: CallEvent) -> None:
            if event.type is EventType.CALL_STARTED:
                writer.put(recording_record(call_id, key, started, retention_days=retention))
            recording.observe(event)

        events.subscribe(observe)
        transport.taps.add(recording)
        recording.start()
        self._live[call_id] = (recording, transport, key, started, retention)

    def finish(self, call_id: str) -> None:
        """The call ended: close its recording, make the file final and store its figures (in a task)."""
        entry = self._live.pop(call_id, None)
        if entry is None:
            return
        recording, transport, key, started, retention = entry
        transport.taps.discard(recording)
        task = asyncio.create_task(self._finish(call_id, recording, key, started, retention),
                                   name=f"recording-finish-{call_id}")
        self._finishing.add(task)
        self._finishing_ids.add(call_id)
        task.add_done_callback(self._finishing.discard)
        task.add_done_callback(lambda _: self._finishing_ids.discard(call_id))

    async def _finish(self, call_id: str, recording: CallRecording, key: str, started: float,
                      retention: int | None) -> None:
        assert self.storage is not None and self.storage.writer is not None
        try:
            info = await recording.close()
            await self.storage.recordings.finish(key)
        except Exception:
            log.exception("recording of call %s could not be finished", call_id)
            return
        self.storage.writer.put(recording_record(
            call_id, key, started, retention_days=retention,
            info={"duration_s": round(info.duration_s, 3), "size": info.size, "sha256": info.sha256,
                  "codec": info.codec}))
        if info.muted_s:
            log.warning("call %s: %.1f s of audio written silenced (not checked in time)", call_id, info.muted_s)

    def recover_later(self) -> None:
        """At start-up: finish, in the background, the recordings a killed process left (see `recover`)."""
        if self.storage is not None and self.storage.db is not None and self.storage.writer is not None:
            self._recovery = asyncio.create_task(self._recover_logged(), name="recordings-recover")

    async def _recover_logged(self) -> int:
        try:
            return await self.recover()
        except Exception:  # Postgres away at start-up, say: the next start tries again
            log.exception("recordings left by a crash could not be looked for")
            return 0

    async def recover(self) -> int:
        """Make final the recordings this data dir holds whose calls ended without finishing them (the process
        was killed, or an upload failed): the file is cut to its last complete Ogg page, uploaded in S3 mode
        (stale multipart uploads aborted), and its row completed with the figures of that prefix. Recordings of
        this process's own calls, and files of other replicas (not in this data dir), are left alone. A failure
        leaves the file for the next start. Returns how many were recovered."""
        assert self.storage is not None and self.storage.db is not None and self.storage.writer is not None
        store, writer, done = self.storage.recordings, self.storage.writer, 0
        for row in await unfinished_recordings(self.storage.db.pool):
            call_id, key = row["call_id"], row["storage_key"]
            path = store.spool_path(key)
            if call_id in self._live or call_id in self._finishing_ids or not path.is_file():
                continue
            try:
                duration = await asyncio.to_thread(salvage, path)
                size, sha256 = await asyncio.to_thread(file_digest, path)
                await store.finish(key)
            except Exception:
                log.exception("recording of call %s could not be recovered", call_id)
                continue
            writer.put(recording_record(
                call_id, key, row["started_at"].timestamp(), retention_days=row["retention_days"],
                info={"duration_s": round(duration, 3), "size": size, "sha256": sha256, "codec": CODEC}))
            log.warning("recording of call %s recovered after a crash: %.1f s", call_id, duration)
            done += 1
        return done

    async def drain(self, timeout_s: float = 15.0) -> None:
        """Wait for recordings being finished (shutdown), at most `timeout_s`; stop a recovery still going (the
        next start takes it up again)."""
        if self._finishing:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.gather(*self._finishing, return_exceptions=True), timeout_s)
        if self._recovery is not None and not self._recovery.done():
            self._recovery.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._recovery
