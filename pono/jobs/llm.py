"""The LLM as jobs use it: a summary gives way to live calls where they share one LLM that serves one request at
a time (the bundled llama.cpp model, or a one-slot server behind OPENAI_BASE_URL with PONO_JOBS_LLM_YIELD=always).

`busy()` (set by the composition root) says whether live calls need the LLM now: on a replica whose LLM is the
bundled model, whether any call is live on it. While it does, a summary waits before sending its request; if a
call starts while a summary is being written, the summary's request is dropped at once (llama.cpp stops
generating when its client leaves) and asked again, from the start, once calls end. So a call's turn never
queues behind a summary. Without `busy` (a remote LLM that serves many requests at once) summaries go at once.
A summary waits at most `max_wait_s` in all; then it fails with LLMBusy, and the run can be retried later.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from typing import Any

from pono.agent.llm import LLMClient

log = logging.getLogger(__name__)


class LLMBusy(Exception):
    """Live calls kept the LLM busy longer than a job may wait."""


class _Preempted(Exception):
    """A live call needed the LLM while a job's request was being answered."""


class JobLLM:
    """`llm` for jobs, yielding to live calls while `busy()` is true (None: never busy)."""

    def __init__(self, llm: LLMClient, busy: Callable[[], bool] | None = None, *, max_wait_s: float = 600.0,
                 poll_s: float = 0.2) -> None:
        self.llm = llm
        self.busy = busy
        self.max_wait_s = max_wait_s
        self.poll_s = poll_s
        self.preempted = 0  # requests dropped for a live call (and asked again later)

    async def complete(self, messages: list[dict[str, Any]], *, max_tokens: int, temperature: float,
                       timeout_s: float) -> str:
        """The LLM's whole answer to `messages`. `timeout_s` bounds each try at the answer (not the waits for
        live calls). Raises LLMBusy, TimeoutError, and LLMError (pono.agent.llm) when the LLM fails."""
        deadline = asyncio.get_running_loop().time() + self.max_wait_s
        while True:
            await self._idle(deadline)
            try:
                return await self._answer(messages, max_tokens, temperature, timeout_s)
            except _Preempted:
                self.preempted += 1
                log.info("a job's LLM request gave way to a live call; it is asked again once calls end")

    async def _idle(self, deadline: float) -> None:
        loop = asyncio.get_running_loop()
        while self.busy is not None and self.busy():
            if loop.time() >= deadline:
                raise LLMBusy(f"live calls kept the LLM busy for {self.max_wait_s:g} s; retry the run later")
            await asyncio.sleep(self.poll_s)

    async def _collect(self, messages: list[dict[str, Any]], max_tokens: int, temperature: float) -> str:
        async with self.llm.stream(messages, max_tokens=max_tokens, temperature=temperature) as stream:
            return "".join([part async for part in stream if isinstance(part, str)])

    async def _answer(self, messages: list[dict[str, Any]], max_tokens: int, temperature: float,
                      timeout_s: float) -> str:
        task = asyncio.ensure_future(self._collect(messages, max_tokens, temperature))
        try:
            async with asyncio.timeout(timeout_s):
                while True:
                    done, _ = await asyncio.wait({task}, timeout=self.poll_s)
                    if done:
                        return task.result()
                    if self.busy is not None and self.busy():
                        raise _Preempted
        finally:
            if not task.done():
                task.cancel()  # closes the request: the LLM server stops generating
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task
