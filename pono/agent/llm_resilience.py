"""How the agent's LLM client survives a failing endpoint: which failures to retry, how long to back off, and
a circuit breaker that stops sending turns to an endpoint that keeps failing.

Retries use tenacity (`retry_policy`). The breaker is hand-rolled (about 60 lines): the libraries looked at
(purgatory, aiobreaker, pybreaker) let the next real request through when half-open, so a turn would wait a
dead endpoint's whole timeout to find out; here the half-open step is a cheap background health probe
(a one-token completion) while turns keep going to the fallback, and only one probe runs at a time.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any, Literal

import openai
from tenacity import AsyncRetrying, RetryCallState, retry_if_exception, stop_after_attempt, stop_before_delay
from tenacity.wait import wait_exponential_jitter

log = logging.getLogger(__name__)

# The `outcome` label of pono_llm_requests_total: what happened to one request to one endpoint.
Outcome = Literal["ok", "cancelled", "error", "timeout", "rate_limited", "skipped", "truncated"]
NOT_RETRIED = (400, 404, 413, 422)  # the request itself is wrong: the same request fails again


class AttemptTimeout(Exception):
    """An endpoint did not send its first token within the time this attempt had."""


def outcome_of(exc: BaseException) -> Outcome:
    """The metrics outcome for a failed attempt."""
    if isinstance(exc, openai.RateLimitError):
        return "rate_limited"
    if isinstance(exc, AttemptTimeout | TimeoutError | openai.APITimeoutError):
        return "timeout"
    return "error"


def retryable(exc: BaseException) -> bool:
    """Worth another try on the same endpoint: timeouts, connection failures, 429, 408, 409 and 5xx."""
    if isinstance(exc, openai.APIStatusError):
        return exc.status_code in (408, 409, 429) or exc.status_code >= 500
    return isinstance(exc, AttemptTimeout | TimeoutError | openai.APIConnectionError)


def counts_against_endpoint(exc: BaseException) -> bool:
    """Whether a failure says the endpoint is unwell (for the breaker), not that one request was bad."""
    return not (isinstance(exc, openai.APIStatusError) and exc.status_code in NOT_RETRIED)


def retry_after_s(exc: BaseException | None) -> float:
    """Seconds a 429/503's `Retry-After` (or `retry-after-ms`) header asks for; 0 when absent."""
    response = getattr(exc, "response", None)
    headers = getattr(response, "headers", None)
    if not headers:
        return 0.0
    with contextlib.suppress(TypeError, ValueError):
        if headers.get("retry-after-ms") is not None:
            return max(0.0, float(headers["retry-after-ms"]) / 1000)
        if headers.get("retry-after") is not None:
            return max(0.0, float(headers["retry-after"]))
    return 0.0


def retry_policy(attempts: int, within_s: float, *, first_backoff_s: float = 0.2,
                 max_backoff_s: float = 2.0) -> AsyncRetrying:
    """Up to `attempts` tries of a retryable failure, never starting one (backoff included) past `within_s`
    seconds from the first. Backoff: exponential from `first_backoff_s` with jitter, at most `max_backoff_s`,
    or longer when the server's Retry-After asks for it (then the budget usually ends the retries)."""
    backoff = wait_exponential_jitter(multiplier=first_backoff_s, max=max_backoff_s, jitter=first_backoff_s / 2)

    def wait(state: RetryCallState) -> float:
        failure = state.outcome.exception() if state.outcome is not None else None
        return max(backoff(state), retry_after_s(failure))

    return AsyncRetrying(stop=stop_after_attempt(max(1, attempts)) | stop_before_delay(max(0.0, within_s)),
                         wait=wait, retry=retry_if_exception(retryable), reraise=True)


class CircuitBreaker:
    """Closed → (`failures` failures in a row) → open → (`reset_s` later) a health probe runs in the background
    → closed when it succeeds, open for another `reset_s` when it fails.

    `allows()` says whether to send a turn to the endpoint; while open it starts the probe once due. `probe`:
    an async callable returning True when the endpoint answers. `probing` is the running probe task (None
    when none runs), `probes` the number started. `clock`: seconds, monotonic.
    """

    def __init__(self, probe: Callable[[], Awaitable[bool]], *, failures: int = 3, reset_s: float = 30.0,
                 name: str = "primary", clock: Callable[[], float] = time.monotonic) -> None:
        self.probe = probe
        self.failures = max(1, failures)
        self.reset_s = reset_s
        self.name = name
        self.clock = clock
        self.state: Literal["closed", "open"] = "closed"
        self.consecutive_failures = 0
        self.opened_at = 0.0
        self.probing: asyncio.Task[None] | None = None
        self.probes = 0  # probes started

    def allows(self) -> bool:
        if self.state == "closed":
            return True
        if self.probing is None and self.clock() - self.opened_at >= self.reset_s:
            self.probes += 1
            self.probing = asyncio.create_task(self._probe(), name=f"llm-probe-{self.name}")
        return False

    def record_success(self) -> None:
        if self.state == "open":
            log.info("LLM endpoint %s answered again: circuit closed", self.name)
        self.state, self.consecutive_failures = "closed", 0

    def record_failure(self) -> None:
        self.consecutive_failures += 1
        if self.state == "closed" and self.consecutive_failures >= self.failures:
            log.warning("LLM endpoint %s failed %d times in a row: circuit open for %g s", self.name,
                        self.consecutive_failures, self.reset_s)
            self.state, self.opened_at = "open", self.clock()

    async def _probe(self) -> None:
        try:
            healthy = await self.probe()
        except Exception as exc:  # a probe that raises is a failed probe
            log.info("LLM endpoint %s probe failed: %s", self.name, type(exc).__name__)
            healthy = False
        finally:
            self.probing = None
        if healthy:
            self.record_success()
        else:
            self.opened_at = self.clock()

    async def close(self) -> None:
        task, self.probing = self.probing, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task


def count(counter: Any, endpoint: str, outcome: Outcome) -> None:
    """`counter.labels(endpoint, outcome).inc()` when a Prometheus counter was given."""
    if counter is not None:
        counter.labels(endpoint, outcome).inc()
