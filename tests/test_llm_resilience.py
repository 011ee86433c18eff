"""The agent's LLM client against real scripted OpenAI-compatible servers: streams are closed however they
end, a failing primary is retried and then replaced by a fallback, and a circuit breaker spares a dead one."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import pytest
from aiohttp import web

from pono.agent.llm import LLMClient, LLMError, LLMTruncated
from pono.metrics import Metrics
from pono.testing.scripted_llm import Script, ScriptedLLM

MESSAGES = [{"role": "user", "content": "Hello?"}]


async def until(condition: Callable[[], bool], what: str, within_s: float = 10.0) -> None:
    """Wait for `condition` (a state of a real server), failing with `what` if it never comes."""
    for _ in range(int(within_s / 0.02)):
        if condition():
            return
        await asyncio.sleep(0.02)
    raise AssertionError(f"never happened: {what}")


@pytest.fixture
async def primary() -> AsyncIterator[ScriptedLLM]:
    llm = ScriptedLLM(Script(reply="From the primary.", first_token_s=0.0))
    await llm.start()
    yield llm
    await llm.stop()


async def test_stream_cancelled_before_its_first_token_closes_the_connection(primary: ScriptedLLM) -> None:
    """A dropped preemptive reply: cancelled while the model has not said anything yet."""
    primary.script.first_token_s = 30.0
    client = LLMClient(primary.base_url, "key", "scripted", timeout_s=60.0)
    try:
        async def consume() -> None:
            async for _ in client.stream(MESSAGES):
                pass

        task = asyncio.create_task(consume())
        await until(lambda: primary.chats_open == 1, "the request reached the server")
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await until(lambda: primary.chats_open == 0, "the server saw the stream closed")
        assert primary.chats_dropped == 1
    finally:
        await client.close()


async def test_stream_abandoned_after_its_first_token_closes_the_connection(primary: ScriptedLLM) -> None:
    """A barge-in mid-reply: the consumer stops reading and closes the stream."""
    primary.script.reply = " ".join(["word"] * 200)
    primary.script.token_interval_s = 0.5
    client = LLMClient(primary.base_url, "key", "scripted", timeout_s=60.0)
    try:
        stream = client.stream(MESSAGES)
        assert (await anext(stream)) == "word"
        await stream.aclose()
        await until(lambda: primary.chats_open == 0, "the server saw the stream closed")
    finally:
        await client.close()


@pytest.fixture
async def fallback() -> AsyncIterator[ScriptedLLM]:
    llm = ScriptedLLM(Script(reply="From the fallback.", first_token_s=0.0))
    await llm.start()
    yield llm
    await llm.stop()


@asynccontextmanager
async def resilient(primary: ScriptedLLM, fallback: ScriptedLLM, metrics: Metrics,
                    **options: Any) -> AsyncIterator[LLMClient]:
    """A client with `primary` and `fallback`, closed on the way out."""
    values: dict[str, Any] = {"timeout_s": 6.0, "retries": 2, "fallback_url": fallback.base_url,
                              "fallback_model": "small-model", "breaker_failures": 100,
                              "requests_counter": metrics.llm_requests}
    client = LLMClient(primary.base_url, "key", "scripted", **{**values, **options})
    try:
        yield client
    finally:
        await client.close()


async def turn(client: LLMClient) -> tuple[str, str | None]:
    """One reply's text and the endpoint that gave it."""
    async with client.stream(MESSAGES) as stream:
        text = "".join([part async for part in stream if isinstance(part, str)])
    return text, stream.endpoint


def requests(metrics: Metrics, endpoint: str, outcome: str) -> float:
    value = metrics.registry.get_sample_value("pono_llm_requests_total", {"endpoint": endpoint, "outcome": outcome})
    return value or 0.0


@pytest.mark.parametrize(("failure", "outcome"), [("http_500", "error"), ("http_429", "rate_limited")])
async def test_failing_primary_is_retried_then_the_fallback_answers(primary: ScriptedLLM, fallback: ScriptedLLM,
                                                                    failure: str, outcome: str) -> None:
    primary.script.failure = failure  # type: ignore[assignment]
    metrics = Metrics()
    async with resilient(primary, fallback, metrics) as client:
        assert await turn(client) == ("From the fallback.", "fallback")
        assert len(primary.script.requests) == 3  # the first try and two retries
        assert fallback.script.requests[-1]["model"] == "small-model"
        assert requests(metrics, "primary", outcome) == 3 and requests(metrics, "fallback", "ok") == 1


async def test_hanging_primary_times_out_within_the_turn_budget_and_the_fallback_answers(
        primary: ScriptedLLM, fallback: ScriptedLLM) -> None:
    primary.script.failure = "hang"
    metrics = Metrics()
    async with resilient(primary, fallback, metrics, timeout_s=2.0) as client:
        assert await turn(client) == ("From the fallback.", "fallback")
        assert requests(metrics, "primary", "timeout") >= 1
        await until(lambda: primary.chats_open == 0, "the hanging request's connection was closed")


async def test_no_retry_and_no_fallback_once_a_token_was_streamed(primary: ScriptedLLM,
                                                                  fallback: ScriptedLLM) -> None:
    primary.script.failure = "drop"  # the connection breaks after three tokens
    primary.script.reply = "One two three four five six."
    heard: list[str] = []
    async with resilient(primary, fallback, Metrics()) as client:
        with pytest.raises(LLMError):
            async for part in client.stream(MESSAGES):
                heard.append(str(part))
        assert "".join(heard) == "One two three"
        assert len(primary.script.requests) == 1 and fallback.script.requests == []


async def test_breaker_spares_a_dead_primary_and_a_probe_closes_it_when_it_recovers(
        primary: ScriptedLLM, fallback: ScriptedLLM) -> None:
    primary.script.failure = "http_500"
    metrics = Metrics()
    async with resilient(primary, fallback, metrics, retries=0, breaker_failures=3, breaker_reset_s=3600.0) as client:
        for _ in range(3):
            assert await turn(client) == ("From the fallback.", "fallback")
        assert client.breaker.state == "open"
        asked = len(primary.script.requests)
        assert await turn(client) == ("From the fallback.", "fallback")
        assert len(primary.script.requests) == asked  # the open circuit kept the turn off the primary
        assert requests(metrics, "primary", "skipped") == 1

        breaker = client.breaker
        breaker.reset_s = 0.0  # the cool-down is over: the next turn starts a probe beside it
        assert await turn(client) == ("From the fallback.", "fallback")
        await until(lambda: breaker.probes == 1 and breaker.probing is None, "the first probe ran")
        assert breaker.state == "open" and len(primary.script.requests) == asked + 1  # still failing

        primary.script.failure = "none"
        assert await turn(client) == ("From the fallback.", "fallback")
        await until(lambda: breaker.probes == 2 and breaker.probing is None, "the second probe ran")
        assert breaker.state == "closed"
        assert await turn(client) == ("From the primary.", "primary")


async def test_without_a_fallback_a_failing_primary_is_an_llm_error(primary: ScriptedLLM) -> None:
    primary.script.failure = "http_500"
    client = LLMClient(primary.base_url, "key", "scripted", timeout_s=6.0, retries=1, breaker_failures=1)
    try:
        for _ in range(2):  # the circuit never keeps the only endpoint from being tried
            with pytest.raises(LLMError):
                await turn(client)
        assert len(primary.script.requests) == 4
    finally:
        await client.close()


class OneSlotLLM:
    """Like llama.cpp's OpenAI server (llama-cpp-python, the embedded LLM; interrupt_requests is on by default):
    one request at a time, and any request that comes while a reply streams cuts that reply short: "[DONE]"
    with no finish reason, "disconnected" in its log."""

    def __init__(self, words: int = 20, interval_s: float = 0.05, listing_delay_s: float = 0.0) -> None:
        self.words, self.interval_s, self.listing_delay_s = words, interval_s, listing_delay_s
        self.slot = asyncio.Lock()
        self.waiting = 0
        self.listings = 0  # GET /v1/models received
        self.cut = 0  # replies cut short by another request
        self.app = web.Application()
        self.app.add_routes([web.get("/v1/models", self._models), web.post("/v1/chat/completions", self._chat)])
        self.runner = web.AppRunner(self.app, access_log=None, shutdown_timeout=1)
        self.base_url = ""

    @property
    def reply(self) -> str:
        return " ".join(["word"] * self.words)

    async def start(self) -> None:
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        await site.start()
        self.base_url = f"http://127.0.0.1:{site._server.sockets[0].getsockname()[1]}/v1"  # type: ignore[union-attr]

    async def _models(self, request: web.Request) -> web.Response:
        self.listings += 1
        await asyncio.sleep(self.listing_delay_s)
        self.waiting += 1
        try:
            async with self.slot:
                return web.json_response({"object": "list", "data": [{"id": "one-slot", "object": "model"}]})
        finally:
            self.waiting -= 1

    async def _chat(self, request: web.Request) -> web.StreamResponse:
        await request.json()
        self.waiting += 1
        async with self.slot:
            self.waiting -= 1
            response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
            await response.prepare(request)

            async def send(delta: dict[str, Any], finish: str | None) -> None:
                chunk = {"id": "c", "object": "chat.completion.chunk", "created": 0, "model": "one-slot",
                         "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}
                await response.write(f"data: {json.dumps(chunk)}\n\n".encode())

            for i in range(self.words):
                await send({"content": "word" if i == 0 else " word"}, None)
                await asyncio.sleep(self.interval_s)
                if self.waiting:
                    self.cut += 1
                    await response.write(b"data: [DONE]\n\n")
                    return response
            await send({}, "stop")
            await response.write(b"data: [DONE]\n\n")
            return response


@pytest.fixture
async def one_slot() -> AsyncIterator[OneSlotLLM]:
    server = OneSlotLLM()
    await server.start()
    yield server
    await server.runner.cleanup()


async def test_readiness_probe_mid_reply_does_not_cut_the_reply_short(one_slot: OneSlotLLM) -> None:
    """The flake of test_embedded_smollm2_answers: the app's readiness probe (`reachable()` every 5 s) listed
    the models while a reply streamed, llama.cpp cut the reply short, and the turn ended "truncated"."""
    client = LLMClient(one_slot.base_url, "key", "one-slot", timeout_s=5.0)
    try:
        async with client.stream(MESSAGES) as stream:
            parts = [await anext(stream)]
            assert await client.reachable()  # the reply in progress says so: nothing else is sent
            parts += [part async for part in stream]
        assert "".join(map(str, parts)) == one_slot.reply
        assert one_slot.cut == 0 and one_slot.listings == 0
        assert await client.reachable() and one_slot.listings == 1  # idle: it asks the server
    finally:
        await client.close()


async def test_reply_starting_during_a_readiness_listing_waits_for_it(one_slot: OneSlotLLM) -> None:
    one_slot.listing_delay_s = 0.3  # the listing is on its way when the turn starts
    client = LLMClient(one_slot.base_url, "key", "one-slot", timeout_s=5.0)
    try:
        listing = asyncio.create_task(client.reachable())
        await until(lambda: one_slot.listings == 1, "the listing reached the server")
        async with client.stream(MESSAGES) as stream:
            text = "".join([str(part) async for part in stream])
        assert text == one_slot.reply and one_slot.cut == 0
        assert await listing
    finally:
        await client.close()


async def test_a_stall_mid_reply_is_an_error_and_an_unfinished_body_is_truncated(primary: ScriptedLLM) -> None:
    """Our own timeout interrupting the stream is "broke off", never a complete or a truncated answer."""
    primary.script.reply = "One two three four five six."
    primary.script.token_interval_s = 2.0  # silent for 2 s after the second token
    client = LLMClient(primary.base_url, "key", "scripted", timeout_s=0.5, retries=0)
    try:
        heard: list[str] = []
        with pytest.raises(LLMError, match="broke off") as raised:
            async for part in client.stream(MESSAGES):
                heard.append(str(part))
        assert not isinstance(raised.value, LLMTruncated) and "".join(heard) == "One two"
        primary.script.token_interval_s = 0.0
        primary.script.failure = "truncate"  # the body ends after four tokens: no finish reason
        with pytest.raises(LLMTruncated):
            await turn(client)
    finally:
        await client.close()


async def test_a_slow_consumer_does_not_trip_the_stall_timeout(primary: ScriptedLLM) -> None:
    """The between-token timeout measures the server's silence, not the time we spend speaking a part."""
    primary.script.reply = "One two three"
    client = LLMClient(primary.base_url, "key", "scripted", timeout_s=0.5, retries=0)
    try:
        heard: list[str] = []
        async for part in client.stream(MESSAGES):
            heard.append(str(part))
            await asyncio.sleep(0.8)  # the reply loop speaking TTS, longer than the stall timeout
        assert "".join(heard) == "One two three"
    finally:
        await client.close()
