"""An aiortc caller for tests and benchmarks: streams speech in real time and records what comes back."""

from __future__ import annotations

import asyncio
import contextlib
import fractions
import json
import time
from collections.abc import Callable
from typing import Any

import aiohttp
import av
import numpy as np
from aiortc import MediaStreamTrack, RTCConfiguration, RTCPeerConnection, RTCSessionDescription
from aiortc.mediastreams import MediaStreamError

from pono.signaling.audio_out import Resampler, int16_frame
from pono.signaling.webrtc import first_channel

RATE = 48_000
FRAME = RATE // 50


class MicrophoneTrack(MediaStreamTrack):
    """Plays queued 48 kHz audio in 20 ms frames paced by the wall clock; silence in between.

    `stereo_channel` (0 left, 1 right) makes the frames 2-channel, packed s16, with the sound on that channel
    and silence on the other, like a two-input audio interface with the microphone on one input. None (the
    default) gives mono frames.
    """

    kind = "audio"

    def __init__(self, *, stereo_channel: int | None = None) -> None:
        super().__init__()
        if stereo_channel not in (None, 0, 1):
            raise ValueError("stereo_channel is 0 (left), 1 (right) or None (mono)")
        self.stereo_channel = stereo_channel
        self._queue: list[np.ndarray] = []
        self._start: float | None = None
        self._sent = 0
        self.last_speech_sent_at: float | None = None  # wall time the last queued sample left
        self.speech_done = asyncio.Event()

    def play(self, pcm48: np.ndarray) -> None:
        pad = (-pcm48.size) % FRAME
        data = np.concatenate([pcm48.astype(np.int16), np.zeros(pad, np.int16)])
        self._queue.extend(data.reshape(-1, FRAME))
        self.speech_done.clear()

    async def recv(self) -> Any:
        if self.readyState != "live":
            raise MediaStreamError
        now = time.monotonic()
        if self._start is None:
            self._start = now
        wait = self._start + self._sent * 0.02 - now
        if wait > 0:
            await asyncio.sleep(wait)
        if self._queue:
            samples = self._queue.pop(0)
            if not self._queue:
                self.last_speech_sent_at = time.monotonic()
                self.speech_done.set()
        else:
            samples = np.zeros(FRAME, np.int16)
        frame = int16_frame(samples, RATE) if self.stereo_channel is None else self._stereo(samples)
        frame.pts = self._sent * FRAME
        frame.time_base = fractions.Fraction(1, RATE)
        self._sent += 1
        return frame

    def _stereo(self, samples: np.ndarray) -> av.AudioFrame:
        both = np.zeros((FRAME, 2), np.int16)
        both[:, self.stereo_channel] = samples
        frame = av.AudioFrame.from_ndarray(both.reshape(1, -1), format="s16", layout="stereo")
        frame.sample_rate = RATE
        return frame


SdpEdit = Callable[[str], str]


class Caller:
    """`mic` replaces the default mono MicrophoneTrack (e.g. a stereo one)."""

    def __init__(self, base_url: str, *, mic: MicrophoneTrack | None = None) -> None:
        self.base_url = base_url.rstrip("/")
        self.pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))
        self.mic = mic or MicrophoneTrack()
        self.http = aiohttp.ClientSession()
        self.token = ""
        self.call_id = ""
        self.events: list[dict[str, Any]] = []
        self._event_added = asyncio.Event()
        self.received: list[np.ndarray] = []  # 48 kHz mono int16 chunks as they arrived
        self.first_arrival: float | None = None
        self._recorder: asyncio.Task[None] | None = None
        self.channel = None
        self.to_48k = Resampler(RATE)

    async def connect(self, *, audio: bool = True, persona: str | None = None, edit_offer: SdpEdit | None = None,
                      edit_answer: SdpEdit | None = None) -> dict[str, Any]:
        """Get a call token (for `persona` when given), POST an offer, apply the answer; returns the answer body.

        `edit_offer` rewrites the SDP this peer connection made before it is POSTed (a crafted offer, as
        another client would send it); `edit_answer` rewrites the server's answer before this peer connection
        applies it (what a client that understands more SDP than aiortc would do with it). The returned body
        holds the answer as the server sent it. Raises RuntimeError when the offer is refused.
        """
        query = {"persona": persona} if persona else None  # a token opens calls with its own persona only
        async with self.http.post(f"{self.base_url}/api/call-tokens", params=query) as r:
            body = await r.json()
            if r.status != 201:
                raise RuntimeError(f"no call token: {r.status} {body}")
            self.token = body["token"]
        if audio:
            self.pc.addTrack(self.mic)
        self.channel = self.pc.createDataChannel("pono")
        self.channel.on("message", self._on_message)
        self.pc.on("track", self._on_track)
        await self.pc.setLocalDescription(await self.pc.createOffer())
        sdp = self.pc.localDescription.sdp
        body: dict[str, Any] = {"sdp": edit_offer(sdp) if edit_offer else sdp, "type": "offer"}
        if persona:
            body["persona"] = persona
        async with self.http.post(f"{self.base_url}/api/calls", json=body, headers=self.auth) as r:
            answer = await r.json()
            if r.status != 201:
                raise RuntimeError(f"offer refused: {r.status} {answer}")
        self.call_id = answer["call_id"]
        sdp = edit_answer(answer["sdp"]) if edit_answer else answer["sdp"]
        await self.pc.setRemoteDescription(RTCSessionDescription(sdp=sdp, type=answer["type"]))
        return answer

    @property
    def auth(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"}

    def _on_track(self, track: MediaStreamTrack) -> None:
        if track.kind == "audio":
            self._recorder = asyncio.create_task(self._record(track))

    async def _record(self, track: MediaStreamTrack) -> None:
        with contextlib.suppress(MediaStreamError):
            while True:
                frame = await track.recv()
                if self.first_arrival is None:
                    self.first_arrival = time.monotonic()
                pcm = first_channel(frame)
                self.received.append(self.to_48k(pcm.astype(np.int16), frame.sample_rate))

    def _on_message(self, message: str) -> None:
        self.events.append(json.loads(message))
        self._event_added.set()

    async def wait_for(self, predicate: Callable[[dict[str, Any]], bool], timeout: float = 30.0) -> dict[str, Any]:
        """The first event (already received or still to come) that matches."""
        deadline = time.monotonic() + timeout
        seen = 0
        while True:
            for event in self.events[seen:]:
                if predicate(event):
                    return event
            seen = len(self.events)
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                types = [e["type"] for e in self.events]
                raise TimeoutError(f"no matching event within {timeout} s; got {types}")
            self._event_added.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._event_added.wait(), remaining)

    async def wait_open(self, timeout: float = 10.0) -> None:
        deadline = time.monotonic() + timeout
        while self.channel is None or self.channel.readyState != "open":
            if time.monotonic() > deadline:
                raise TimeoutError("data channel did not open")
            await asyncio.sleep(0.02)

    def send_text(self, text: str) -> None:
        assert self.channel is not None
        self.channel.send(json.dumps({"type": "text", "text": text}))

    def send_raw(self, raw: str) -> None:
        assert self.channel is not None
        self.channel.send(raw)

    def speak(self, pcm16k: np.ndarray) -> None:
        self.mic.play(self.to_48k(pcm16k, 16_000))

    def recording(self) -> np.ndarray:
        return np.concatenate(self.received) if self.received else np.zeros(0, np.int16)

    def first_sound_after(self, t: float, threshold: int = 500) -> float | None:
        """Wall time of the first received sample above threshold that played after t.

        Times come from the sample count since the first arrival: per-packet arrival times jitter.
        """
        if self.first_arrival is None:
            return None
        audio = self.recording()
        start = max(0, int((t - self.first_arrival) * RATE))
        loud = np.flatnonzero(np.abs(audio[start:]) > threshold)
        if loud.size == 0:
            return None
        return self.first_arrival + (start + int(loud[0])) / RATE

    async def hang_up(self) -> int:
        status = 0
        if self.call_id:
            async with self.http.delete(f"{self.base_url}/api/calls/{self.call_id}", headers=self.auth) as r:
                status = r.status
        await self.close()
        return status

    async def close(self) -> None:
        await self.pc.close()
        if self._recorder is not None:
            self._recorder.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._recorder
        await self.http.close()
