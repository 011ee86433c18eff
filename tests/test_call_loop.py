"""The call loop's pieces without audio: the turn state machine and the reply scheduler."""

from __future__ import annotations

import asyncio

from pono.voice.scheduler import Priority, ReplyScheduler, SpeechHandle
from pono.voice.state import CallState, TurnStateMachine


def machine() -> tuple[TurnStateMachine, list[str]]:
    seen: list[str] = []
    return TurnStateMachine(lambda state: seen.append(str(state))), seen


def test_a_turn_goes_round_the_states() -> None:
    m, seen = machine()
    m.caller_started(agent_busy=False)
    m.thinking()
    m.speaking()
    m.agent_done()
    assert seen == ["user_speaking", "thinking", "speaking", "listening"]


def test_speech_over_the_agent_is_not_a_turn_until_it_barges_in() -> None:
    m, seen = machine()
    m.thinking()
    m.speaking()
    m.caller_started(agent_busy=True)
    assert m.state is CallState.SPEAKING
    m.barge_in()
    assert seen[-1] == "user_speaking"


def test_the_agent_finishing_does_not_take_the_floor_from_a_speaking_caller() -> None:
    m, seen = machine()
    m.caller_started(agent_busy=False)
    m.agent_done()  # e.g. a dropped preemptive reply while the caller goes on
    assert m.state is CallState.USER_SPEAKING and seen == ["user_speaking"]


def test_an_operator_holds_the_state_until_hand_back() -> None:
    m, seen = machine()
    m.take_over("ann")
    m.caller_started(agent_busy=False)
    m.thinking()
    m.speaking()
    assert m.state is CallState.OPERATOR and seen == ["operator"]
    assert m.hand_back() is True and m.state is CallState.LISTENING
    assert m.hand_back() is False
    assert seen == ["operator", "listening"]


def test_each_change_is_reported_once() -> None:
    m, seen = machine()
    m.thinking()
    m.thinking()
    assert seen == ["thinking"]


class Player:
    """Speech work that records which handles play, and fails if two ever play at once."""

    def __init__(self) -> None:
        self.playing: set[str] = set()
        self.overlaps = 0
        self.order: list[str] = []
        self.release: dict[str, asyncio.Event] = {}

    def work(self, name: str):
        self.release[name] = asyncio.Event()

        async def run(handle: SpeechHandle) -> None:
            self.overlaps += bool(self.playing)
            self.playing.add(name)
            self.order.append(name)
            try:
                await self.release[name].wait()
                handle.heard = name
            finally:
                self.playing.discard(name)
        return run


async def test_one_handle_plays_at_a_time_highest_priority_first() -> None:
    player, idle = Player(), []
    scheduler = ReplyScheduler(on_idle=lambda: idle.append(True))
    a = scheduler.schedule(SpeechHandle("reply", player.work("a")))
    b = scheduler.schedule(SpeechHandle("reply", player.work("b")))
    c = scheduler.schedule(SpeechHandle("operator", player.work("c"), priority=Priority.HIGH))
    await asyncio.sleep(0)
    assert player.playing == {"a"} and [h.kind for h in scheduler.queued] == ["operator", "reply"]
    for name in ("a", "c", "b"):
        player.release[name].set()
        await asyncio.sleep(0.01)
    await asyncio.gather(a.wait_for_playout(), b.wait_for_playout(), c.wait_for_playout())
    assert player.order == ["a", "c", "b"] and player.overlaps == 0
    assert [a.heard, b.heard, c.heard] == ["a", "b", "c"] and not a.interrupted
    assert idle and not scheduler.busy


async def test_interrupt_stops_the_current_handle_and_drops_the_queue() -> None:
    player = Player()
    scheduler = ReplyScheduler()
    a = scheduler.schedule(SpeechHandle("reply", player.work("a")))
    b = scheduler.schedule(SpeechHandle("reply", player.work("b")))
    await asyncio.sleep(0)
    stopped = await scheduler.interrupt()
    assert stopped is a and a.interrupted and a.done and b.interrupted and b.done
    assert player.order == ["a"] and not player.playing and not scheduler.busy


async def test_a_notice_that_may_not_be_interrupted_plays_through_a_barge_in() -> None:
    player = Player()
    scheduler = ReplyScheduler()
    notice = scheduler.schedule(SpeechHandle("warning", player.work("notice"), allow_interruptions=False))
    queued = scheduler.schedule(SpeechHandle("reply", player.work("reply")))
    await asyncio.sleep(0)
    assert await scheduler.interrupt() is None
    assert notice.playing and queued.interrupted
    assert await scheduler.interrupt(force=True) is notice and notice.interrupted


async def test_a_closed_scheduler_plays_nothing_more() -> None:
    player = Player()
    scheduler = ReplyScheduler()
    scheduler.schedule(SpeechHandle("reply", player.work("a")))
    await asyncio.sleep(0)
    await scheduler.close()
    late = scheduler.schedule(SpeechHandle("reply", player.work("late")))
    await asyncio.sleep(0.01)
    assert late.done and late.interrupted and player.order == ["a"]


async def test_a_failing_handle_is_reported_and_the_next_one_plays() -> None:
    failures: list[str] = []
    player = Player()

    async def broken(handle: SpeechHandle) -> None:
        raise RuntimeError("boom")

    scheduler = ReplyScheduler(on_failed=lambda handle, exc: failures.append(f"{handle.kind}: {exc}"))
    scheduler.schedule(SpeechHandle("reply", broken))
    after = scheduler.schedule(SpeechHandle("reply", player.work("after")))
    await asyncio.sleep(0.01)
    assert failures == ["reply: boom"] and player.playing == {"after"}
    player.release["after"].set()
    await after.wait_for_playout()
