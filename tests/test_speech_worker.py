"""The speech worker: a real `pono speech-worker` process (tiny.en on the CPU) serving a real `pono serve`, which
falls back to its own models when the worker dies mid-turn; the worker's token, its wire format's errors and its
drain on SIGTERM. One worker and one app server for the module."""

from __future__ import annotations

import asyncio
import gc
import json
import logging
import os
import re
import signal
import sys
import uuid
import weakref
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import numpy as np
import pytest
from aiohttp import web
from conftest import make_settings, start_server
from helpers import stored_turns
from prometheus_client.parser import text_string_to_metric_families
from servers import PonoProcess

from pono.agent.embedded import free_port
from pono.settings import Settings
from pono.signaling.ice import restrict_host_addresses
from pono.storage.users import create_api_key, create_user
from pono.testing.caller import Caller
from pono.testing.ready import wait_until_ready
from pono.testing.scripted_llm import Script, ScriptedLLM
from pono.voice.models import SpeechModels
from pono.voice.worker.client import UNAVAILABLE
from pono.voice.worker.pool import WorkerPool
from pono.voice.worker.protocol import MAX_FINALS_IN_FLIGHT, MAX_MESSAGE_BYTES, MAX_TTS_CHARS, STT_PATH
from pono.voice.worker.server import WORKER, SpeechWorker, stt

TOKEN = "worker-secret-" + uuid.uuid4().hex
METRICS_TOKEN = "metrics-" + uuid.uuid4().hex


class WorkerProcess:
    """`pono speech-worker` as a child process on a port of its own, which a test may kill and start again."""

    def __init__(self, folder: Path) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.folder = folder
        self.env = {**os.environ, "PONO_SPEECH_WORKER_TOKEN": TOKEN, "PONO_SPEECH_WORKER_PORT": str(self.port),
                    "PONO_STT_MODEL": "tiny.en", "PONO_STT_DEVICE": "cpu", "PONO_DATA_DIR": str(folder),
                    "PONO_HOST": "127.0.0.1"}
        self.process: asyncio.subprocess.Process | None = None

    async def start(self) -> None:
        with (self.folder / "worker.log").open("ab") as log:
            self.process = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "pono", "speech-worker", env=self.env, stdout=log,
                stderr=asyncio.subprocess.STDOUT)
        await wait_until_ready(self.url, 120, self.process, path="/ready")

    async def ensure_running(self) -> None:
        if self.process is None or self.process.returncode is not None:
            await self.start()

    async def kill(self) -> None:
        assert self.process is not None
        self.process.kill()
        await self.process.wait()

    async def stop(self) -> int | None:
        if self.process is None:
            return None
        if self.process.returncode is None:
            self.process.terminate()
        return await asyncio.wait_for(self.process.wait(), 60)


def sample(text: str, name: str, **labels: str) -> float:
    """One sample's value from Prometheus text; 0 when absent."""
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                return s.value
    return 0.0


async def metrics_of(url: str, token: str) -> str:
    async with aiohttp.ClientSession() as http, http.get(f"{url}/metrics",
                                                         headers={"Authorization": f"Bearer {token}"}) as r:
        assert r.status == 200
        return await r.text()


async def worker_finals(worker: WorkerProcess) -> float:
    return sample(await metrics_of(worker.url, TOKEN), "pono_worker_transcriptions_total", kind="final")


def words(text: str) -> set[str]:
    return set(re.findall(r"[a-z0-9]+", text.lower()))


@pytest.fixture(scope="module")
async def worker(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[WorkerProcess]:
    process = WorkerProcess(tmp_path_factory.mktemp("speech-worker"))
    await process.start()
    yield process
    await process.stop()


@pytest.fixture(scope="module")
async def app(worker: WorkerProcess, tmp_path_factory: pytest.TempPathFactory, scripted_llm: ScriptedLLM,
              postgres_url: str, redis_url: str) -> AsyncIterator[PonoProcess]:
    """`pono serve` with its STT and TTS on the worker (and the local fallback loaded)."""
    restore_ice = restrict_host_addresses(["127.0.0.1"])  # this process's callers gather on loopback
    process = PonoProcess(tmp_path_factory.mktemp("worker-app"), DATABASE_URL=postgres_url, REDIS_URL=redis_url,
                          OPENAI_BASE_URL=scripted_llm.base_url, PONO_LLM_MODEL="scripted",
                          PONO_REPLICA_ID=f"worker-{uuid.uuid4().hex[:6]}", PONO_SPEECH_WORKER_URL=worker.url,
                          PONO_SPEECH_WORKER_TOKEN=TOKEN, PONO_METRICS_TOKEN=METRICS_TOKEN)
    try:
        await process.start()
        yield process
        await process.stop()
    finally:
        restore_ice()


@pytest.fixture(scope="module")
async def admin_key(app: PonoProcess, postgres_url: str) -> str:
    connection = await asyncpg.connect(postgres_url)
    try:
        user_id = await create_user(connection, f"worker-admin-{uuid.uuid4().hex[:8]}", "admin")
        return (await create_api_key(connection, user_id, "admin", "speech worker tests"))[1]
    finally:
        await connection.close()


async def test_the_token_guards_everything_but_health_and_ready(worker: WorkerProcess) -> None:
    await worker.ensure_running()
    async with aiohttp.ClientSession() as http:
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": TOKEN}):
            with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
                await http.ws_connect(f"{worker.url}/v1/stt", headers=headers)
            assert refused.value.status == 401
            async with http.post(f"{worker.url}/v1/tts", json={"text": "Hello."}, headers=headers) as r:
                assert r.status == 401
            async with http.get(f"{worker.url}/metrics", headers=headers) as r:
                assert r.status == 401
        async with http.get(f"{worker.url}/health") as r:
            assert r.status == 200 and (await r.json())["status"] == "alive"
        async with http.get(f"{worker.url}/v1/stt", headers={"Authorization": f"Bearer {TOKEN}"}) as r:
            assert r.status == 426 and "WebSocket" in (await r.json())["error"]  # a plain GET: what is missing
        async with http.get(f"{worker.url}/ready") as r:  # for probes: the state, not the load
            assert r.status == 200 and await r.json() == {"status": "ready"}
        async with http.get(f"{worker.url}/ready", headers={"Authorization": "Bearer wrong"}) as r:
            assert r.status == 401
        async with http.get(f"{worker.url}/ready", headers={"Authorization": f"Bearer {TOKEN}"}) as r:
            ready = await r.json()
            assert r.status == 200 and ready["status"] == "ready" and {"streams", "queue_depth"} <= set(ready)
        async with http.post(f"{worker.url}/v1/tts", json={"text": "Hello there."},
                             headers={"Authorization": f"Bearer {TOKEN}"}) as r:
            assert r.status == 200 and int(r.headers["X-Sample-Rate"]) > 0
            audio = np.frombuffer(await r.read(), "<i2")
        assert audio.size > 0 and np.abs(audio).max() > 1000


async def test_a_call_is_transcribed_and_spoken_by_the_worker(worker: WorkerProcess, app: PonoProcess,
                                                               script: Script, question: np.ndarray) -> None:
    await worker.ensure_running()
    script.reply = "Your table is booked for seven."
    finals_before = await worker_finals(worker)
    tts_before = sample(await metrics_of(worker.url, TOKEN), "pono_worker_model_seconds_count", model="tts")
    caller = Caller(app.url)
    try:
        await caller.connect()
        await caller.wait_open()
        caller.speak(question)
        final = await caller.wait_for(lambda e: e["type"] == "transcript.final" and e.get("text"), 30)
        assert "table" in words(final["text"])
        agent = await caller.wait_for(lambda e: e["type"] == "agent.final", 30)
        assert agent["text"] == script.reply and not agent["interrupted"]
    finally:
        await caller.hang_up()
    worker_metrics = await metrics_of(worker.url, TOKEN)
    assert sample(worker_metrics, "pono_worker_transcriptions_total", kind="final") > finals_before
    assert sample(worker_metrics, "pono_worker_model_seconds_count", model="tts") > tts_before
    assert sample(worker_metrics, "pono_worker_batch_size_count", kind="final") > 0
    assert sample(await metrics_of(app.url, METRICS_TOKEN), "pono_speech_worker_fallbacks_total", kind="stt") == 0


async def test_a_worker_killed_mid_turn_loses_nothing(worker: WorkerProcess, app: PonoProcess, script: Script,
                                                      question: np.ndarray, admin_key: str) -> None:
    await worker.ensure_running()
    script.reply = "Certainly, a table for two."
    caller = Caller(app.url)
    try:
        await caller.connect()
        await caller.wait_open()
        caller.speak(question)
        await caller.wait_for(lambda e: e["type"] == "speech.started", 20)
        await asyncio.sleep(0.3)  # the worker has part of the turn, and the caller goes on speaking
        await worker.kill()
        first = await caller.wait_for(lambda e: e["type"] == "transcript.final" and e.get("text"), 30)
        assert {"please", "table"} <= words(first["text"]), first["text"]  # words from before and after the kill
        agent = await caller.wait_for(lambda e: e["type"] == "agent.final" and e["turn"] > first["turn"], 30)
        assert agent["text"] == script.reply
        app_metrics = await metrics_of(app.url, METRICS_TOKEN)
        assert sample(app_metrics, "pono_speech_worker_fallbacks_total", kind="stt") >= 1
        # The worker comes back: once this replica sees it, the next turn goes to it again.
        await worker.start()
        for _ in range(300):
            if sample(await metrics_of(app.url, METRICS_TOKEN), "pono_speech_workers_up") == 1:
                break
            await asyncio.sleep(0.1)
        caller.speak(question)
        second = await caller.wait_for(lambda e: e["type"] == "transcript.final" and e.get("text")
                                       and e["turn"] > agent["turn"], 30)
        assert "table" in words(second["text"])
        await caller.wait_for(lambda e: e["type"] == "agent.final" and e["turn"] > second["turn"], 30)
        assert await worker_finals(worker) >= 1
    finally:
        await caller.hang_up()
    turns = await stored_turns(app, admin_key, caller.call_id, 4)
    assert [t["role"] for t in turns] == ["user", "agent", "user", "agent"]
    assert [turns[0]["text"], turns[2]["text"]] == [first["text"], second["text"]]


async def test_past_100_streams_polls_and_tts_still_get_through(worker: WorkerProcess) -> None:
    """Every call holds a stream for its whole length: 101 of them must leave the pool's /ready polls and TTS
    requests a connection (aiohttp's default is 100 per session)."""
    await worker.ensure_running()
    pool = WorkerPool(worker.url, TOKEN)
    (target,) = pool.workers
    streams = []
    try:
        for _ in range(101):
            streams.append(await pool.connect_stt(target))
        await pool.poll()
        assert target.ready and target.load >= 101 and pool.tts_rate
        pieces = await asyncio.wait_for(pool.synthesize(target, "Hello there.", None, pool.tts_rate), 60)
        assert sum(c.size for c in pieces) > 0
    finally:
        await asyncio.gather(*(ws.close() for ws in streams))
        await pool.close()


async def test_a_wrong_token_shows_at_the_first_poll(worker: WorkerProcess, caplog: pytest.LogCaptureFixture) -> None:
    """An app with the wrong token must not count the worker as up (each call would get 401 and fall back), and
    says why once."""
    await worker.ensure_running()
    pool = WorkerPool(worker.url, "wrong-token-" + uuid.uuid4().hex)
    try:
        for _ in range(2):
            await pool.poll()
            assert pool.up == 0 and pool.pick() is None
    finally:
        await pool.close()
    refused = [r for r in caplog.records if "refused PONO_SPEECH_WORKER_TOKEN" in r.getMessage()]
    assert len(refused) == 1 and refused[0].levelno == logging.ERROR and worker.url in refused[0].getMessage()


async def test_with_no_fallback_the_app_is_ready_only_while_a_worker_is_up(
        worker: WorkerProcess, tmp_path_factory: pytest.TempPathFactory, scripted_llm: ScriptedLLM,
        postgres_url: str, redis_url: str, caplog: pytest.LogCaptureFixture) -> None:
    """PONO_SPEECH_FALLBACK=none: a server whose workers all went down cannot speak, so /api/ready says so; the
    log says where speech goes at start, and when a worker goes down (found by a poll) and comes back."""
    await worker.ensure_running()
    assert worker.process is not None
    caplog.set_level(logging.INFO, logger="pono.voice.worker.pool")
    running = await start_server(make_settings(
        tmp_path_factory.mktemp("no-fallback"), openai_base_url=scripted_llm.base_url, llm_model="scripted",
        database_url=postgres_url, redis_url=redis_url, replica_id=f"no-fallback-{uuid.uuid4().hex[:6]}",
        speech_worker_url=worker.url, speech_worker_token=TOKEN, speech_fallback="none", end_of_turn_model=False))

    async def ready_until(status: int) -> dict[str, Any]:
        async with aiohttp.ClientSession() as http:
            for _ in range(600):
                async with http.get(f"{running.url}/api/ready") as r:
                    if r.status == status:
                        return await r.json()
                await asyncio.sleep(0.1)
        raise AssertionError(f"/api/ready never answered {status}")

    def logged(text: str) -> bool:
        return any(text in r.getMessage() and worker.url in r.getMessage() for r in caplog.records)

    try:
        assert logged("speech on worker(s)")
        assert (await ready_until(200))["checks"]["speech_worker"] is True
        worker.process.send_signal(signal.SIGSTOP)  # it answers nothing: the polls time out
        try:
            assert (await ready_until(503))["checks"]["speech_worker"] is False
            assert logged("is down")
        finally:
            worker.process.send_signal(signal.SIGCONT)
        await ready_until(200)
        assert logged("is back")
    finally:
        await running.runner.cleanup()


async def test_bad_frames_get_an_error_and_the_stream_goes_on(worker: WorkerProcess, question: np.ndarray) -> None:
    await worker.ensure_running()
    auth = {"Authorization": f"Bearer {TOKEN}"}
    async with aiohttp.ClientSession() as http, http.ws_connect(f"{worker.url}/v1/stt", headers=auth) as ws:

        async def next_of(kind: str) -> dict[str, object]:
            while True:
                message = await ws.receive_json(timeout=30)
                if message["type"] == kind:
                    return message

        await ws.send_bytes(b"\x00\x01")
        assert "start" in (await next_of("error"))["message"]
        await ws.send_str(json.dumps({"type": "start", "language": "zz-top"}))  # refused, not logged
        assert "language" in (await next_of("error"))["message"]
        await ws.send_str(json.dumps({"type": "start", "partial_interval_s": "0.5"}))  # a string is no number
        assert "partial_interval_s" in (await next_of("error"))["message"]
        await ws.send_str(json.dumps({"type": "start", "language": "en", "partial_interval_s": 0.5}))
        for bad in ("{not json", "[1, 2]", json.dumps({"type": "shout"}), json.dumps({"type": "final", "id": "x"}),
                    json.dumps({"type": "final", "id": True}), json.dumps({"type": "partials", "enabled": 1})):
            await ws.send_str(bad)
            assert (await next_of("error"))["message"]
        await ws.send_bytes(b"\x01\x02\x03")
        assert "odd" in (await next_of("error"))["message"]
        for at in range(0, question.size, 1600):  # 100 ms messages at the speed of speech: partials come
            await ws.send_bytes(question[at:at + 1600].astype("<i2").tobytes())
            await asyncio.sleep(0.1)
        partial = await next_of("partial")
        assert partial["text"] and partial["utterance"] == 0
        await ws.send_str(json.dumps({"type": "final", "id": 7}))
        final = await next_of("final")
        assert final["id"] == 7 and "table" in words(str(final["text"]))
        # A new utterance: its final knows nothing of the last one's audio.
        await ws.send_str(json.dumps({"type": "reset"}))
        await ws.send_bytes(np.zeros(8000, "<i2").tobytes())
        await ws.send_str(json.dumps({"type": "final", "id": 8}))
        silence = await next_of("final")
        assert silence["id"] == 8 and "table" not in words(str(silence["text"]))
        # A message of the protocol's largest size is taken (aiohttp refuses one as large as its own limit).
        await ws.send_bytes(bytes(MAX_MESSAGE_BYTES))
        await ws.send_str(json.dumps({"type": "reset"}))
        await ws.send_str(json.dumps({"type": "final", "id": 9}))
        assert (await next_of("final"))["id"] == 9
        # SIGTERM drains: /ready says so, this stream is told to move, and the worker exits 0 once it closes.
        assert worker.process is not None
        worker.process.send_signal(signal.SIGTERM)
        await next_of("draining")
        async with http.get(f"{worker.url}/ready") as r:
            assert r.status == 503 and (await r.json())["status"] == "draining"
    assert await asyncio.wait_for(worker.process.wait(), 30) == 0
    assert "zz" not in (worker.folder / "worker.log").read_text()


async def test_with_no_worker_up_turns_go_to_the_local_models_or_get_an_error(
        tmp_path: Path, question: np.ndarray, caplog: pytest.LogCaptureFixture) -> None:
    nobody = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    models = SpeechModels(Settings(data_dir=tmp_path, stt_model="tiny.en", stt_device="cpu",
                                   speech_worker_url=nobody, speech_worker_token=TOKEN))
    await models.load()  # the fallback, "local", loads the models here too
    recognizer = models.recognizer("en", partial_interval_s=0)
    try:
        recognizer.push(question)
        assert "table" in words(await recognizer.final())
        assert sum(c.size for c in await models.run_tts("Hello.")) > 0
    finally:
        recognizer.close()
        await models.aclose()
    models = SpeechModels(Settings(data_dir=tmp_path, speech_worker_url=nobody, speech_worker_token=TOKEN,
                                   speech_fallback="none"))
    assert models.worker is not None
    await models.worker.poll()
    errors: list[str] = []
    recognizer = models.recognizer("en", on_error=errors.append)
    try:
        recognizer.push(np.zeros(16000, np.int16))
        assert await asyncio.wait_for(recognizer.final(), 10) == ""
        assert errors == [UNAVAILABLE]
        assert await models.run_tts("Hello.") == []
    finally:
        recognizer.close()
    # At start-up such a server waits for a worker, and says so while it waits (every 10 s in earnest).
    caplog.set_level(logging.WARNING, logger="pono.voice.worker.pool")
    waiting = asyncio.create_task(models.worker.wait_ready(log_every_s=0.05))
    try:
        for _ in range(600):
            if any("no speech worker is up yet" in r.getMessage() and nobody in r.getMessage()
                   for r in caplog.records):
                break
            await asyncio.sleep(0.05)
        else:
            raise AssertionError("no warning while waiting for a worker")
        assert not waiting.done()
    finally:
        waiting.cancel()
        await models.aclose()


async def test_a_stream_closed_with_finals_queued_leaves_nothing_unawaited(worker: WorkerProcess,
                                                                          question: np.ndarray) -> None:
    """A call hung up right after asking for finals: the worker drops them without a 'coroutine was never
    awaited' RuntimeWarning."""
    await worker.ensure_running()
    auth = {"Authorization": f"Bearer {TOKEN}"}
    async with aiohttp.ClientSession(headers=auth) as http:
        for _ in range(3):
            async with http.ws_connect(f"{worker.url}/v1/stt") as ws:
                await ws.send_str(json.dumps({"type": "start", "partial_interval_s": 0}))
                await ws.send_bytes(question.astype("<i2").tobytes())
                for final_id in range(3):
                    await ws.send_str(json.dumps({"type": "final", "id": final_id}))
        for _ in range(300):  # the streams' handlers have ended
            if sample(await metrics_of(worker.url, TOKEN), "pono_worker_streams_open") == 0:
                break
            await asyncio.sleep(0.1)
        await metrics_of(worker.url, TOKEN)  # and the worker went round its loop again since
    assert "was never awaited" not in (worker.folder / "worker.log").read_text()


async def test_one_stream_cannot_queue_unlimited_finals(worker: WorkerProcess, question: np.ndarray) -> None:
    """A burst of finals from one stream: those past MAX_FINALS_IN_FLIGHT are refused at once, by id, and the
    rest answered, so one stream cannot starve every other call's finals."""
    await worker.ensure_running()
    auth = {"Authorization": f"Bearer {TOKEN}"}
    async with aiohttp.ClientSession(headers=auth) as http, http.ws_connect(f"{worker.url}/v1/stt") as ws:
        await ws.send_str(json.dumps({"type": "start", "partial_interval_s": 0}))
        await ws.send_bytes(question.astype("<i2").tobytes())
        for final_id in range(12):
            await ws.send_str(json.dumps({"type": "final", "id": final_id}))
        answers = {}
        while len(answers) < 12:
            message = await ws.receive_json(timeout=60)
            answers[message["id"]] = message
    refused = [a for a in answers.values() if a["type"] == "error"]
    assert refused and all(f"at most {MAX_FINALS_IN_FLIGHT} finals" in a["message"] for a in refused)
    done = [a for a in answers.values() if a["type"] == "final"]
    assert done and all("table" in words(a["text"]) for a in done)


async def test_tts_streams_sentence_by_sentence_and_stops_for_a_client_gone(worker: WorkerProcess) -> None:
    """TTS answers each sentence as soon as it is spoken, refuses a text past its limit and names outside its
    voices (without logging them), and stops, quietly, when the client goes away: the TTS thread is shared,
    and an abandoned request must not hold up the next."""
    await worker.ensure_running()
    async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {TOKEN}"}) as http:
        url = f"{worker.url}/v1/tts"
        async with http.post(url, json={"text": "x" * (MAX_TTS_CHARS + 1)}) as r:
            assert r.status == 422 and str(MAX_TTS_CHARS) in await r.text()
        for voice in ("../../etc/passwd", ".hidden", "no-such-voice"):
            async with http.post(url, json={"text": "Hello.", "voice": voice}) as r:
                assert r.status == 422, voice
        async with http.post(url, json={"text": "Your table is booked. It is for seven. See you then."}) as r:
            assert r.status == 200
            chunks, piece = [], b""
            async for data, end_of_chunk in r.content.iter_chunks():
                piece += data
                if end_of_chunk and piece:
                    chunks.append(piece)
                    piece = b""
        assert len(chunks) == 3  # one per sentence
        abandoned = sample(await metrics_of(worker.url, TOKEN), "pono_worker_tts_abandoned_total")
        async with http.post(url, json={"text": "This is one more sentence to say. " * 40}) as r:
            await r.content.readany()  # the first sentence came; the client goes
            r.close()
        for _ in range(300):
            if sample(await metrics_of(worker.url, TOKEN), "pono_worker_tts_abandoned_total") > abandoned:
                break
            await asyncio.sleep(0.1)
        else:
            raise AssertionError("the worker went on speaking to nobody")
    log = (worker.folder / "worker.log").read_text()
    assert "Traceback" not in log and "no-such-voice" not in log and "passwd" not in log
    # The app's side: a persona voice the worker lacks speaks with its default voice.
    pool = WorkerPool(worker.url, TOKEN)
    try:
        await pool.poll()
        assert pool.tts_rate
        pieces = await pool.synthesize(pool.workers[0], "Hello.", "no-such-voice", pool.tts_rate)
        assert sum(c.size for c in pieces) > 0
    finally:
        await pool.close()


async def test_a_closed_stream_lets_go_of_its_audio_at_once(tmp_path: Path, question: np.ndarray) -> None:
    """A closed stream's recognizer, and the audio it holds, go when the stream closes, not whenever the cycle
    collector next runs: the stream and its recognizer referred to each other. In this process, with the
    collector off, on a worker whose models are not needed (no partials, no finals)."""
    worker = SpeechWorker(Settings(data_dir=tmp_path, stt_model="tiny.en"), TOKEN)
    worker.models.loaded.set()
    made: list[weakref.ref[Any]] = []
    recognizer = worker.models.recognizer

    def tracked(*args: Any, **kwargs: Any) -> Any:
        made.append(weakref.ref(found := recognizer(*args, **kwargs)))
        return found

    worker.models.recognizer = tracked  # type: ignore[method-assign]
    app = web.Application()
    app[WORKER] = worker
    app.router.add_get(STT_PATH, stt)
    runner = web.AppRunner(app)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    gc.disable()
    try:
        async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {TOKEN}"}) as http:
            async with http.ws_connect(f"http://127.0.0.1:{port}{STT_PATH}") as ws:
                await ws.send_str(json.dumps({"type": "start", "partial_interval_s": 0}))
                await ws.send_bytes(question.astype("<i2").tobytes())
                await ws.send_str("{not json")
                assert (await ws.receive_json(timeout=10))["type"] == "error"  # all of the above was read
                assert len(made) == 1 and made[0]() is not None
            for _ in range(100):
                if not worker.streams:
                    break
                await asyncio.sleep(0.05)
            await asyncio.sleep(0.05)  # the stream's cancelled tasks have ended
            assert made[0]() is None
    finally:
        gc.enable()
        await runner.cleanup()
        worker.models.close()


async def test_forty_seconds_of_speech_through_run_stt(worker: WorkerProcess, tmp_path: Path,
                                                        question: np.ndarray) -> None:
    """A recording longer than one WebSocket message (run_stt of a voicemail) reaches the worker in pieces it
    takes: a piece of exactly its limit closed the stream, and with no fallback the transcript was empty."""
    await worker.ensure_running()
    models = SpeechModels(Settings(data_dir=tmp_path, speech_worker_url=worker.url, speech_worker_token=TOKEN,
                                   speech_fallback="none"))
    assert models.worker is not None
    try:
        await models.worker.poll()
        speech = np.tile(question, 40 * 16000 // question.size + 1)[:40 * 16000]
        assert "table" in words(await asyncio.wait_for(models.run_stt(speech), 120))
        assert models.worker.up == 1  # nothing failed on the way
    finally:
        await models.aclose()


@pytest.mark.parametrize(("env", "said"), [
    ({"PONO_SPEECH_WORKER_URL": "http://127.0.0.1:3001"}, "PONO_SPEECH_WORKER_TOKEN is not"),
    ({"PONO_SPEECH_WORKER_URL": "127.0.0.1:3001", "PONO_SPEECH_WORKER_TOKEN": "t"}, "http(s):// base URLs"),
    ({"PONO_SPEECH_WORKER_URL": "http://127.0.0.1:3001", "PONO_SPEECH_WORKER_TOKEN": "fifteen-chars-x"},
     "at least 16 characters"),
])
async def test_a_server_misconfigured_for_a_worker_says_why_and_exits(env: dict[str, str], said: str,
                                                                      tmp_path: Path) -> None:
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "pono", "serve", env={**os.environ, **env, "PONO_DATA_DIR": str(tmp_path)},
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    _, err = await asyncio.wait_for(process.communicate(), 60)
    assert process.returncode == 2
    assert said in err.decode() and "Traceback" not in err.decode()


@pytest.mark.parametrize(("case", "code", "said"), [
    ("a short token", 2, "at least 16 characters"),
    ("its port taken", 1, "cannot listen on 127.0.0.1:"),
])
async def test_a_misconfigured_worker_says_why_and_exits(worker: WorkerProcess, tmp_path: Path, case: str,
                                                         code: int, said: str) -> None:
    env = {**worker.env, "PONO_DATA_DIR": str(tmp_path)}
    if case == "a short token":
        env.update(PONO_SPEECH_WORKER_TOKEN="fifteen-chars-x", PONO_SPEECH_WORKER_PORT=str(free_port()))
    else:
        await worker.ensure_running()  # on the port this one is told to take
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "pono", "speech-worker", env=env, stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT)
    out, _ = await asyncio.wait_for(process.communicate(), 60)
    assert process.returncode == code
    text = out.decode()
    assert said in text and "Traceback" not in text and "[IP_ADDRESS]" not in text
