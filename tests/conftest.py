"""Shared fixtures: real speech made with espeak-ng, a scripted LLM, and a Pono server on loopback."""

from __future__ import annotations

import os
import subprocess
import uuid
import wave
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aioice.ice
import numpy as np
import pytest
from aiohttp import web
from servers import PostgresProcess, ValkeyProcess

from pono.agent.embedded import free_port
from pono.app import build_app
from pono.context import SERVICES
from pono.settings import Settings
from pono.signaling import ice
from pono.storage.users import create_api_key, create_user
from pono.testing.ready import wait_until_ready
from pono.testing.scripted_llm import Script, ScriptedLLM

QUESTION = "Please book a table for two at seven tonight"
PHONE_QUESTION = "I would like to speak with somebody about my order"


def espeak(text: str, path: Path, words_per_minute: int = 150) -> np.ndarray:
    """16 kHz mono int16 speech for `text`, made by Debian's espeak-ng and sox."""
    raw = path.with_suffix(".raw.wav")
    subprocess.run(["espeak-ng", "-s", str(words_per_minute), "-w", str(raw), text], check=True)
    subprocess.run(["sox", str(raw), "-r", "16000", "-c", "1", "-b", "16", str(path)], check=True)
    return read_wav(path)


def read_wav(path: Path) -> np.ndarray:
    with wave.open(str(path)) as w:
        assert w.getframerate() == 16000 and w.getnchannels() == 1
        return np.frombuffer(w.readframes(w.getnframes()), np.int16)


def write_wav(path: Path, pcm: np.ndarray, rate: int, channels: int = 1) -> None:
    with wave.open(str(path), "wb") as w:
        w.setnchannels(channels)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes(pcm.astype(np.int16).tobytes())


@pytest.fixture(scope="module", autouse=True)
def ice_gathering_is_left_as_found() -> Iterator[None]:
    """Where aiortc gathers ICE candidates is process-wide (`restrict_host_addresses`), and the shared server runs
    in this process: a module that changed it and put back aioice's default instead of what it found left every
    later WebRTC call in the loopback-only namespace without a candidate (a data channel that never opened, two
    modules on). The module that does it fails here, not an innocent one later."""
    before = aioice.ice.get_host_addresses
    yield
    if before is not ice._original_host_addresses:  # once the shared server has set it
        after = aioice.ice.get_host_addresses
        assert after(True, True) == before(True, True), "this module changed where ICE gathers and left it so"


@dataclass
class SharedServer:
    """The session's shared server, recorded by the `server` fixture when it starts (with its settings as they
    were then), so that the guards below can look at it without asking for the fixture, which would start the
    server for modules that never use it."""

    running: RunningServer | None = None
    settings_at_start: dict[str, Any] = field(default_factory=dict)


shared_server = SharedServer()


@pytest.fixture(scope="module", autouse=True)
def settings_are_left_as_found() -> Iterator[None]:
    """The shared server's settings are one object that every later test in the process reads: a module that
    changed a field and put back a literal (the default it assumed) instead of the value it found, or nothing,
    left every later test running against a setting no one chose. helpers.settings_for_new_calls (or
    monkeypatch.setattr) puts back the value found; a module that does not fails here, not an innocent one
    later. A module that started the server is checked against the settings it started with."""
    running = shared_server.running
    before = running.app[SERVICES].settings.model_dump() if running is not None else None
    yield
    if before is None:
        if (running := shared_server.running) is None:
            return  # this module never used the shared server
        before = shared_server.settings_at_start
    after = running.app[SERVICES].settings.model_dump()
    changed = sorted(k for k in before.keys() | after.keys() if before.get(k) != after.get(k))
    assert not changed, "this module left the shared server's settings changed (found -> left): " + "; ".join(
        f"{k}: {before.get(k)!r} -> {after.get(k)!r}" for k in changed)


@pytest.fixture(scope="session")
def audio_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("audio")


@pytest.fixture(scope="session")
def question(audio_dir: Path) -> np.ndarray:
    return espeak(QUESTION, audio_dir / "question.wav")


@pytest.fixture(scope="session")
def phone_question(audio_dir: Path) -> np.ndarray:
    """A question whose words survive telephone bandwidth: through 8 kHz G.711, Whisper base hears espeak's
    "book a table for two at seven tonight" as "Clean Booker Table for too much time"."""
    return espeak(PHONE_QUESTION, audio_dir / "phone-question.wav")


@pytest.fixture(scope="session")
async def scripted_llm() -> AsyncIterator[ScriptedLLM]:
    llm = ScriptedLLM()
    await llm.start()
    yield llm
    await llm.stop()


@pytest.fixture
def script(scripted_llm: ScriptedLLM) -> Script:
    """A fresh script for each test; tests change the reply, the delay or the failure mode."""
    scripted_llm.script = Script()
    return scripted_llm.script


def make_settings(data_dir: Path, **overrides: object) -> Settings:
    values: dict[str, object] = {
        "data_dir": data_dir,
        "stt_model": "base",
        "ice_interfaces": ["127.0.0.1"],
        "speak_greeting": False,
        "llm_timeout_s": 3.0,
        "stt_partial_interval_s": 0.0,
        # The shared server runs no job worker: pgqueuer's own polling tasks come and go, and the leak checks
        # (test_fuzz) count tasks. test_workflows and test_job_workers run servers and workers with it on.
        "jobs_in_process": False,
        # Every test talks from 127.0.0.1: the limits are raised here and tested on their own.
        "call_tokens_per_minute": 10_000,
        "requests_per_second": 10_000,
        "key_requests_per_second": 10_000,
        "logins_per_minute": 10_000,
        "login_ip_per_minute": 10_000,
    }
    values.update(overrides)
    return Settings(**values)  # type: ignore[arg-type]


class RunningServer:
    def __init__(self, app: web.Application, runner: web.AppRunner, url: str) -> None:
        self.app = app
        self.runner = runner
        self.url = url


async def start_server(settings: Settings, ready_timeout: float = 180.0) -> RunningServer:
    app = build_app(settings)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    url = f"http://127.0.0.1:{port}"
    await wait_until_ready(url, ready_timeout)
    return RunningServer(app, runner, url)


@pytest.fixture(scope="session")
def postgres_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """DATABASE_URL when set, else an embedded Postgres 18 + pgvector started for this session."""
    if os.environ.get("DATABASE_URL"):
        yield os.environ["DATABASE_URL"]
        return
    pg = PostgresProcess(tmp_path_factory.mktemp("postgres"))
    yield pg.uri
    pg.close()


@pytest.fixture(scope="session")
def redis_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """REDIS_URL when set, else an embedded Valkey started for this session."""
    if os.environ.get("REDIS_URL"):
        yield os.environ["REDIS_URL"]
        return
    valkey = ValkeyProcess(tmp_path_factory.mktemp("valkey"))
    yield valkey.url
    valkey.stop()


@pytest.fixture(scope="session")
async def server(tmp_path_factory: pytest.TempPathFactory, scripted_llm: ScriptedLLM, postgres_url: str,
                 redis_url: str) -> AsyncIterator[RunningServer]:
    settings = make_settings(tmp_path_factory.mktemp("pono"), openai_base_url=scripted_llm.base_url,
                             llm_model="scripted", database_url=postgres_url, redis_url=redis_url,
                             sip_host="127.0.0.1", sip_port=free_port(), sip_tcp=True, sip_ring_ms=300,
                             twilio_token="provider-secret")
    running = await start_server(settings)
    shared_server.running, shared_server.settings_at_start = running, settings.model_dump()
    yield running
    shared_server.running = None
    await running.runner.cleanup()


@pytest.fixture(scope="session")
async def admin_token(server: RunningServer) -> str:
    services = server.app[SERVICES]
    assert services.storage.db is not None
    user_id = await create_user(services.storage.db.pool, f"admin-{uuid.uuid4().hex[:8]}", "admin")
    return (await create_api_key(services.storage.db.pool, user_id, "admin", "tests"))[1]
