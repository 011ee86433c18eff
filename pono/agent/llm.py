"""The agent's LLM: any OpenAI-compatible chat endpoint, streamed through the `openai` client, with an
optional fallback endpoint, retries and a circuit breaker (`llm_resilience`).

Until the first token a failing request may be retried, and then handed to the fallback, within the turn's
budget (`timeout_s`, PONO_LLM_TIMEOUT_S). Once a token has been streamed nothing is retried: the caller may
already be hearing it. Every HTTP stream is closed however the reply ends: finished, failed, timed out, or
cancelled at any await (a barge-in, a dropped preemptive reply), so the server stops generating.
"""

from __future__ import annotations

import asyncio
import logging
import weakref
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import openai

from pono.agent.llm_resilience import (
    AttemptTimeout,
    CircuitBreaker,
    Outcome,
    count,
    counts_against_endpoint,
    outcome_of,
    retry_policy,
)

log = logging.getLogger(__name__)


class LLMError(Exception):
    """The LLM could not produce a reply (down, timed out, refused), or its stream broke off."""


class LLMTruncated(LLMError):
    """The stream ended without a finish reason: the body simply stopped (a dropped proxy, a crashed
    worker). What came before it is only part of an answer."""


@dataclass(frozen=True, slots=True)
class ToolCallPart:
    """A fragment of a streamed tool call; fragments with the same index make one call."""

    index: int
    id: str | None
    name: str | None
    arguments: str


class Endpoint:
    """One OpenAI-compatible server: `base_url` (".../v1"), `api_key`, default `model`; `name` labels metrics
    and says which endpoint answered ("primary" or "fallback")."""

    def __init__(self, name: str, base_url: str, api_key: str, model: str, timeout_s: float) -> None:
        self.name = name
        self.base_url = base_url
        self.model = model
        self.client = openai.AsyncOpenAI(base_url=base_url, api_key=api_key, timeout=timeout_s, max_retries=0)
        self._opening = 0  # requests sent that have not yet streamed their first chunk (or failed)
        self._streams: weakref.WeakSet[Any] = weakref.WeakSet()  # streams handed over: in flight until closed
        self._reachable = False  # what the last listing, or the last request, said
        self._listings: set[asyncio.Future[None]] = set()  # reachable()'s requests in progress

    async def open(self, request: dict[str, Any], timeout_s: float) -> tuple[Any, Any]:
        """Start a streamed completion and wait for its first chunk: (the openai AsyncStream, that chunk or
        None for an empty stream). Raises AttemptTimeout after `timeout_s`, or openai's error. The stream is
        closed here if anything (a cancellation too) stops it before it is handed over."""
        stream = None
        self._opening += 1
        try:
            async with asyncio.timeout(max(0.01, timeout_s)):
                if self._listings:  # sent first, it would cut this reply short on a one-slot server
                    await asyncio.wait(set(self._listings))
                stream = await self.client.chat.completions.create(**request, stream=True)
                first = await anext(stream, None)
        except TimeoutError:
            self._reachable = False
            await _close(stream)
            raise AttemptTimeout(f"no first token from {self.name} in {timeout_s:.1f} s") from None
        except BaseException as exc:
            if isinstance(exc, openai.APIConnectionError):
                self._reachable = False
            await _close(stream)
            raise
        finally:
            self._opening -= 1
        self._reachable = True
        self._streams.add(stream)
        return stream, first

    async def healthy(self, timeout_s: float = 5.0) -> bool:
        """A one-token streamed completion, closed at its first chunk: True when the endpoint answers chat
        requests as turns make them (the breaker's probe)."""
        try:
            stream, _ = await self.open({"model": self.model, "messages": [{"role": "user", "content": "ping"}],
                                         "max_tokens": 1}, timeout_s)
        except (AttemptTimeout, openai.OpenAIError):
            return False
        await _close(stream)
        return True

    def streaming(self) -> bool:
        """Whether one of our streams from this endpoint is open (its first chunk came, it is not closed)."""
        return any(not stream.response.is_closed for stream in list(self._streams))

    async def reachable(self) -> bool:
        """Whether the endpoint lists its models within 3 s. While one of our requests to it is in progress,
        that request answers instead and nothing is sent: a server with one slot cuts the reply it is
        streaming short to serve any other request (llama.cpp's OpenAI server with interrupt_requests, its
        default: the stream just ends, with no finish reason), or makes the listing wait for the whole reply.
        A stream that is open says True; a request still waiting for its first chunk, what was last known.
        A reply that starts while the listing is in progress waits for it."""
        if self.streaming():
            return True
        if self._opening:
            return self._reachable
        listing = asyncio.get_running_loop().create_future()
        self._listings.add(listing)  # a reply starting now waits for it (a few ms), not the other way round
        try:
            async with asyncio.timeout(3):
                await self.client.models.list()
            self._reachable = True
        except Exception:
            self._reachable = False
        finally:
            self._listings.discard(listing)
            listing.set_result(None)
        return self._reachable


async def _close(stream: Any) -> None:
    if stream is not None:
        await stream.close()  # closes the HTTP response: the connection is dropped, the server stops


class LLMStream:
    """What `LLMClient.stream` returns: an async iterator of text deltas (str) and ToolCallPart.

    Once the first token has come, `endpoint` says which endpoint answered ("primary" or "fallback"), and
    `base_url`/`model` which server and model; before that they are None. Closing it (`aclose()`,
    `async with`), cancelling the task that iterates it, or finishing it closes the HTTP stream.
    Iterating raises LLMError when no endpoint could answer, or when the stream breaks or stalls.
    """

    def __init__(self, client: LLMClient, request: dict[str, Any], model: str | None) -> None:
        self.endpoint: str | None = None
        self.base_url: str | None = None
        self.model: str | None = None
        self._parts = client._run(self, request, model)

    def __aiter__(self) -> LLMStream:
        return self

    async def __anext__(self) -> str | ToolCallPart:
        return await self._parts.__anext__()

    async def aclose(self) -> None:
        await self._parts.aclose()

    async def __aenter__(self) -> LLMStream:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()


class LLMClient:
    """The agent's LLM: a primary OpenAI-compatible endpoint and, optionally, a fallback.

    Primary: `base_url`, `api_key`, `model` (a persona may ask for another model per request). `timeout_s`:
    the turn's budget for the first token, and the longest stall between tokens. `retries`: extra tries of
    a retryable failure (timeout, connection error, 429, 5xx) on an endpoint, with backoff, within the budget.
    `fallback_url`/`fallback_model`/`fallback_api_key`: where a turn goes when the primary fails, or while its
    circuit is open; with one, the primary gets at most half of the budget. `breaker_failures` failures in a
    row open the primary's circuit; `breaker_reset_s` later a background probe closes it once the primary
    answers. Without a fallback the primary is always tried. `requests_counter`: a Prometheus counter with
    labels (endpoint, outcome) — `pono_llm_requests_total`.
    """

    def __init__(
        self,
        base_url: str,
        api_key: str,
        model: str,
        *,
        timeout_s: float = 15.0,
        max_tokens: int = 160,
        temperature: float = 0.6,
        retries: int = 2,
        fallback_url: str | None = None,
        fallback_model: str | None = None,
        fallback_api_key: str | None = None,
        breaker_failures: int = 3,
        breaker_reset_s: float = 30.0,
        requests_counter: Any = None,
    ) -> None:
        self.base_url = base_url
        self.model = model
        self.timeout_s = timeout_s
        self.max_tokens = max_tokens
        self.temperature = temperature
        self.retries = max(0, retries)
        self.primary = Endpoint("primary", base_url, api_key, model, timeout_s)
        self.client = self.primary.client
        self.fallback = Endpoint("fallback", fallback_url, fallback_api_key or api_key, fallback_model or model,
                                 timeout_s) if fallback_url else None
        self.breaker = CircuitBreaker(lambda: self.primary.healthy(min(5.0, timeout_s)), failures=breaker_failures,
                                      reset_s=breaker_reset_s)
        self.requests_counter = requests_counter

    def stream(self, messages: list[dict[str, Any]], *, model: str | None = None,
               temperature: float | None = None, max_tokens: int | None = None,
               tools: list[dict[str, Any]] | None = None) -> LLMStream:
        """Stream a reply to `messages` (OpenAI chat format), offering `tools` (OpenAI function schemas).
        `model` (the primary's; the fallback keeps its own), `temperature` and `max_tokens` override the
        defaults. See LLMStream for what iterating yields and raises."""
        request: dict[str, Any] = {
            "messages": messages,
            "max_tokens": max_tokens or self.max_tokens,
            "temperature": self.temperature if temperature is None else temperature,
        }
        if tools:
            request.update(tools=tools, parallel_tool_calls=True)
        return LLMStream(self, request, model)

    async def _run(self, out: LLMStream, request: dict[str, Any], model: str | None) -> \
            AsyncIterator[str | ToolCallPart]:
        endpoint, stream, first = await self._first_token(request, model)
        out.endpoint, out.base_url = endpoint.name, endpoint.base_url
        out.model = model if endpoint is self.primary and model else endpoint.model
        outcome: Outcome = "cancelled"
        try:
            chunk = first
            finished = False
            # Between tokens, a stall as long as the whole timeout means the server is gone.
            while chunk is not None:
                finished = finished or any(c.finish_reason for c in chunk.choices or ())
                for part in _parts(chunk):
                    yield part
                async with asyncio.timeout(self.timeout_s):
                    chunk = await anext(stream, None)
            if not finished:
                outcome = "truncated"
                raise LLMTruncated(f"{endpoint.name}'s stream ended without a finish reason")
            outcome = "ok"
        except (TimeoutError, openai.OpenAIError) as exc:
            outcome = outcome_of(exc)
            if endpoint is self.primary:
                self.breaker.record_failure()
            raise LLMError(f"{endpoint.name} broke off: {type(exc).__name__}: {exc}") from exc
        finally:
            count(self.requests_counter, endpoint.name, outcome)
            await _close(stream)

    async def _first_token(self, request: dict[str, Any], model: str | None) -> tuple[Endpoint, Any, Any]:
        """The endpoint that answered, its open stream and first chunk; LLMError when none did in time."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.timeout_s
        failures: list[str] = []
        use_primary = self.fallback is None or self.breaker.allows()
        if use_primary:
            # With a fallback to turn to, the primary gets at most half of the budget.
            share = self.timeout_s / 2 if self.fallback is not None else self.timeout_s
            try:
                stream, first = await self._attempts(self.primary, {**request, "model": model or self.model},
                                                     loop.time() + share)
                return self.primary, stream, first
            except (AttemptTimeout, TimeoutError, openai.OpenAIError) as exc:
                failures.append(f"primary: {type(exc).__name__}: {exc}")
                if self.fallback is None:
                    raise LLMError(failures[0]) from exc
        else:
            count(self.requests_counter, "primary", "skipped")
            failures.append("primary: circuit open")
        assert self.fallback is not None
        try:
            stream, first = await self._attempts(self.fallback, {**request, "model": self.fallback.model}, deadline)
        except (AttemptTimeout, TimeoutError, openai.OpenAIError) as exc:
            failures.append(f"fallback: {type(exc).__name__}: {exc}")
            raise LLMError("; ".join(failures)) from exc
        log.info("LLM turn answered by the fallback (%s)", failures[0])
        return self.fallback, stream, first

    async def _attempts(self, endpoint: Endpoint, request: dict[str, Any], until: float) -> tuple[Any, Any]:
        """Try `endpoint` (retrying retryable failures with backoff) until the loop time `until`."""
        loop = asyncio.get_running_loop()
        async for attempt in retry_policy(1 + self.retries, until - loop.time()):
            with attempt:
                try:
                    result = await endpoint.open(request, until - loop.time())
                except (AttemptTimeout, TimeoutError, openai.OpenAIError) as exc:
                    count(self.requests_counter, endpoint.name, outcome_of(exc))
                    if endpoint is self.primary and counts_against_endpoint(exc):
                        self.breaker.record_failure()
                    raise
                if endpoint is self.primary:
                    self.breaker.record_success()
                return result
        raise AssertionError("unreachable: tenacity re-raises the last failure")

    async def reachable(self) -> bool:
        """Whether a turn could be answered: the primary, or else the fallback, lists its models."""
        if await self.primary.reachable():
            return True
        return self.fallback is not None and await self.fallback.reachable()

    async def close(self) -> None:
        await self.breaker.close()
        await self.primary.client.close()
        if self.fallback is not None:
            await self.fallback.client.close()


def _parts(chunk: Any) -> list[str | ToolCallPart]:
    if not chunk.choices:
        return []
    delta = chunk.choices[0].delta
    parts: list[str | ToolCallPart] = []
    if delta.content:
        parts.append(delta.content)
    for call in delta.tool_calls or []:
        function = call.function
        parts.append(ToolCallPart(call.index, call.id, function.name if function else None,
                                  (function.arguments or "") if function else ""))
    return parts
