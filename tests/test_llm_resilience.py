"""The agent's LLM client against real scripted OpenAI-compatible servers: streams are closed however they
end, a failing primary is retried and then replaced by a fallback, and a circuit breaker spares a dead one."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest

from pono.agent.llm import LLMClient, LLMError
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


def resilient(primary: ScriptedLLM, fallback: ScriptedLLM, metrics: Metrics, **options: Any) -> LLMClient:
    values: dict[str, Any] = {"timeout_s": 6.0, "retries": 2, "fallback_url": fallback.base_url,
                              "fallback_model": "small-model", "breaker_failures": 100,
                              "requests_counter": metrics.llm_requests}
    return LLMClient(primary.base_url, "key", "scripted", **{**values, **options})


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
    client = resilient(primary, fallback, metrics)
    try:
        assert await turn(client) == ("From the fallback.", "fallback")
        assert len(primary.script.requests) == 3  # the first try and two retries
        assert fallback.script.requests[-1]["model"] == "small-model"
        assert requests(metrics, "primary", outcome) == 3 and requests(metrics, "fallback", "ok") == 1
    finally:
        await client.close()


async def test_hanging_primary_times_out_within_the_turn_budget_and_the_fallback_answers(
        primary: ScriptedLLM, fallback: ScriptedLLM) -> None:
    primary.script.failure = "hang"
    metrics = Metrics()
    client = resilient(primary, fallback, metrics, timeout_s=2.0)
    try:
        assert await turn(client) == ("From the fallback.", "fallback")
        assert requests(metrics, "primary", "timeout") >= 1
        await until(lambda: primary.chats_open == 0, "the hanging request's connection was closed")
    finally:
        await client.close()


async def test_no_retry_and_no_fallback_once_a_token_was_streamed(primary: ScriptedLLM,
                                                                  fallback: ScriptedLLM) -> None:
    primary.script.failure = "drop"  # the connection breaks after three tokens
    primary.script.reply = "One two three four five six."
    client = resilient(primary, fallback, Metrics())
    heard: list[str] = []
    try:
        with pytest.raises(LLMError):
            async for part in client.stream(MESSAGES):
                heard.append(str(part))
        assert "".join(heard) == "One two three"
        assert len(primary.script.requests) == 1 and fallback.script.requests == []
    finally:
        await client.close()


async def test_breaker_spares_a_dead_primary_and_a_probe_closes_it_when_it_recovers(
        primary: ScriptedLLM, fallback: ScriptedLLM) -> None:
    primary.script.failure = "http_500"
    metrics = Metrics()
    client = resilient(primary, fallback, metrics, retries=0, breaker_failures=3, breaker_reset_s=3600.0)
    try:
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
    finally:
        await client.close()


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
