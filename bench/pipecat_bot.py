"""A Pipecat 1.14 voice bot with Pono's default models, for bench/pipecat_side_by_side.py.

Runs with the Pipecat virtual environment's python (never Pono's .venv); the side-by-side bench starts it
as a child process. It is the bot a Pipecat user writes from Pipecat's own examples and development runner:

    SmallWebRTCTransport.input() → WhisperSTTService → user aggregator → OpenAILLMService → TTS
        → SmallWebRTCTransport.output() → assistant aggregator

- Signalling: a small aiohttp server on 127.0.0.1. POST /api/offer takes {"sdp", "type"} and answers
  through Pipecat's own SmallWebRTCRequestHandler (what `pipecat.runner.run` serves at /api/offer), with no
  ICE servers, so no STUN; aioice gathers host candidates on 127.0.0.1 only (patched below, as Pono's
  `restrict_host_addresses` does in the bench process). GET /api/ready/{pc_id} says whether the call's
  pipeline has started and the client is connected (Pipecat's `on_client_connected`); POST
  /api/hangup/{pc_id} closes the call from the server side (the bench's caller has no Pipecat client
  library to say goodbye with). GET /health answers once the TTS engine is loaded and warm.
- A pipeline per call, as Pipecat's runner builds one per session: its own WhisperSTTService (which loads
  its model when it is built), its own Silero VAD and its own Smart Turn analyzer.
- Turn handling: Pipecat's defaults, `LLMUserAggregatorParams(vad_analyzer=SileroVADAnalyzer())` as in its
  examples: VADParams() (confidence 0.7, start_secs 0.2, stop_secs 0.2, min_volume 0.6) and the default
  user turn strategies (start: VAD or transcription; stop: TurnAnalyzerUserTurnStopStrategy with
  LocalSmartTurnAnalyzerV3, Smart Turn v3.2, the same model Pono asks at each pause, with its 3 s silence
  fallback), waiting for the segment's transcript before the turn ends.
- STT: WhisperSTTService (faster-whisper, segmented: it transcribes the whole turn once VAD stops) on the
  model folder the bench passes (Pono's tiny.en or base files), device cpu, compute_type int8. Its other
  settings are Pipecat's (language en, no_speech_prob 0.4, faster-whisper's default beam size 5 and 4 CPU
  threads; Pono decodes greedily on 2 threads).
- LLM: OpenAILLMService pointed at the bench's ScriptedLLM (model "scripted").
- TTS: Pipecat has no service for hibari, Pono's default engine, so HibariTTSService below is a minimal
  TTSService modelled on Pipecat's PiperTTSService: the same package (hibari-tts 0.2.1), the same default
  voice ("heart"), one hibari instance loaded and warmed once per process (as Pono does), synthesis in a
  worker thread, Pipecat's default sentence aggregation in front of it. hibari starts each sentence with
  about 0.3 s of silence; Pono cuts it (pono.voice.tts.trim_silence: 20 ms kept before the first sample
  above 300, 150 ms after the last). --trim (the bench's default) cuts it here the same way, so the two
  servers play the same audio and the comparison is of the frameworks, not of the engine's padding;
  --no-trim plays hibari's output as it comes.
- GET /health also gives the worst event-loop lag seen (a 100 ms timer's lateness), as Pono's /metrics does.
- Logging: loguru at WARNING (Pipecat logs DEBUG by default), as the bench runs Pono at WARNING.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import sys
from collections.abc import AsyncGenerator, AsyncIterator, Iterator
from typing import Any

import aioice.ice
import numpy as np
from aiohttp import web
from hibari import SAMPLE_RATE, Hibari
from loguru import logger
from pipecat.audio.vad.silero import SileroVADAnalyzer
from pipecat.frames.frames import ErrorFrame, Frame
from pipecat.pipeline.pipeline import Pipeline
from pipecat.pipeline.worker import PipelineParams, PipelineWorker
from pipecat.processors.aggregators.llm_context import LLMContext
from pipecat.processors.aggregators.llm_response_universal import LLMContextAggregatorPair, LLMUserAggregatorParams
from pipecat.services.openai.llm import OpenAILLMService
from pipecat.services.settings import TTSSettings
from pipecat.services.tts_service import TTSService
from pipecat.services.whisper.stt import WhisperSTTService
from pipecat.transports.base_transport import TransportParams
from pipecat.transports.smallwebrtc.connection import SmallWebRTCConnection
from pipecat.transports.smallwebrtc.request_handler import SmallWebRTCRequest, SmallWebRTCRequestHandler
from pipecat.transports.smallwebrtc.transport import SmallWebRTCTransport
from pipecat.workers.runner import WorkerRunner

SYSTEM_PROMPT = "You are a helpful voice assistant. Answer briefly."


def loopback_host_addresses(use_ipv4: bool, use_ipv6: bool) -> list[str]:
    """aioice gathers on 127.0.0.1 only (by default it skips loopback and offers every other interface)."""
    return ["127.0.0.1"] if use_ipv4 else []


def trim_silence(audio: np.ndarray, rate: int, lead_s: float = 0.02, tail_s: float = 0.15,
                 threshold: int = 300) -> np.ndarray:
    """Pono's cut of hibari's padding (pono.voice.tts.trim_silence), on one sentence's int16 samples."""
    loud = np.flatnonzero(np.abs(audio) > threshold)
    if loud.size == 0:
        return audio[:0]
    start = max(0, int(loud[0]) - int(lead_s * rate))
    end = min(audio.size, int(loud[-1]) + int(tail_s * rate))
    return audio[start:end]


class HibariTTSService(TTSService):
    """hibari text-to-speech as a Pipecat TTSService (after PiperTTSService): local, in a worker thread."""

    def __init__(self, *, engine: Hibari, trim: bool, **kwargs: Any) -> None:
        super().__init__(
            push_start_frame=True,
            push_stop_frames=True,
            settings=TTSSettings(model=None, voice=engine.voice, language=None),
            **kwargs,
        )
        self._engine = engine
        self._trim = trim

    def can_generate_metrics(self) -> bool:
        return True

    def _pcm(self, text: str) -> Iterator[bytes]:
        for audio in self._engine.stream(text):
            pcm = (np.clip(np.asarray(audio, np.float32), -1.0, 1.0) * 32767).astype(np.int16)
            if self._trim:
                pcm = trim_silence(pcm, SAMPLE_RATE)
            if pcm.size:
                yield pcm.tobytes()

    async def run_tts(self, text: str, context_id: str) -> AsyncGenerator[Frame, None]:
        def next_chunk(chunks: Iterator[bytes]) -> bytes | None:
            return next(chunks, None)

        async def chunks_in_thread(chunks: Iterator[bytes]) -> AsyncIterator[bytes]:
            while (chunk := await asyncio.to_thread(next_chunk, chunks)) is not None:
                yield chunk

        try:
            await self.start_tts_usage_metrics(text)
            async for frame in self._stream_audio_frames_from_iterator(
                chunks_in_thread(self._pcm(text)), in_sample_rate=SAMPLE_RATE, context_id=context_id,
            ):
                await self.stop_ttfb_metrics()
                yield frame
        except Exception as exc:  # as Pipecat's own services do: report it in the pipeline, don't crash
            logger.error(f"{self} exception: {exc}")
            yield ErrorFrame(error=f"hibari failed: {exc}")
        finally:
            await self.stop_ttfb_metrics()


class Bot:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.engine = Hibari()  # the default voice, "heart", as Pono's default
        self.engine("Warming up the voice.")  # the first synthesis is slower: pay it before any call
        self.handler = SmallWebRTCRequestHandler()  # no ICE servers: host candidates only, no STUN
        self.ready: dict[str, asyncio.Event] = {}
        self.connections: dict[str, SmallWebRTCConnection] = {}
        self.tasks: set[asyncio.Task[None]] = set()
        self.worst_loop_lag = 0.0  # seconds: how late the event loop ran a 100 ms timer, at worst

    async def watch_loop_lag(self) -> None:
        """The bench's counterpart of Pono's pono_event_loop_lag_max_seconds."""
        loop = asyncio.get_running_loop()
        while True:
            start = loop.time()
            await asyncio.sleep(0.1)
            self.worst_loop_lag = max(self.worst_loop_lag, loop.time() - start - 0.1)

    async def run_call(self, connection: SmallWebRTCConnection, ready: asyncio.Event) -> None:
        transport = SmallWebRTCTransport(
            webrtc_connection=connection,
            params=TransportParams(audio_in_enabled=True, audio_out_enabled=True),
        )
        stt = WhisperSTTService(
            device="cpu", compute_type="int8", settings=WhisperSTTService.Settings(model=self.args.whisper_model),
        )
        llm = OpenAILLMService(
            api_key="scripted", base_url=self.args.llm_url, settings=OpenAILLMService.Settings(model="scripted"),
        )
        tts = HibariTTSService(engine=self.engine, trim=self.args.trim)
        context = LLMContext([{"role": "system", "content": SYSTEM_PROMPT}])
        user, assistant = LLMContextAggregatorPair(
            context, user_params=LLMUserAggregatorParams(vad_analyzer=SileroVADAnalyzer()),
        )
        pipeline = Pipeline([transport.input(), stt, user, llm, tts, transport.output(), assistant])
        worker = PipelineWorker(pipeline, params=PipelineParams(enable_metrics=True, enable_usage_metrics=True))

        @transport.event_handler("on_client_connected")
        async def on_client_connected(transport: SmallWebRTCTransport, client: Any) -> None:
            ready.set()

        @transport.event_handler("on_client_disconnected")
        async def on_client_disconnected(transport: SmallWebRTCTransport, client: Any) -> None:
            await worker.cancel()

        runner = WorkerRunner(handle_sigint=False)
        await runner.add_workers(worker)
        await runner.run()

    async def offer(self, request: web.Request) -> web.Response:
        body = await request.json()
        ready = asyncio.Event()

        async def start_call(connection: SmallWebRTCConnection) -> None:
            # As Pipecat's runner: the bot starts in the background, after the answer goes back.
            self.connections[connection.pc_id] = connection
            self.ready[connection.pc_id] = ready
            task = asyncio.create_task(self.run_call(connection, ready))
            self.tasks.add(task)
            task.add_done_callback(self.tasks.discard)

        answer = await self.handler.handle_web_request(
            SmallWebRTCRequest(sdp=body["sdp"], type=body["type"]), start_call)
        return web.json_response(answer)

    async def is_ready(self, request: web.Request) -> web.Response:
        ready = self.ready.get(request.match_info["pc_id"])
        if ready is None:
            return web.json_response({"error": "no such call"}, status=404)
        return web.json_response({"ready": ready.is_set()})

    async def hang_up(self, request: web.Request) -> web.Response:
        pc_id = request.match_info["pc_id"]
        connection = self.connections.pop(pc_id, None)
        self.ready.pop(pc_id, None)
        if connection is None:
            return web.json_response({"error": "no such call"}, status=404)
        await connection.disconnect()
        return web.json_response({"ok": True})

    async def health(self, request: web.Request) -> web.Response:
        return web.json_response({"ok": True, "calls": len(self.tasks), "worst_loop_lag_s": self.worst_loop_lag})


async def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--llm-url", required=True, help="the OpenAI-compatible base URL (…/v1)")
    ap.add_argument("--whisper-model", required=True, help="a CTranslate2 Whisper model folder")
    ap.add_argument("--trim", action=argparse.BooleanOptionalAction, default=True,
                    help="cut hibari's leading and trailing silence as Pono does (default: on)")
    ap.add_argument("--log-level", default="WARNING")
    args = ap.parse_args()

    logger.remove()
    logger.add(sys.stderr, level=args.log_level)
    aioice.ice.get_host_addresses = loopback_host_addresses

    bot = Bot(args)
    app = web.Application()
    app.add_routes([
        web.post("/api/offer", bot.offer),
        web.get("/api/ready/{pc_id}", bot.is_ready),
        web.post("/api/hangup/{pc_id}", bot.hang_up),
        web.get("/health", bot.health),
    ])
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", args.port).start()
    print(f"pipecat bot listening on http://127.0.0.1:{args.port}", flush=True)
    lag_watch = asyncio.create_task(bot.watch_loop_lag())
    try:
        await asyncio.Event().wait()
    finally:
        lag_watch.cancel()
        for task in list(bot.tasks):
            task.cancel()
        for task in list(bot.tasks):
            with contextlib.suppress(BaseException):
                await task
        await bot.handler.close()
        await runner.cleanup()


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(main())
