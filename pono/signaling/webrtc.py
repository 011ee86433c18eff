"""WebRTC transport (aiortc): Opus in → 16 kHz frames of the voice channel, PCM out → paced 48 kHz, JSON over a
data channel."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import AsyncIterator, Callable
from typing import Any

import av
import numpy as np
from aiortc import MediaStreamTrack, RTCDataChannel, RTCPeerConnection
from aiortc.mediastreams import MediaStreamError

from pono.signaling.audio_out import OUT_RATE, PacedAudioTrack, Resampler
from pono.signaling.jitter import received_audio_buffers
from pono.transport import FRAME_SAMPLES, SAMPLE_RATE

log = logging.getLogger(__name__)

_INBOUND_QUEUE_FRAMES = 250  # 5 s: if the call loop stalls longer, the oldest audio is dropped
_PENDING_TEXT_MAX = 200
# aiortc queues data-channel messages without limit while the caller's SCTP window is closed: past this many
# bytes waiting, messages are dropped instead of piling up for the rest of the call.
_CHANNEL_BUFFER_MAX = 1 << 20


def channels(frame: av.AudioFrame) -> np.ndarray:
    """A decoded frame's samples as [channels, samples]: planar frames store them so, packed ones interleave
    L R L R."""
    count = len(frame.layout.channels)
    samples = frame.to_ndarray()
    if frame.format.is_planar:
        return samples.reshape(count, -1)
    return samples.reshape(-1, count).T


def first_channel(frame: av.AudioFrame) -> np.ndarray:
    """The first channel of a decoded frame, shape [samples]."""
    return channels(frame)[0]


class VoiceChannel:
    """Turns decoded frames into one channel: the one that carries the voice.

    A two-input audio interface (or a stereo line-in) may send the microphone on one channel and silence, or
    another source, on the other; Opus is always stereo on the wire. The loudest channel is kept, not a
    downmix: averaging a voice with a silent channel halves it (-6 dB, toward the VAD's threshold), and
    summing doubles a mono voice sent as two identical channels (what browsers do) into clipping. The choice
    has hysteresis: another channel takes over only once a frame carries twice (+3 dB) the energy of the
    current one, so near-identical channels do not flip every frame. Call once per decoded frame, in order.
    """

    _SWITCH_RATIO = 2.0

    def __init__(self) -> None:
        self.current = 0

    def __call__(self, frame: av.AudioFrame) -> np.ndarray:
        """One frame's samples of the voice channel, shape [samples], in the frame's sample format."""
        samples = channels(frame)
        if samples.shape[0] == 1:
            return samples[0]
        energy = np.square(samples, dtype=np.float64).sum(axis=1)
        loudest = int(np.argmax(energy))
        current = min(self.current, samples.shape[0] - 1)
        if energy[loudest] > self._SWITCH_RATIO * energy[current]:
            current = loudest
        self.current = current
        return samples[current]


async def read_frames(track: MediaStreamTrack, put: Callable[[np.ndarray], object]) -> None:
    """Decode a received audio track into 16 kHz mono 20 ms frames (int16, shape [320]) until it ends.

    Of a stereo track the channel that carries the voice is kept (VoiceChannel).
    """
    resample = Resampler(SAMPLE_RATE)
    voice = VoiceChannel()
    pending = np.zeros(0, np.int16)
    try:
        while True:
            frame = await track.recv()
            mono = voice(frame)
            pending = np.concatenate([pending, resample(mono.astype(np.int16, copy=False), frame.sample_rate)])
            while pending.size >= FRAME_SAMPLES:
                put(pending[:FRAME_SAMPLES])
                pending = pending[FRAME_SAMPLES:]
    except MediaStreamError:
        pass


class WebRTCTransport:
    """A call over one RTCPeerConnection: audio both ways (as negotiated), JSON text over a data channel.

    Whether the agent speaks follows the negotiated audio direction, not the presence of m=audio: see has_audio.
    Add `out_track` to the peer connection before creating the answer when the offer's audio is taken.
    """

    kind = "webrtc"

    def __init__(self, pc: RTCPeerConnection) -> None:
        self.pc = pc
        self.out_track = PacedAudioTrack()
        self._resample_out = Resampler(OUT_RATE)
        self._frames: asyncio.Queue[np.ndarray | None] = asyncio.Queue(_INBOUND_QUEUE_FRAMES)
        self._texts: asyncio.Queue[str | None] = asyncio.Queue(100)
        self._channel: RTCDataChannel | None = None
        self._pending_text: list[str] = []
        self._closed = asyncio.Event()
        self._reader: asyncio.Task[None] | None = None
        self.dropped_frames = 0
        self.dropped_texts = 0  # messages not sent: the data channel's send buffer was full

        pc.on("track", self._on_track)
        pc.on("datachannel", self._on_datachannel)
        pc.on("connectionstatechange", self._on_state)

    # -- wiring -------------------------------------------------------------------------------
    def _on_track(self, track: MediaStreamTrack) -> None:
        if track.kind == "audio" and self._reader is None:
            self._reader = asyncio.create_task(self._read_audio(track), name="webrtc-audio-in")

    def _on_datachannel(self, channel: RTCDataChannel) -> None:
        self._channel = channel
        channel.on("message", self._on_message)
        channel.on("close", lambda: self._texts.put_nowait(None) if not self._texts.full() else None)
        if channel.readyState == "open":
            self._flush_pending()
        else:
            channel.on("open", self._flush_pending)

    def _flush_pending(self) -> None:
        pending, self._pending_text = self._pending_text, []
        for text in pending:
            self._send_raw(text)

    def _on_message(self, message: str | bytes) -> None:
        if isinstance(message, bytes):
            message = message.decode("utf-8", "replace")
        try:
            self._texts.put_nowait(message)
        except asyncio.QueueFull:
            self.send_text({"type": "error", "error": "too many messages; slow down"})

    async def _on_state(self) -> None:
        if self.pc.connectionState in ("failed", "closed"):
            self._closed.set()

    def expect_connection_within(self, seconds: float) -> None:
        """End the call if ICE/DTLS never connects (the caller vanished after sending its offer)."""

        def check() -> None:
            if self.pc.connectionState != "connected" and not self._closed.is_set():
                log.info("peer never connected within %.0f s; ending the call", seconds)
                self._closed.set()

        asyncio.get_running_loop().call_later(seconds, check)

    async def _read_audio(self, track: MediaStreamTrack) -> None:
        try:
            await read_frames(track, self._put_frame)
        finally:
            with contextlib.suppress(asyncio.QueueFull):
                self._frames.put_nowait(None)

    def _put_frame(self, frame: np.ndarray) -> None:
        if self._frames.full():
            self._frames.get_nowait()
            self.dropped_frames += 1
        self._frames.put_nowait(frame)

    # -- Transport interface ------------------------------------------------------------------
    @property
    def has_audio(self) -> bool:
        """Whether audio we send reaches the caller: the negotiated audio transceiver's current direction
        (ours) is sendrecv or sendonly, i.e. the caller offered sendrecv or recvonly on a port other than 0
        (RFC 3264 §6.1). False for a text-only call, an inactive or rejected audio m= line and a caller who only
        sends (whose audio is still heard). Read on every use: it follows currentDirection, which only an
        offer/answer exchange changes (Pono takes one per call, so today it is fixed once the call starts)."""
        for transceiver in self.pc.getTransceivers():
            if transceiver.kind == "audio" and transceiver.sender.track is self.out_track:
                return transceiver.currentDirection in ("sendrecv", "sendonly")
        return False

    async def audio_frames(self) -> AsyncIterator[np.ndarray]:
        while True:
            frame = await self._frames.get()
            if frame is None:
                return
            yield frame

    async def send_audio(self, pcm: np.ndarray, sample_rate: int) -> None:
        """Queue int16 mono PCM (any rate) for the caller; returns at once, dropping it, while has_audio is
        False (nobody pulls the track) or the call has ended."""
        if not self.has_audio or self._closed.is_set():
            return
        await self.out_track.push(self._resample_out(pcm, sample_rate))

    def clear(self) -> None:
        self.out_track.clear()
        self._resample_out.reset()

    @property
    def played_s(self) -> float:
        return self.out_track.played_s

    @property
    def queued_s(self) -> float:
        """Seconds queued and still to be sent; 0 while has_audio is False, since nothing would ever send them
        (so a reply that waits for its audio to play out does not wait)."""
        return self.out_track.queued_s if self.has_audio else 0.0

    async def text_messages(self) -> AsyncIterator[str]:
        while True:
            text = await self._texts.get()
            if text is None:
                return
            yield text

    def send_text(self, message: dict[str, Any]) -> None:
        self._send_raw(json.dumps(message, separators=(",", ":")))

    def _send_raw(self, text: str) -> None:
        channel = self._channel
        if channel is not None and channel.readyState == "open":
            if channel.bufferedAmount > _CHANNEL_BUFFER_MAX:
                self.dropped_texts += 1  # the caller reads nothing: don't let aiortc's queue grow for the call
                return
            try:
                channel.send(text)
            except Exception:  # the association went away under us; the call is ending
                log.debug("data channel send failed", exc_info=True)
        elif len(self._pending_text) < _PENDING_TEXT_MAX and (channel is None or channel.readyState == "connecting"):
            self._pending_text.append(text)

    async def closed(self) -> None:
        await self._closed.wait()

    async def close(self) -> None:
        if self.dropped_frames and not self._closed.is_set():
            log.warning("dropped %d inbound audio frames: the call loop fell behind", self.dropped_frames)
        if self.dropped_texts and not self._closed.is_set():
            log.warning("dropped %d messages to the caller: the data channel's send buffer was full",
                        self.dropped_texts)
        if not self._closed.is_set():
            for jitter in received_audio_buffers(self.pc):
                if jitter.lost or jitter.late:
                    log.info("caller's audio: %d packets lost, %d came too late", jitter.lost, jitter.late)
        self._closed.set()
        self.out_track.stop()
        await self.pc.close()
        if self._reader is not None:
            self._reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reader
        with contextlib.suppress(asyncio.QueueFull):
            self._frames.put_nowait(None)
        with contextlib.suppress(asyncio.QueueFull):
            self._texts.put_nowait(None)
