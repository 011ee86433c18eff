"""Storage as one service: Postgres (embedded or DATABASE_URL), the write queue, Redis live state."""

from __future__ import annotations

import logging
from typing import Any

from pono.events import EventStream
from pono.metrics import Metrics
from pono.settings import Settings
from pono.storage.db import Database
from pono.storage.embedded import EmbeddedPostgres, EmbeddedValkey
from pono.storage.journal import Journal
from pono.storage.live import LiveState, RedactEvent
from pono.storage.persona_cache import PersonaCache
from pono.storage.recordings import RecordingStore
from pono.storage.writer import RedactRecords, Writer

log = logging.getLogger(__name__)


class Storage:
    """Postgres, the write queue and Redis live state, started and closed together.

    `redact_records` and `redact_event` are the DLP applied to whatever leaves a call for Postgres, the journal
    and operators (see RedactRecords and RedactEvent); both are blocking and run in worker threads.
    """

    def __init__(self, settings: Settings, metrics: Metrics, *, redact_records: RedactRecords,
                 redact_event: RedactEvent) -> None:
        self.settings = settings
        self.metrics = metrics
        self.redact_records = redact_records
        self.redact_event = redact_event
        self._embedded_pg: EmbeddedPostgres | None = None
        self._embedded_valkey: EmbeddedValkey | None = None
        self.db: Database | None = None
        self.writer: Writer | None = None
        self.live: LiveState | None = None
        self.persona_cache = PersonaCache(lambda: self.live)  # last-known personas, for Postgres outages
        # Where call recordings are kept: <data dir>/recordings, or object storage (PONO_RECORDINGS_URL).
        self.recordings = RecordingStore.from_settings(settings)
        # The knowledge base on this database (pono.agent.knowledge.base.KnowledgeBase): built and set by the
        # composition root once the pool is up. Storage itself never uses it.
        self.knowledge: Any = None

    async def start(self) -> None:
        """Raises StorageError with a one-line reason when Postgres cannot be used."""
        s = self.settings
        if s.database_url is not None:
            dsn = s.database_url.get_secret_value()
        else:
            self._embedded_pg = EmbeddedPostgres(s.data_dir)
            dsn = await self._embedded_pg.start()
        self.db = Database(dsn, min_size=s.db_pool_min, max_size=s.db_pool_max, attempts=s.db_connect_attempts)
        await self.db.connect()
        self.writer = Writer(self.db, Journal(s.data_dir / "journal"), redact=self.redact_records,
                             on_error=lambda kind: self.metrics.errors.labels(kind).inc())
        self.writer.start()

        if s.redis_url is not None:
            redis_url = s.redis_url.get_secret_value()
        else:
            self._embedded_valkey = EmbeddedValkey(s.data_dir)
            redis_url = await self._embedded_valkey.start()
        self.live = LiveState(redis_url, s.replica_id, s.registry_ttl_s, redact=self.redact_event)
        await self.live.start()

    def attach(self, call_id: str, events: EventStream, transport: str, persona: str | None,
               caller: str | None = None, policy: Any = None) -> None:
        """Observe a new call: persist what it says, and show it live to every replica (both redacted).

        `transport` is its kind ("webrtc", "sip", ...), `persona` the persona's name, `policy` its DLP policy
        (opaque here, handed to the redactors; None: their default). Needs `start` to have run.
        """
        assert self.writer is not None and self.live is not None
        events.subscribe(self.writer.observer(call_id, self.settings.replica_id, caller, policy))
        self.live.register(call_id, transport, persona, caller)
        events.subscribe(self.live.observer(call_id, policy))

    def detach(self, call_id: str) -> None:
        if self.live is not None:
            self.live.unregister(call_id)

    def update_gauges(self) -> None:
        if self.writer is not None:
            self.metrics.db_queue_depth.set(self.writer.depth)
            self.metrics.journal_bytes.set(self.writer.journal.size_bytes())
            self.metrics.db_up.set(1 if self.writer.db_up else 0)
        if self.live is not None:
            self.metrics.redis_up.set(1 if self.live.up else 0)

    async def close(self) -> None:
        if self.writer is not None:
            await self.writer.close()
        if self.live is not None:
            await self.live.close()
        if self.db is not None:
            await self.db.close()
        if self._embedded_valkey is not None:
            await self._embedded_valkey.stop()
        if self._embedded_pg is not None:
            await self._embedded_pg.stop()
