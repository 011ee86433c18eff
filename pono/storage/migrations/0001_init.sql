-- Pono's schema: calls and what was said, personas, knowledge, users and keys, the audit log.
CREATE EXTENSION IF NOT EXISTS vector;

CREATE TABLE users (
    id            uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    name          text NOT NULL,
    role          text NOT NULL CHECK (role IN ('admin', 'operator', 'viewer')),
    password_hash text,
    created_at    timestamptz NOT NULL DEFAULT now(),
    deleted_at    timestamptz
);
CREATE UNIQUE INDEX users_name_live ON users (name) WHERE deleted_at IS NULL;

CREATE TABLE api_keys (
    id           uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    user_id      uuid NOT NULL REFERENCES users (id),
    name         text NOT NULL,
    prefix       text NOT NULL,            -- the first characters, to tell keys apart in lists
    token_hash   text NOT NULL UNIQUE,     -- sha256 of the whole token; the token itself is never stored
    role         text NOT NULL CHECK (role IN ('admin', 'operator', 'viewer')),
    created_at   timestamptz NOT NULL DEFAULT now(),
    last_used_at timestamptz,
    revoked_at   timestamptz
);

CREATE TABLE audit_log (
    id        bigserial PRIMARY KEY,
    at        timestamptz NOT NULL DEFAULT now(),
    actor     text NOT NULL,
    action    text NOT NULL,
    target    text,
    source_ip text,
    details   jsonb NOT NULL DEFAULT '{}'
);
CREATE INDEX audit_log_at ON audit_log (at DESC);

CREATE TABLE personas (
    id                    uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    name                  text NOT NULL,
    system_prompt         text NOT NULL,
    greeting              text NOT NULL DEFAULT '',
    language              text NOT NULL DEFAULT 'en',
    tts_voice             text,
    llm_model             text,
    llm_params            jsonb NOT NULL DEFAULT '{}',
    tools                 jsonb NOT NULL DEFAULT '[]',
    knowledge_collections text[] NOT NULL DEFAULT '{}',
    dlp_policy            jsonb NOT NULL DEFAULT '{}',
    turn_taking           jsonb NOT NULL DEFAULT '{}',
    is_default            boolean NOT NULL DEFAULT false,
    created_at            timestamptz NOT NULL DEFAULT now(),
    updated_at            timestamptz NOT NULL DEFAULT now(),
    deleted_at            timestamptz
);
CREATE UNIQUE INDEX personas_name_live ON personas (name) WHERE deleted_at IS NULL;
CREATE UNIQUE INDEX personas_one_default ON personas (is_default) WHERE is_default AND deleted_at IS NULL;

INSERT INTO personas (name, system_prompt, greeting, is_default) VALUES (
    'default',
    'You are Pono, a friendly voice assistant on a phone call. Answer in one or two short spoken sentences. '
    'No lists, no markdown.',
    'Hi, this is Pono. How can I help?',
    true
);

CREATE TABLE calls (
    id          text PRIMARY KEY,
    transport   text NOT NULL,
    persona     text,
    caller      text,
    replica     text NOT NULL,
    started_at  timestamptz NOT NULL,
    ended_at    timestamptz,
    end_reason  text,
    deleted_at  timestamptz
);
CREATE INDEX calls_started ON calls (started_at DESC, id DESC);

CREATE TABLE turns (
    id          bigserial PRIMARY KEY,
    call_id     text NOT NULL REFERENCES calls (id) ON DELETE CASCADE,
    idx         integer NOT NULL,
    role        text NOT NULL CHECK (role IN ('user', 'agent')),
    text        text NOT NULL,             -- as stored: redacted
    source      text,
    started_at  timestamptz,
    ended_at    timestamptz,
    interrupted boolean NOT NULL DEFAULT false,
    latency     jsonb NOT NULL DEFAULT '{}',
    text_search tsvector GENERATED ALWAYS AS (to_tsvector('english', text)) STORED,
    UNIQUE (call_id, idx)                  -- the idempotency key of a turn write
);
CREATE INDEX turns_text_search ON turns USING gin (text_search);

CREATE TABLE tool_calls (
    id           bigserial PRIMARY KEY,
    call_id      text NOT NULL REFERENCES calls (id) ON DELETE CASCADE,
    turn_idx     integer NOT NULL,
    tool_call_id text NOT NULL,
    name         text NOT NULL,
    arguments    jsonb NOT NULL DEFAULT '{}',
    result       jsonb,
    duration_ms  double precision,
    error        text,
    created_at   timestamptz NOT NULL DEFAULT now(),
    UNIQUE (call_id, tool_call_id)
);

CREATE TABLE dlp_findings (
    id          bigserial PRIMARY KEY,
    call_id     text NOT NULL REFERENCES calls (id) ON DELETE CASCADE,
    turn_idx    integer NOT NULL,
    entity_type text NOT NULL,
    span_start  integer NOT NULL,
    span_end    integer NOT NULL,
    action      text NOT NULL,
    created_at  timestamptz NOT NULL DEFAULT now(),
    UNIQUE (call_id, turn_idx, span_start, entity_type)
);

CREATE TABLE documents (
    id           uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    collection   text NOT NULL,
    source       text NOT NULL,
    title        text,
    content_hash text NOT NULL,
    metadata     jsonb NOT NULL DEFAULT '{}',
    created_at   timestamptz NOT NULL DEFAULT now(),
    updated_at   timestamptz NOT NULL DEFAULT now(),
    deleted_at   timestamptz
);
CREATE UNIQUE INDEX documents_source_live ON documents (collection, source) WHERE deleted_at IS NULL;

CREATE TABLE chunks (
    id           bigserial PRIMARY KEY,
    document_id  uuid NOT NULL REFERENCES documents (id) ON DELETE CASCADE,
    idx          integer NOT NULL,
    text         text NOT NULL,
    start_offset integer NOT NULL,
    end_offset   integer NOT NULL,
    metadata     jsonb NOT NULL DEFAULT '{}',
    embedding    vector(384),
    text_search  tsvector GENERATED ALWAYS AS (to_tsvector('english', text)) STORED,
    UNIQUE (document_id, idx)
);
CREATE INDEX chunks_embedding ON chunks USING hnsw (embedding vector_cosine_ops);
CREATE INDEX chunks_text_search ON chunks USING gin (text_search);
