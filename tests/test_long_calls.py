"""Long calls stay flat: per-call buffers and observers that must not grow with the call's length."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from types import SimpleNamespace
from typing import Any

import numpy as np
from aiortc import RTCPeerConnection

from pono.events import EventStream, EventType
from pono.settings import Settings
from pono.signaling import webrtc
from pono.signaling.ice import restrict_host_addresses
from pono.signaling.operator_media import OperatorMedia
from pono.voice.tap import TappedTransport


class StalledChannel:
    """A data channel whose peer stopped reading: aiortc keeps queueing what is sent (bufferedAmount)."""

    readyState = "open"

    def __init__(self) -> None:
        self.sent: list[str] = []
        self.bufferedAmount = 0

    def send(self, text: str) -> None:
        self.sent.append(text)
        self.bufferedAmount += len(text)


async def test_messages_to_a_caller_who_reads_nothing_stop_piling_up() -> None:
    transport = webrtc.WebRTCTransport(RTCPeerConnection())
    channel = StalledChannel()
    transport._channel = channel  # type: ignore[assignment]
    try:
        delta = {"type": "agent.delta", "text": "x" * 1000}
        for _ in range(3000):  # about 3 MB of events over a long call
            transport.send_text(delta)
        assert channel.bufferedAmount <= webrtc._CHANNEL_BUFFER_MAX + 2000
        assert transport.dropped_texts == 3000 - len(channel.sent) > 0
        channel.bufferedAmount = 0  # the caller caught up: messages flow again
        transport.send_text({"type": "agent.final", "text": "done"})
        assert channel.sent[-1].startswith('{"type":"agent.final"')
    finally:
        await transport.close()


class SilentLine:
    kind = "webrtc"
    has_audio = True
    played_s = queued_s = 0.0

    async def audio_frames(self) -> AsyncIterator[np.ndarray]:
        await asyncio.Event().wait()
        yield np.zeros(320, np.int16)

    async def send_audio(self, pcm: np.ndarray, sample_rate: int) -> None:
        return None

    def clear(self) -> None:
        return None


async def operator_offer() -> tuple[RTCPeerConnection, str]:
    pc = RTCPeerConnection()
    pc.addTransceiver("audio", direction="recvonly")
    await pc.setLocalDescription(await pc.createOffer())
    return pc, pc.localDescription.sdp


async def test_operators_coming_and_going_leave_one_observer_on_the_call(tmp_path: Any) -> None:
    restore_ice = restrict_host_addresses(["127.0.0.1"])
    media = OperatorMedia(Settings(data_dir=tmp_path))
    events = EventStream("call-1")
    call = SimpleNamespace(call_id="call-1", transport=TappedTransport(SilentLine()), events=events, operator=None)
    operators: list[RTCPeerConnection] = []
    try:
        for _ in range(5):  # an operator listens in, hangs up, listens again...
            pc, sdp = await operator_offer()
            operators.append(pc)
            await media.open(call, sdp, talk=False)  # type: ignore[arg-type]
            await media.close_call("call-1")
        assert len(events._observers) == 1
        pc, sdp = await operator_offer()
        operators.append(pc)
        await media.open(call, sdp, talk=False)  # type: ignore[arg-type]
        assert len(events._observers) == 1 and len(media.owned()) == 1
        events.emit(EventType.CALL_ENDED, reason="hangup")  # the call's end closes what operators still hold
        for _ in range(100):
            if not media.owned():
                break
            await asyncio.sleep(0.05)
        assert media.owned() == [] and media._watched == set()
    finally:
        restore_ice()
        for pc in operators:
            await pc.close()
