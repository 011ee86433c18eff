"""The `pono` command."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import signal
import sys
from typing import Any

from aiohttp import web
from pydantic import ValidationError

from pono.settings import Settings

log = logging.getLogger("pono")


def _settings(overrides: dict[str, Any]) -> Settings:
    try:
        return Settings(**{k: v for k, v in overrides.items() if v is not None})
    except ValidationError as exc:
        for error in exc.errors():
            print(f"pono: invalid setting {'.'.join(map(str, error['loc']))}: {error['msg']}", file=sys.stderr)
        raise SystemExit(2) from None


async def _serve(settings: Settings) -> None:
    from pono.app import build_app

    app = build_app(settings)
    runner = web.AppRunner(app, handle_signals=False, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, settings.host, settings.port)
    try:
        await site.start()
    except OSError as exc:
        await runner.cleanup()
        log.error("cannot listen on %s:%s: %s", settings.host, settings.port, exc.strerror)
        raise SystemExit(1) from None
    log.info("pono listening on http://%s:%s (data in %s)", settings.host, settings.port, settings.data_dir)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    log.info("shutting down: hanging up calls")
    await runner.cleanup()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="pono", description="Pono voice agent server")
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="run the server (embedded defaults when nothing is configured)")
    serve.add_argument("--host", help="listen address (PONO_HOST, default 127.0.0.1)")
    serve.add_argument("--port", type=int, help="listen port (PONO_PORT, default 3000)")
    serve.add_argument("--data-dir", help="embedded databases, journal and caches (PONO_DATA_DIR, default ./.pono)")
    serve.add_argument("--stt-model", help="'base', 'tiny.en' or a model folder (PONO_STT_MODEL)")
    serve.add_argument("--tts", choices=["hibari", "piper"], help="TTS engine (PONO_TTS)")
    serve.add_argument("--llm-model", help="model name for the LLM endpoint (PONO_LLM_MODEL)")
    serve.add_argument("--log-level", help="DEBUG, INFO, WARNING (PONO_LOG_LEVEL)")
    args = parser.parse_args(argv)

    if args.command == "serve":
        settings = _settings({
            "host": args.host, "port": args.port, "data_dir": args.data_dir, "stt_model": args.stt_model,
            "tts": args.tts, "llm_model": args.llm_model, "log_level": args.log_level,
        })
        logging.basicConfig(level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
        for noisy in ("aioice", "httpx", "httpx2", "faster_whisper"):
            logging.getLogger(noisy).setLevel(logging.WARNING)
        with contextlib.suppress(KeyboardInterrupt):
            asyncio.run(_serve(settings))


if __name__ == "__main__":
    main()
