"""The `pono` command."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import signal
import sys
from collections.abc import Coroutine
from pathlib import Path
from typing import Any

import asyncpg
from aiohttp import web
from pydantic import ValidationError

from pono.agent.dlp.engine import DEFAULT_POLICY, DlpPolicy
from pono.agent.dlp.logfilter import install_log_redaction
from pono.agent.knowledge.base import KnowledgeBase
from pono.agent.knowledge.documents import DocumentError, extract_text, kind_of
from pono.logs import configure_logging, own
from pono.settings import Settings
from pono.storage.db import Database, StorageError, open_database
from pono.storage.personas import find_persona
from pono.storage.recordings import RecordingStore
from pono.storage.retention import purge
from pono.storage.users import ROLES, create_api_key, create_user, set_password

log = logging.getLogger("pono")


def _settings(overrides: dict[str, Any]) -> Settings:
    try:
        return Settings(**{k: v for k, v in overrides.items() if v is not None})
    except ValidationError as exc:
        for error in exc.errors():
            where = ".".join(map(str, error["loc"]))
            what = error["msg"].removeprefix("Value error, ")
            print(f"pono: invalid setting {where}: {what}" if where else f"pono: {what}", file=sys.stderr)
        raise SystemExit(2) from None


async def _serve(settings: Settings) -> None:
    from pono.app import build_app

    app = build_app(settings)
    runner = web.AppRunner(app, handle_signals=False, access_log=None)
    try:
        await runner.setup()
    except StorageError as exc:
        log.error("cannot start: %s", exc)
        raise SystemExit(1) from None
    site = web.TCPSite(runner, settings.host, settings.port)
    try:
        await site.start()
    except OSError as exc:
        await runner.cleanup()
        log.error("cannot listen on %s:%s: %s", own(settings.host), settings.port, own(exc.strerror))
        raise SystemExit(1) from None
    log.info("pono listening on http://%s:%s (data in %s)", own(settings.host), settings.port, own(settings.data_dir))
    metrics_runner = await _serve_metrics(app, settings) if settings.metrics_port else None
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    drains: list[asyncio.Task[None]] = []

    async def drain_then_stop() -> None:
        from pono.context import SERVICES

        try:
            await app[SERVICES].calls.drain(settings.drain_timeout_s)
        finally:
            stop.set()

    def on_signal() -> None:
        # The first SIGTERM/SIGINT drains: no new calls, live calls end by themselves (or get a goodbye at
        # PONO_DRAIN_TIMEOUT_S). A second one stops at once.
        if drains:
            log.info("second signal: stopping now")
            stop.set()
        else:
            log.info("draining before shutdown (up to %.0f s); signal again to stop now", settings.drain_timeout_s)
            drains.append(asyncio.create_task(drain_then_stop(), name="drain"))

    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, on_signal)
    await stop.wait()
    for task in drains:
        task.cancel()
    log.info("shutting down: hanging up calls")
    if metrics_runner is not None:
        await metrics_runner.cleanup()
    await runner.cleanup()


async def _serve_metrics(app: web.Application, settings: Settings) -> web.AppRunner:
    """/metrics alone, without a token, on its own port: for a scraper inside the cluster network."""
    from pono.app import METRICS_ONLY
    from pono.web.health import render_metrics

    metrics_app = web.Application()
    metrics_app[METRICS_ONLY] = app

    async def metrics(request: web.Request) -> web.Response:
        return render_metrics(request.app[METRICS_ONLY])

    metrics_app.add_routes([web.get("/metrics", metrics)])
    runner = web.AppRunner(metrics_app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, settings.host, settings.metrics_port).start()
    log.info("metrics on http://%s:%s/metrics", own(settings.host), settings.metrics_port)
    return runner


def _database(settings: Settings) -> contextlib.AbstractAsyncContextManager[Database]:
    """The configured Postgres (or the embedded one in the data dir), migrated, for one command."""
    return open_database(settings, max_size=2)


async def _migrate(settings: Settings) -> None:
    async with _database(settings):
        pass  # connecting applies what is missing
    print("migrations applied")


def _read_password() -> str:
    password = sys.stdin.readline().rstrip("\n")
    if len(password) < 10:
        raise SystemExit("pono: a password needs at least 10 characters")
    return password


async def _create_user(settings: Settings, name: str, role: str, print_token: bool, password_stdin: bool) -> None:
    password = _read_password() if password_stdin else None
    async with _database(settings) as db:
        try:
            user_id = await create_user(db.pool, name, role, password)
        except asyncpg.UniqueViolationError:
            raise SystemExit(f"pono: a user named {name!r} already exists") from None
        _, token = await create_api_key(db.pool, user_id, role, f"{name} (cli)")
        await db.pool.execute("INSERT INTO audit_log (actor, action, target) VALUES ('cli', 'user.create', $1)",
                              user_id)
    print(f"created {role} user {name} ({user_id})")
    if print_token:
        print("API token (shown once; keep it secret):")
        print(token)


async def _set_password(settings: Settings, name: str) -> None:
    password = _read_password()
    async with _database(settings) as db:
        user_id = await db.pool.fetchval("SELECT id FROM users WHERE name = $1 AND deleted_at IS NULL", name)
        if user_id is None:
            raise SystemExit(f"pono: no user named {name!r}")
        await set_password(db.pool, str(user_id), password)  # also ends every session of the user
        await db.pool.execute("INSERT INTO audit_log (actor, action, target) VALUES ('cli', 'user.password', $1)",
                              str(user_id))
    print(f"password set for {name}; every login session of theirs is signed out")


async def _purge(settings: Settings) -> None:
    """Print {"removed": {table: rows}, "failed": {table: why}}; exit 1 when any table failed."""
    async with _database(settings) as db:
        result = await purge(db.pool, settings.retention_days, RecordingStore.from_settings(settings))
    print(json.dumps(result.as_dict()))
    if result.failed:
        raise SystemExit(1)


async def _dlp_policy(settings: Settings, persona: str | None, policy_json: str | None) -> DlpPolicy:
    if policy_json:
        return DlpPolicy.from_config(json.loads(policy_json))
    if persona is None:
        return DEFAULT_POLICY
    async with _database(settings) as db:
        found = await find_persona(db.pool, persona)
    if found is None:
        raise SystemExit(f"pono: no persona {persona!r}")
    return DlpPolicy.from_config(found["dlp_policy"])


def _dlp_scan(policy: DlpPolicy) -> None:
    """One JSON object per input line: the redacted text and the findings (never the raw values)."""
    for line in sys.stdin:
        text = line.rstrip("\n")
        result = policy.scan(text)
        print(json.dumps({"text": result.text, "findings": [f.to_json() for f in result.findings]}), flush=True)


async def _ingest(settings: Settings, paths: list[str], collection: str) -> None:
    failed = 0
    async with _database(settings) as db:
        knowledge = KnowledgeBase(db.pool)
        for name in paths:
            path = Path(name)
            try:
                text = await asyncio.to_thread(lambda p=path: extract_text(p.read_bytes(), kind_of(p)))
            except (DocumentError, OSError) as exc:
                print(f"{path}: not ingested: {exc}", file=sys.stderr)
                failed += 1
                continue
            result = await knowledge.ingest(collection, path.name, text, title=path.stem)
            print(f"{path}: {result.status} ({result.chunks} chunks)")
    if failed:
        raise SystemExit(1)


async def _search(settings: Settings, query: str, collection: str, k: int, as_json: bool) -> None:
    async with _database(settings) as db:
        results = await KnowledgeBase(db.pool).search(query, [collection], k)
    if as_json:
        print(json.dumps(results, indent=2))
        return
    for r in results:
        print(f"{r['score']:.4f}  {r['document']} [{r['start']}:{r['end']}]  {r['text'][:100]!r}")


def _run_storage_command(coro: Coroutine[Any, Any, None]) -> None:
    try:
        asyncio.run(coro)
    except StorageError as exc:
        print(f"pono: {exc}", file=sys.stderr)
        raise SystemExit(1) from None


def _speech_worker(settings: Settings) -> None:
    if settings.speech_worker_token is None or not settings.speech_worker_token.get_secret_value():
        raise SystemExit("pono speech-worker: set PONO_SPEECH_WORKER_TOKEN (the app servers present it as their "
                         "PONO_SPEECH_WORKER_TOKEN); the worker does not run open")
    from pono.voice.worker.server import serve

    configure_logging(settings.log_level, settings.log_format)
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(serve(settings))


def _jobs(settings: Settings) -> None:
    """`pono jobs`: a job worker process (workflows, schedules) until SIGTERM."""
    from pono.jobs.process import serve_jobs

    configure_logging(settings.log_level, settings.log_format)
    _run_storage_command(serve_jobs(settings))


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
    speech = sub.add_parser("speech-worker", help="serve STT and TTS to app servers (PONO_SPEECH_WORKER_TOKEN)")
    speech.add_argument("--host", help="listen address (PONO_HOST, default 127.0.0.1)")
    speech.add_argument("--port", type=int, help="listen port (PONO_SPEECH_WORKER_PORT, default 3001)")
    speech.add_argument("--stt-model", help="'base', 'tiny.en' or a model folder (PONO_STT_MODEL)")
    speech.add_argument("--log-level", help="DEBUG, INFO, WARNING (PONO_LOG_LEVEL)")
    jobs = sub.add_parser("jobs", help="run a job worker: post-call workflows and scheduled jobs")
    jobs.add_argument("--concurrency", type=int, help="jobs run at once (PONO_JOBS_CONCURRENCY, default 4)")
    jobs.add_argument("--log-level", help="DEBUG, INFO, WARNING (PONO_LOG_LEVEL)")
    sub.add_parser("migrate", help="apply database migrations (also done at every start)")
    sub.add_parser("purge", help="remove soft-deleted rows past retention (PONO_RETENTION_DAYS)")
    users = sub.add_parser("users", help="manage users").add_subparsers(dest="users_command", required=True)
    create = users.add_parser("create", help="create a user and an API key")
    create.add_argument("--name", required=True)
    create.add_argument("--role", required=True, choices=ROLES)
    create.add_argument("--print-token", action="store_true", help="print the API token on the last line")
    create.add_argument("--password-stdin", action="store_true", help="read a login password from stdin")
    passwd = users.add_parser("passwd", help="set a user's login password (read from stdin)")
    passwd.add_argument("--name", required=True)
    dlp = sub.add_parser("dlp", help="data loss prevention").add_subparsers(dest="dlp_command", required=True)
    scan = dlp.add_parser("scan", help="redact lines from stdin; one JSON object per line on stdout")
    scan.add_argument("--policy", help="use this persona's DLP policy (name or id)")
    scan.add_argument("--policy-json", help='a policy given inline, e.g. \'{"action": "mask_last4"}\'')
    knowledge = sub.add_parser("knowledge", help="the knowledge base (RAG)").add_subparsers(
        dest="knowledge_command", required=True)
    ingest = knowledge.add_parser("ingest", help="add or update documents (txt, md, html, pdf)")
    ingest.add_argument("paths", nargs="+")
    ingest.add_argument("--collection", required=True)
    search = knowledge.add_parser("search", help="hybrid search of a collection")
    search.add_argument("query")
    search.add_argument("--collection", required=True)
    search.add_argument("--k", type=int, default=5)
    search.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    install_log_redaction()

    if args.command == "migrate":
        _run_storage_command(_migrate(_settings({})))
    elif args.command == "purge":
        _run_storage_command(_purge(_settings({})))
    elif args.command == "users" and args.users_command == "create":
        _run_storage_command(_create_user(_settings({}), args.name, args.role, args.print_token, args.password_stdin))
    elif args.command == "users" and args.users_command == "passwd":
        _run_storage_command(_set_password(_settings({}), args.name))
    elif args.command == "knowledge" and args.knowledge_command == "ingest":
        _run_storage_command(_ingest(_settings({}), args.paths, args.collection))
    elif args.command == "knowledge":
        _run_storage_command(_search(_settings({}), args.query, args.collection, args.k, args.json))
    elif args.command == "dlp":
        try:
            policy = asyncio.run(_dlp_policy(_settings({}), args.policy, args.policy_json))
        except (ValueError, StorageError) as exc:
            raise SystemExit(f"pono: {exc}") from None
        _dlp_scan(policy)

    if args.command == "jobs":
        _jobs(_settings({"jobs_concurrency": args.concurrency, "log_level": args.log_level}))

    if args.command == "speech-worker":
        _speech_worker(_settings({"host": args.host, "speech_worker_port": args.port, "stt_model": args.stt_model,
                                  "log_level": args.log_level}))

    if args.command == "serve":
        settings = _settings({
            "host": args.host, "port": args.port, "data_dir": args.data_dir, "stt_model": args.stt_model,
            "tts": args.tts, "llm_model": args.llm_model, "log_level": args.log_level,
        })
        configure_logging(settings.log_level, settings.log_format)
        with contextlib.suppress(KeyboardInterrupt):
            asyncio.run(_serve(settings))


if __name__ == "__main__":
    main()
