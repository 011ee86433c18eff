"""Prometheus metrics, fed by observing each call's event stream, plus an event-loop lag probe."""

from __future__ import annotations

import asyncio
import time

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from pono.events import LATENCY_MARKS, CallEvent, EventType

_STAGE_BUCKETS = (0.025, 0.05, 0.1, 0.2, 0.3, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 5.0, 10.0)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.stage_seconds = Histogram(
            "pono_turn_stage_seconds", "Seconds from the caller's end of speech to each stage of a turn",
            ["stage"], buckets=_STAGE_BUCKETS, registry=r)
        self.model_seconds = Histogram(
            "pono_model_seconds", "Seconds spent in each model per call of it", ["model"],
            buckets=_STAGE_BUCKETS, registry=r)
        self.active_calls = Gauge("pono_active_calls", "Calls in progress", ["transport"], registry=r)
        self.calls_total = Counter("pono_calls_total", "Calls started", ["transport"], registry=r)
        self.errors = Counter("pono_errors_total", "Errors by kind", ["kind"], registry=r)
        self.barge_ins = Counter("pono_barge_ins_total", "Agent turns cut off by the caller", registry=r)
        self.loop_lag = Histogram(
            "pono_event_loop_lag_seconds", "How late the event loop ran a 100 ms timer",
            buckets=(0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0), registry=r)
        self.loop_lag_max = Gauge("pono_event_loop_lag_max_seconds", "Worst event-loop lag since start",
                                  registry=r)
        self.db_queue_depth = Gauge("pono_db_write_queue_depth", "Records waiting for the DB writer", registry=r)
        self.journal_bytes = Gauge("pono_journal_bytes", "Bytes of writes journaled while Postgres was away",
                                   registry=r)
        self.db_up = Gauge("pono_db_up", "1 when Postgres takes writes directly", registry=r)
        self.redis_up = Gauge("pono_redis_up", "1 when Redis is reachable", registry=r)
        self.control_refused = Counter(
            "pono_control_refused_total", "Control-bus messages refused (unsigned, bad_signature, stale, replayed, "
            "wrong_replica, malformed, bad_reply): someone or something else is writing to Redis", ["reason"],
            registry=r)
        self.llm_requests = Counter("pono_llm_requests_total", "Requests to each LLM endpoint (primary, fallback)"
                                    " by outcome (ok, cancelled, error, timeout, rate_limited, skipped)",
                                    ["endpoint", "outcome"], registry=r)
        self.worker_fallbacks = Counter(
            "pono_speech_worker_fallbacks_total", "Turns in flight (stt) and TTS requests (tts) that fell back "
            "from a speech worker to this process's models", ["kind"], registry=r)
        self.workers_up = Gauge("pono_speech_workers_up", "Speech workers new turns would go to now", registry=r)
        # Jobs (pono.jobs): workflow runs, post-call triggers and schedules on the pgqueuer queue.
        self.jobs_total = Counter("pono_jobs_total", "Jobs a worker handled, by kind (the queue entrypoint) and "
                                  "status (succeeded, failed, released)", ["kind", "status"], registry=r)
        self.job_seconds = Histogram("pono_job_duration_seconds", "Seconds a worker spent on one job", ["kind"],
                                     buckets=(0.01, 0.05, 0.1, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0),
                                     registry=r)
        self.jobs_queued = Gauge("pono_jobs_queue_depth", "Jobs waiting in the queue", registry=r)
        self.jobs_oldest_s = Gauge("pono_jobs_oldest_queued_seconds", "Age of the oldest job waiting in the queue",
                                   registry=r)
        self.worst_lag = 0.0

    def observe(self, event: CallEvent) -> None:
        if event.type is EventType.LATENCY:
            marks: dict[str, float] = event.data.get("marks", {})
            for stage in LATENCY_MARKS:
                if stage in marks:
                    self.stage_seconds.labels(stage).observe(marks[stage])
            if "tts_synth" in marks:
                self.model_seconds.labels("tts").observe(marks["tts_synth"])
            if "llm_total" in marks:
                self.model_seconds.labels("llm").observe(marks["llm_total"])
            if "stt_final" in marks and "speech_end" in marks:
                self.model_seconds.labels("stt").observe(max(0.0, marks["stt_final"] - marks["speech_end"]))
        elif event.type is EventType.ERROR:
            self.errors.labels(event.data.get("kind", "unknown")).inc()
        elif event.type is EventType.BARGE_IN:
            self.barge_ins.inc()

    async def watch_loop_lag(self, interval: float = 0.1) -> None:
        while True:
            expected = time.perf_counter() + interval
            await asyncio.sleep(interval)
            lag = max(0.0, time.perf_counter() - expected)
            self.loop_lag.observe(lag)
            if lag > self.worst_lag:
                self.worst_lag = lag
                self.loop_lag_max.set(lag)
