"""Operators' audio on a live call, over WebRTC: listen to both sides mixed, and talk while taken over.

It runs on the replica that holds the call: the operator's offer is routed here by the control bus and the
answer goes back the same way; media then flows directly between this replica and the operator's browser.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import deque

import numpy as np
from aiortc import MediaStreamTrack, RTCPeerConnection, RTCSessionDescription

from pono.settings import Settings
from pono.signaling.audio_out import PacedAudioTrack, Resampler
from pono.signaling.ice import rtc_configuration
from pono.signaling.jitter import use_for_received_audio
from pono.signaling.webrtc import read_frames
from pono.transport import FRAME_SAMPLES, SAMPLE_RATE
from pono.voice.call import Call
from pono.voice.tap import TappedTransport

log = logging.getLogger(__name__)

_NEGOTIATION_TIMEOUT_S = 10


class MixTrack(PacedAudioTrack):
    """Caller and agent mixed at 16 kHz, one 20 ms frame per 20 ms. It is an AudioTap of the call."""

    def __init__(self) -> None:
        super().__init__(rate=SAMPLE_RATE)
        self._caller: deque[np.ndarray] = deque(maxlen=50)  # 1 s: the caller's side arrives in real time
        self._agent: deque[np.ndarray] = deque(maxlen=1500)  # 30 s: the agent's is queued ahead of playout
        self._resample = Resampler(SAMPLE_RATE)

    def caller_audio(self, frame: np.ndarray) -> None:
        self._caller.append(frame)

    def agent_audio(self, pcm: np.ndarray, sample_rate: int) -> None:
        pcm16 = self._resample(pcm, sample_rate)
        for i in range(0, pcm16.size, FRAME_SAMPLES):
            chunk = np.zeros(FRAME_SAMPLES, np.int16)
            part = pcm16[i:i + FRAME_SAMPLES]
            chunk[:part.size] = part
            self._agent.append(chunk)

    def agent_cleared(self) -> None:
        self._agent.clear()
        self._resample.reset()

    def _next_samples(self) -> np.ndarray:
        mixed = np.zeros(FRAME_SAMPLES, np.int32)
        for side in (self._caller, self._agent):
            if side:
                mixed += side.popleft()
        return np.clip(mixed, -32768, 32767).astype(np.int16)


class OperatorMedia:
    """The operator peer connections of this replica's calls."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._sessions: dict[str, list[tuple[RTCPeerConnection, bool]]] = {}  # call id → (pc, talks)
        self._owners: dict[RTCPeerConnection, object] = {}  # who opened each, as given to `open`
        self._watched: set[str] = set()  # calls whose end closes their operator connections
        self._closing: set[asyncio.Task[None]] = set()

    def owned(self) -> list[tuple[str, RTCPeerConnection, bool, object]]:
        """Every operator peer connection of this replica: (call id, pc, talks, owner as given to `open`)."""
        return [(call_id, pc, talks, self._owners.get(pc)) for call_id, sessions in self._sessions.items()
                for pc, talks in sessions]

    async def open(self, call: Call, sdp: str, *, talk: bool, owner: object = None) -> str:
        """Answer an operator's offer: they hear the call mixed, and with `talk` their microphone is taken.
        `owner` (anything; who asked) is kept with the connection for `owned`."""
        tapped = call.transport
        if not isinstance(tapped, TappedTransport) or not tapped.has_audio:
            raise ValueError("this call has no audio to listen to")
        pc = RTCPeerConnection(rtc_configuration(self.settings.ice_servers))
        mix = MixTrack()
        readers: list[asyncio.Task[None]] = []

        def on_track(track: MediaStreamTrack) -> None:
            if talk and track.kind == "audio":
                readers.append(asyncio.create_task(read_frames(
                    track, lambda frame: asyncio.ensure_future(call.operator.operator_audio(frame)))))

        async def on_state() -> None:
            if pc.connectionState in ("failed", "closed"):
                await self._drop(call.call_id, pc, tapped, mix, readers)

        pc.on("track", on_track)
        pc.on("connectionstatechange", on_state)
        try:
            await asyncio.wait_for(pc.setRemoteDescription(RTCSessionDescription(sdp=sdp, type="offer")),
                                   _NEGOTIATION_TIMEOUT_S)
            pc.addTrack(mix)
            await asyncio.wait_for(pc.setLocalDescription(await pc.createAnswer()), _NEGOTIATION_TIMEOUT_S)
            use_for_received_audio(pc)  # the operator's words go out to the caller as they arrive
        except BaseException:
            await pc.close()
            raise
        tapped.taps.add(mix)
        self._sessions.setdefault(call.call_id, []).append((pc, talk))
        self._owners[pc] = owner
        if call.call_id not in self._watched:
            # One observer per call, however often operators come and go: the stream has no unsubscribe.
            self._watched.add(call.call_id)
            call.events.subscribe(lambda e: self._call_ended(call.call_id) if e.type == "call.ended" else None)
        return str(pc.localDescription.sdp)

    def _call_ended(self, call_id: str) -> None:
        self._watched.discard(call_id)
        task = asyncio.ensure_future(self.close_call(call_id))
        self._closing.add(task)
        task.add_done_callback(self._closing.discard)

    async def _drop(self, call_id: str, pc: RTCPeerConnection, tapped: TappedTransport, mix: MixTrack,
                    readers: list[asyncio.Task[None]]) -> None:
        tapped.taps.discard(mix)
        mix.stop()
        for task in readers:
            task.cancel()
        self._owners.pop(pc, None)
        sessions = self._sessions.get(call_id, [])
        self._sessions[call_id] = [s for s in sessions if s[0] is not pc]
        if not self._sessions[call_id]:
            self._sessions.pop(call_id, None)
        with contextlib.suppress(Exception):
            await pc.close()

    async def close_call(self, call_id: str, *, talkers_only: bool = False) -> None:
        for pc, talks in list(self._sessions.get(call_id, [])):
            if talks or not talkers_only:
                await pc.close()  # the state change handler removes the tap
