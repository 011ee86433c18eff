-- Logins, scoped API keys, the shared signing secret, and per-persona call-token policy.

-- Refresh tokens rotate: each use revokes the token and issues its successor in the same family.
-- A revoked token used again means it was stolen, and the whole family is revoked.
CREATE TABLE refresh_tokens (
    id          uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    user_id     uuid NOT NULL REFERENCES users (id),
    family      uuid NOT NULL,
    token_hash  text NOT NULL UNIQUE,
    created_at  timestamptz NOT NULL DEFAULT now(),
    expires_at  timestamptz NOT NULL,
    revoked_at  timestamptz
);
CREATE INDEX refresh_tokens_family ON refresh_tokens (family);

-- Areas a key may touch; empty means every area its role allows.
ALTER TABLE api_keys ADD COLUMN scopes text[] NOT NULL DEFAULT '{}';

-- One secret for every replica sharing this database: tokens signed by one verify on all.
CREATE TABLE server_secrets (
    name       text PRIMARY KEY,
    value      text NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now()
);

ALTER TABLE personas ADD COLUMN call_tokens_enabled boolean NOT NULL DEFAULT true;
ALTER TABLE personas ADD COLUMN call_tokens_per_minute integer;
