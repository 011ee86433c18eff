"""The reply scheduler: everything the agent says is one handle in one queue, and at most one plays.

An LLM reply, the greeting, an operator's "say" and a safety warning are each a `SpeechHandle`. The
scheduler starts the next handle only when the current one is done, so two utterances never play
interleaved. Barge-in, hang-up and take-over interrupt the current handle and drop the queued ones.

Modelled on LiveKit Agents' `SpeechHandle` (livekit-agents/livekit/agents/voice/speech_handle.py): a
priority, whether it may be interrupted, a way to await its playout, and an interrupt that the work
watches. Pono's handles are simpler: the work is one coroutine, run as its own task once authorised, and
interrupting it cancels that task.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
from collections.abc import Callable, Coroutine
from enum import IntEnum
from typing import Any

log = logging.getLogger(__name__)


class Priority(IntEnum):
    """Queued handles play highest priority first, then in the order they were scheduled."""

    NORMAL = 5  # LLM replies and the greeting
    HIGH = 10  # an operator's words and safety warnings go before queued replies


SpeechWork = Callable[["SpeechHandle"], Coroutine[Any, Any, None]]
_ids = itertools.count(1)


class SpeechHandle:
    """One utterance the agent will say.

    `kind` names what it is ("reply", "greeting", "operator", "warning", "filler"). `work(handle)` generates
    and plays it; it runs as its own task once the scheduler authorises it, and is cancelled on interrupt.
    `heard` is the text the caller actually heard, set by the work (or by whoever interrupts it) from the
    transport's playout clock. A handle with `allow_interruptions=False` (a legal notice) plays whole through
    a barge-in; hang-up and take-over still stop it.
    """

    def __init__(self, kind: str, work: SpeechWork, *, priority: Priority = Priority.NORMAL,
                 allow_interruptions: bool = True, name: str = "") -> None:
        self.id = next(_ids)
        self.kind = kind
        self.priority = priority
        self.allow_interruptions = allow_interruptions
        self.name = name or f"speech-{kind}-{self.id}"
        self.heard = ""
        self.interrupted = False
        self.task: asyncio.Task[None] | None = None
        self._work = work
        self._done = asyncio.get_running_loop().create_future()

    @property
    def done(self) -> bool:
        """True once the handle played to its end, was interrupted, or was dropped from the queue."""
        return self._done.done()

    @property
    def playing(self) -> bool:
        """True while the handle's work runs (it is the scheduler's current handle)."""
        return self.task is not None and not self.task.done()

    async def wait_for_playout(self) -> None:
        """Return when the handle is done, however it ended. Never raises."""
        await asyncio.shield(self._done)

    def _start(self, on_done: Callable[[SpeechHandle], None]) -> None:
        self.task = asyncio.create_task(self._work(self), name=self.name)
        self.task.add_done_callback(lambda task: self._finished(task, on_done))

    def _finished(self, task: asyncio.Task[None], on_done: Callable[[SpeechHandle], None]) -> None:
        if task.cancelled():
            self.interrupted = True
        self._resolve()
        on_done(self)

    def _resolve(self) -> None:
        if not self._done.done():
            self._done.set_result(None)

    def _drop(self) -> None:
        """Never played: it was queued when the scheduler was interrupted."""
        self.interrupted = True
        self._resolve()


class ReplyScheduler:
    """One queue of `SpeechHandle`s for one call; at most one plays at a time.

    `on_failed(handle, exc)` is told when a handle's work raised (the call logs it and turns it into an error
    event; without `on_failed` the scheduler logs it);
    `on_idle()` when the last handle is done and nothing is queued.
    """

    def __init__(self, *, on_idle: Callable[[], None] | None = None,
                 on_failed: Callable[[SpeechHandle, BaseException], None] | None = None) -> None:
        self.current: SpeechHandle | None = None
        self._queue: list[SpeechHandle] = []
        self._on_idle = on_idle
        self._on_failed = on_failed
        self._closed = False

    @property
    def busy(self) -> bool:
        """True while a handle plays or waits in the queue."""
        return self.current is not None or bool(self._queue)

    @property
    def queued(self) -> list[SpeechHandle]:
        """The handles waiting to play, in the order they will play."""
        return sorted(self._queue, key=lambda h: (-h.priority, h.id))

    def schedule(self, handle: SpeechHandle) -> SpeechHandle:
        """Queue `handle`; it starts at once when nothing plays. After `close()` it is dropped unplayed."""
        if self._closed:
            handle._drop()
            return handle
        self._queue.append(handle)
        self._next()
        return handle

    def _next(self) -> None:
        if self.current is not None or not self._queue or self._closed:
            return
        handle = self.queued[0]
        self._queue.remove(handle)
        self.current = handle
        handle._start(self._handle_done)

    def _handle_done(self, handle: SpeechHandle) -> None:
        exc = None if handle.task is None or handle.task.cancelled() else handle.task.exception()
        if exc is not None:
            if self._on_failed is not None:
                self._on_failed(handle, exc)  # it logs the failure
            else:
                log.error("%s failed", handle.name, exc_info=exc)
        if self.current is handle:
            self.current = None
        self._next()
        if self.current is None and self._on_idle is not None:
            self._on_idle()

    def drop_queued(self) -> None:
        """Drop every handle that has not started; each is marked interrupted and resolved."""
        dropped, self._queue = self._queue, []
        for handle in dropped:
            handle._drop()

    async def interrupt(self, *, force: bool = False) -> SpeechHandle | None:
        """Stop the current handle (cancel its work and wait for it) and drop the queued ones.

        A current handle that does not allow interruptions keeps playing unless `force` (hang-up,
        take-over). Returns the handle that was stopped, or None.
        """
        self.drop_queued()
        handle = self.current
        if handle is None or handle.task is None:
            return None
        if not handle.allow_interruptions and not force:
            return None
        handle.interrupted = True
        handle.task.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await handle.task
        return handle

    async def close(self) -> None:
        """Interrupt everything and refuse new handles: the call is over."""
        self._closed = True
        await self.interrupt(force=True)
