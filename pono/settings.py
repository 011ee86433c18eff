"""One typed settings object for the whole server, read from the environment and CLI flags."""

from __future__ import annotations

import os
import re
import socket
from pathlib import Path
from typing import Any, Literal

from pydantic import AliasChoices, BaseModel, Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from pono.agent.tools.mcp_servers import McpServerConfig
from pono.timecheck import check_cron

# Bounds of PONO_RECORDING_LAG_S and PONO_RECORDING_MAX_HOLD_S. The caller's audio is held for redaction from
# this long before speech is confirmed (pono.voice.recording.recorder.PRE_SPEECH_S): the lag may not be shorter.
RECORDING_LAG_MIN_S = 1.0
# An utterance starts with min_speech_ms of voice and a 300 ms pre-roll (pono.voice.lead_in): both must lie within
# the recording's hold (RECORDING_LAG_MIN_S), or words transcribed later were already written unredacted.
MIN_SPEECH_MAX_MS = round(RECORDING_LAG_MIN_S * 1000) - 300
RECORDING_LAG_MAX_S = 30.0
RECORDING_MAX_HOLD_MAX_S = 600.0


class IceServer(BaseModel):
    """One entry of RTCConfiguration.iceServers, as the browser expects it."""

    urls: list[str] | str
    username: str | None = None
    credential: str | None = None


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="PONO_", extra="ignore", populate_by_name=True)

    host: str = "127.0.0.1"
    port: int = 3000
    data_dir: Path = Path(".pono")

    # WebRTC: ICE servers for the browser (JSON list); empty means host candidates only.
    ice_servers: list[IceServer] = Field(default_factory=list)
    # Addresses aiortc gathers host candidates on; empty means every interface.
    ice_interfaces: list[str] = Field(default_factory=list)

    # Speech models.
    stt_model: str = "base"  # "base", "tiny.en" or a CTranslate2 model folder
    stt_device: Literal["auto", "cpu", "cuda"] = "auto"
    stt_cpu_threads: int = 2
    stt_partial_interval_s: float = 1.0  # 0 disables partial transcripts
    # Whisper's encoder window (s) at least: its own is 30, and a 3 s question padded to 30 s pays for 30.
    stt_partial_window_s: float = 10.0
    # 30: Whisper's own (bench/speech.py --fidelity compares them); phone calls (8 kHz) always get 30.
    stt_final_window_s: float = 20.0
    stt_batch_window_ms: float = 20.0  # requests this close together go to Whisper as one batch; 0: no wait
    # Clips per Whisper batch. 0: 16 on CUDA, 1 (no batching) on a CPU, where a batch of three finals takes as
    # long as the three one after another, so batching only delays the first two (bench/latency.py).
    stt_max_batch: int = 0
    tts: Literal["hibari", "piper"] = "hibari"
    tts_voice: str | None = None
    # "cuda" needs onnxruntime's CUDA provider (pip install 'pono[gpu]') and fails loudly without it.
    tts_device: Literal["auto", "cpu", "cuda"] = "auto"
    # Where models are kept: the joined Whisper base, and larger CTranslate2 models a deployment adds
    # (PONO_STT_MODEL=<models dir>/<folder>). Default: <data dir>/models.
    models_dir: Path = Path(".pono/models")
    # The speech worker (`pono speech-worker`): STT and TTS served to many app servers, batched on a GPU.
    # A comma-separated list of base URLs ("http://pono-speech-worker:3001") is several workers: each call
    # goes to the least loaded. Unset: this process runs its own models.
    speech_worker_url: str | None = None
    speech_worker_token: SecretStr | None = None  # the worker refuses to start without it; the app presents it
    speech_worker_port: int = 3001  # where `pono speech-worker` listens (on PONO_HOST)
    # When no worker answers: "local" loads the models here too and a call's turn goes on on them; "none" loads
    # none, and a call gets an error event and an empty transcript.
    speech_fallback: Literal["local", "none"] = "local"
    speech_worker_stall_s: float = 5.0  # a final (or a TTS answer) not begun within this long: fall back

    # Turn-taking (milliseconds).
    vad_threshold: float = Field(default=0.5, gt=0.0, lt=1.0)
    min_speech_ms: int = Field(default=200, ge=32, le=MIN_SPEECH_MAX_MS)
    hangover_ms: int = Field(default=450, ge=100, le=3000)  # with the end-of-turn model off
    # The end-of-turn model (Smart Turn v3.2) asked after end_of_turn_check_ms of silence: a complete turn ends
    # after the short hangover, an incomplete one waits up to the long one (or until the caller speaks again).
    end_of_turn_model: bool = True
    end_of_turn_threshold: float = Field(default=0.5, gt=0.0, lt=1.0)
    # Asked at 160 ms. At 96 ms with a 160 ms hangover the median end-of-turn delay was 413 ms (against ~470) and
    # fewer paused sentences were cut, but a card number read in groups ("4 1 1 1, 1 1 1 1, ...") was cut into
    # turns of four digits, and a recording's redaction, which checks each turn alone, kept them (two CI runs):
    # that default waits until recordings join turns as the transcript DLP does. A second check later in the pause
    # saves complete questions the long wait but cuts more paused sentences: off by default.
    end_of_turn_check_ms: int = Field(default=160, ge=32, le=1000)
    end_of_turn_recheck_ms: int = Field(default=0, ge=0, le=2000)  # a turn found unfinished is asked again; 0: never
    short_hangover_ms: int = Field(default=200, ge=64, le=2000)
    long_hangover_ms: int = Field(default=1500, ge=200, le=5000)
    barge_in_min_ms: int = Field(default=600, ge=100, le=5000)
    max_utterance_s: float = 120.0  # a turn this long is cut and committed; the caller may go on
    drain_timeout_s: float = 3600.0  # on SIGTERM, live calls may go on this long before a goodbye
    call_max_s: float = 3600.0  # a call this long hears a goodbye and is hung up; 0: no limit
    call_idle_timeout_s: float = 300.0  # no audio frames nor messages from the caller this long: hang up; 0: never
    dtmf_interdigit_ms: int = 1000  # keys pressed closer together than this are one entry (a PIN, a card)
    call_text_messages_per_10s: int = 20  # typed messages and key presses per call: a burst, then 1 per 10 s/n
    # Start the LLM on the transcript of a pause before the turn is surely over; dropped if the caller
    # goes on. Costs LLM tokens for nothing when they do, saves up to the hangover when they don't.
    preemptive_reply: bool = True

    # The agent's LLM. Unset OPENAI_BASE_URL starts the bundled SmolLM2 behind llama.cpp.
    openai_base_url: str | None = Field(
        default=None, validation_alias=AliasChoices("OPENAI_BASE_URL", "openai_base_url")
    )
    openai_api_key: SecretStr = Field(
        default=SecretStr("not-needed"), validation_alias=AliasChoices("OPENAI_API_KEY", "openai_api_key")
    )
    llm_model: str = "smollm2"
    llm_timeout_s: float = 15.0
    llm_max_tokens: int = 160
    llm_temperature: float = 0.6
    system_prompt: str = (
        "You are Pono, a friendly voice assistant on a phone call. Answer in one or two short "
        "spoken sentences. No lists, no markdown."
    )
    greeting: str = "Hi, this is Pono. How can I help?"  # the fallback persona's
    speak_greeting: bool = True  # off in tests and benchmarks, where the caller speaks first
    llm_threads: int = 2
    # Resilience (pono.agent.llm): a failing endpoint (error, timeout, 429) is retried with backoff within
    # PONO_LLM_TIMEOUT_S, then the turn goes to the fallback; never once a token has been streamed.
    llm_retries: int = 2  # extra tries per endpoint and turn
    llm_fallback_url: str | None = None  # an OpenAI-compatible base URL (".../v1") for when the primary fails
    llm_fallback_model: str | None = None  # the fallback's model (default: PONO_LLM_MODEL)
    llm_fallback_api_key: SecretStr | None = None  # default: OPENAI_API_KEY
    # With OPENAI_BASE_URL set and no PONO_LLM_FALLBACK_URL: also start the bundled SmolLM2 as the fallback.
    llm_fallback_embedded: bool = False
    llm_breaker_failures: int = 3  # failures in a row that open the primary's circuit (turns go to the fallback)
    llm_breaker_reset_s: float = 30.0  # then a health probe every this many seconds closes it once it answers

    # Storage. Unset DATABASE_URL / REDIS_URL start the embedded Postgres / Valkey in the data dir.
    database_url: SecretStr | None = Field(
        default=None, validation_alias=AliasChoices("DATABASE_URL", "database_url")
    )
    redis_url: SecretStr | None = Field(default=None, validation_alias=AliasChoices("REDIS_URL", "redis_url"))
    replica_id: str = Field(default_factory=lambda: f"{socket.gethostname()}-{os.getpid()}")
    db_pool_min: int = 0  # no idle floor: during an outage asyncpg would retry it noisily
    db_pool_max: int = 10
    db_connect_attempts: int = 5
    registry_ttl_s: int = 15
    retention_days: int = 90  # soft-deleted rows are purged after this many days

    # Call recordings (pono.voice.recording): the fallback persona's choice; files under <data dir>/recordings,
    # or in S3-compatible object storage (s3://bucket/prefix; endpoint for MinIO and the like, AWS_* credentials).
    recording_default: Literal["off", "on", "announce"] = "off"
    recording_notice: str = "This call is recorded for quality and training."
    recordings_url: str | None = None
    recordings_s3_endpoint: str | None = None
    recordings_s3_region: str = "us-east-1"
    # The recording trails the call at least this much (to redact before writing); audio still unchecked after
    # recording_max_hold_s is written silenced. Bounds: RECORDING_LAG_MIN_S.. and _recording_bounds below.
    recording_lag_s: float = 1.5
    recording_max_hold_s: float = 60.0

    # Knowledge: an OpenAI-compatible embeddings endpoint instead of the bundled MiniLM (optional).
    # It must return 384 dimensions (the `dimensions` parameter is sent), the size of the pgvector column.
    embeddings_url: str | None = None
    embeddings_model: str = "text-embedding-3-small"

    # Tools.
    # Hosts webhook tools and MCP URLs may reach: names, IPs, CIDRs (pono.agent.tools.netguard). A name only
    # admits public addresses; loopback/private/link-local ones must be listed as an IP or CIDR.
    webhook_allowed_hosts: list[str] = Field(default_factory=list)
    webhook_max_response_bytes: int = 64 * 1024  # a larger webhook answer is an error result
    # The stdio MCP servers personas may name (JSON: name -> {"command", "args", "env"}; see
    # pono.agent.tools.mcp_servers). A persona can't give a command itself.
    mcp_servers: dict[str, McpServerConfig] = Field(default_factory=dict)
    tool_max_rounds: int = 3
    tool_filler_after_s: float = 1.5

    # Rate limits, counted in Redis so they hold across replicas.
    call_tokens_per_minute: int = 30  # per client IP (a persona may set its own, lower)
    requests_per_second: int = 100  # per client IP, every endpoint but the health checks
    key_requests_per_second: int = 50  # per API key or login
    logins_per_minute: int = 10  # attempts per user name: slows guessing one account's password
    login_ip_per_minute: int = 30  # attempts per client IP: slows spraying many accounts

    # Logins: JWT access tokens and rotating refresh tokens.
    access_token_ttl_s: int = 3600
    refresh_token_ttl_s: int = 7 * 24 * 3600
    login_max_age_s: int = 30 * 24 * 3600  # a login ends this long after the password was given, refreshed or not
    # The console re-checks its token this often (and on every action); operators' audio and take-overs, this often.
    console_reauth_s: float = 30.0

    # HTTP limits.
    max_body_bytes: int = 256 * 1024
    max_calls: int = 50

    # Metrics: bearer token for GET /metrics (generated into the data dir when unset; an admin login or key
    # works too), or a separate port that serves /metrics alone without a token (for an in-cluster scraper).
    metrics_token: SecretStr | None = None
    metrics_port: int | None = None

    # Logs: "json" (structlog, one object per line) or "console"; default json unless stderr is a terminal.
    log_format: str | None = None

    log_level: str = "INFO"

    # Phone calls over SIP: off unless PONO_SIP_PORT is set.
    sip_host: str | None = None  # SIP is on when PONO_SIP_HOST or PONO_SIP_PORT is set
    sip_port: int | None = None  # default 5060 once SIP is on
    sip_tcp: bool = False  # also listen on TCP
    sip_public_address: str | None = None  # the address put in SDP and Contact (default: the bound one)
    sip_max_calls: int = 20  # more get 486 Busy Here
    sip_allowed_sources: list[str] = Field(default_factory=list)  # CIDRs the trunk may come from; [] = any
    sip_auth_user: str | None = None  # digest authentication of the trunk, when set
    sip_auth_password: SecretStr | None = None
    sip_operator_uri: str | None = None  # where transfer_to_operator REFERs a SIP caller
    sip_ring_ms: int = 0  # ring before answering
    sip_rtp_ports: str | None = None  # "10000-20000": the UDP range RTP binds in, for firewalls; unset = any
    sip_media_timeout_s: float = 30.0  # no RTP for this long (and not on hold): the line is dead, hang up
    # CIDRs where non-public media destinations (RFC 1918, loopback…) named in SDP are allowed; [] = public only
    # (plus loopback when the SIP listener is on loopback). Link-local, multicast, broadcast: never.
    sip_media_networks: list[str] = Field(default_factory=list)
    sip_tcp_max_connections: int = 256  # concurrent SIP TCP connections; more are closed at once
    sip_tcp_idle_timeout_s: float = 120.0  # a TCP connection with no message for this long (and no call) closes

    # Jobs (pono.jobs): post-call workflows and scheduled jobs on a pgqueuer queue in Postgres.
    jobs_in_process: bool = True  # `pono serve` runs a worker too; false when dedicated `pono jobs` workers run
    jobs_concurrency: int = Field(default=4, ge=2, le=256)  # jobs one worker runs at once (pgqueuer: 2 or more)
    jobs_heartbeat_s: float = Field(default=30.0, ge=1.0)  # a job whose worker is silent this long is picked again
    jobs_drain_timeout_s: float = 60.0  # on SIGTERM, running jobs may finish this long; then they are released
    jobs_health_port: int | None = None  # `pono jobs` serves /health and /ready here (its probes); unset: none
    jobs_purge_cron: str = "17 3 * * *"  # the retention purge (UTC)
    jobs_report_cron: str = "5 0 * * *"  # the nightly report of the day before (UTC)
    # Summaries give the LLM up to live calls: "auto" when the bundled (single-slot) model serves them, "always"
    # (a self-hosted one-slot server behind OPENAI_BASE_URL), "never". See pono.jobs.llm.
    jobs_llm_yield: Literal["auto", "always", "never"] = "auto"
    jobs_eval_timeout_s: float = Field(default=5.0, gt=0, le=60)  # one template render or condition, at most
    # SMTP for workflow e-mail steps; unset host: e-mail steps fail with that reason.
    smtp_host: str | None = None
    smtp_port: int = 587
    smtp_from: str = "pono@localhost"
    smtp_user: str | None = None
    smtp_password: SecretStr | None = None
    smtp_starttls: bool = False
    smtp_timeout_s: float = 20.0

    # Provider media streams (Twilio): the token the provider must present; unset refuses every stream.
    twilio_token: SecretStr | None = None
    # Real Twilio signs the websocket upgrade (X-Twilio-Signature) with the account's auth token instead.
    twilio_auth_token: SecretStr | None = None
    # Byte order of L16 media (start.mediaFormat audio/x-l16): RFC 3551 says big-endian; some providers send
    # little-endian ("little").
    twilio_l16_byte_order: Literal["big", "little"] = "big"
    # The externally visible base URL (https://pono.example.com), for signatures made behind a proxy;
    # unset: the request's own, as X-Forwarded-Proto / X-Forwarded-Host say.
    public_url: str | None = None

    def model_post_init(self, __context: Any) -> None:
        self.data_dir = self.data_dir.expanduser().resolve()
        if "models_dir" not in self.model_fields_set:  # it follows the data dir unless set itself
            self.models_dir = self.data_dir / "models"
        self.models_dir = self.models_dir.expanduser().resolve()

    @field_validator("jobs_purge_cron", "jobs_report_cron")
    @classmethod
    def _cron_fires(cls, value: str) -> str:
        """The built-in schedules must be cron expressions that fire: a bad one would stop every job worker."""
        return check_cron(value)

    @model_validator(mode="after")
    def _hangovers_in_order(self) -> Settings:
        """The end-of-turn model is asked before the short hangover runs out, which is shorter than the long."""
        if not self.end_of_turn_check_ms < self.short_hangover_ms < self.long_hangover_ms:
            raise ValueError("PONO_END_OF_TURN_CHECK_MS < PONO_SHORT_HANGOVER_MS < PONO_LONG_HANGOVER_MS must hold "
                             f"(now {self.end_of_turn_check_ms}, {self.short_hangover_ms}, {self.long_hangover_ms})")
        recheck = self.end_of_turn_recheck_ms
        if recheck and not self.end_of_turn_check_ms < recheck < self.long_hangover_ms:
            raise ValueError("PONO_END_OF_TURN_RECHECK_MS must be 0 (off) or between PONO_END_OF_TURN_CHECK_MS and "
                             f"PONO_LONG_HANGOVER_MS (now {recheck})")
        return self

    @model_validator(mode="after")
    def _recording_bounds(self) -> Settings:
        """The recording's lag and hold, named by their variables. A lag shorter than the caller's hold reaches
        back (it begins RECORDING_LAG_MIN_S before speech is confirmed), or a hold no longer than the lag, writes
        the caller's audio before its transcript was checked for personal data: a negative lag wrote a card
        number unredacted. The upper bounds keep each call's held audio (64 kB a second) bounded. S3 settings
        have the form the store needs, refused here rather than at the first recorded call."""
        lag, cap = self.recording_lag_s, self.recording_max_hold_s
        if not RECORDING_LAG_MIN_S <= lag <= RECORDING_LAG_MAX_S:
            raise ValueError(f"PONO_RECORDING_LAG_S must be between {RECORDING_LAG_MIN_S} and {RECORDING_LAG_MAX_S} "
                             f"seconds (now {lag}): the caller's audio is held from {RECORDING_LAG_MIN_S} s before "
                             "speech is confirmed, and a shorter lag writes it before it is checked for personal data")
        if not lag < cap <= RECORDING_MAX_HOLD_MAX_S:
            raise ValueError(f"PONO_RECORDING_MAX_HOLD_S must be more than PONO_RECORDING_LAG_S ({lag}) and at most "
                             f"{RECORDING_MAX_HOLD_MAX_S} seconds (now {cap})")
        url, endpoint = self.recordings_url, self.recordings_s3_endpoint
        if url and not re.fullmatch(r"s3://[^/\s]+(/\S*)?", url):
            raise ValueError(f"PONO_RECORDINGS_URL must be s3://bucket[/prefix] (now {url!r})")
        if endpoint and not endpoint.startswith(("http://", "https://")):
            raise ValueError(f"PONO_RECORDINGS_S3_ENDPOINT must be an http(s):// URL (now {endpoint!r})")
        return self

    @model_validator(mode="after")
    def _speech_worker_reachable(self) -> Settings:
        """A speech worker URL needs its token, every URL of the list is http(s), and a token (the worker's or
        the app's) is at least 16 characters."""
        token = self.speech_worker_token.get_secret_value() if self.speech_worker_token else ""
        if self.speech_worker_url:
            urls = [u.strip() for u in self.speech_worker_url.split(",") if u.strip()]
            if not urls or any(not u.startswith(("http://", "https://")) for u in urls):
                raise ValueError("PONO_SPEECH_WORKER_URL must be http(s):// base URLs, comma-separated")
            if not token:
                raise ValueError("PONO_SPEECH_WORKER_URL is set but PONO_SPEECH_WORKER_TOKEN is not")
        if token and len(token) < 16:
            raise ValueError("PONO_SPEECH_WORKER_TOKEN must be at least 16 characters (openssl rand -hex 32 makes "
                             "one)")
        return self

    @property
    def embedded_llm(self) -> bool:
        return not self.openai_base_url

