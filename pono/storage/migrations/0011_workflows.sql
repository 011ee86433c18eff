-- Workflows: what runs after a call, on a schedule or by hand; their runs and each step's attempts; call summaries;
-- the nightly reports. The job queue itself is pgqueuer's tables, installed by pono.storage.jobs.
CREATE TABLE workflows (
    id           uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    name         text NOT NULL,
    definition   jsonb NOT NULL,           -- the workflow JSON as the API took it (trigger, steps)
    trigger_type text NOT NULL,            -- call.ended | schedule | manual (from the definition, for lookups)
    enabled      boolean NOT NULL DEFAULT true,
    next_fire_at timestamptz,              -- schedule triggers: the next time the cron expression fires
    created_at   timestamptz NOT NULL DEFAULT now(),
    updated_at   timestamptz NOT NULL DEFAULT now(),
    deleted_at   timestamptz
);
CREATE UNIQUE INDEX workflows_name_live ON workflows (name) WHERE deleted_at IS NULL;
CREATE INDEX workflows_trigger ON workflows (trigger_type) WHERE deleted_at IS NULL AND enabled;

CREATE TABLE workflow_runs (
    id              uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    workflow_id     uuid NOT NULL REFERENCES workflows (id) ON DELETE CASCADE,
    call_id         text REFERENCES calls (id) ON DELETE CASCADE,
    trigger         text NOT NULL,         -- call.ended | schedule | manual
    idempotency_key text NOT NULL UNIQUE,  -- one run per (workflow, call) or (workflow, fire time)
    definition      jsonb NOT NULL,        -- the workflow as it was when the run was made
    input           jsonb NOT NULL DEFAULT '{}',
    status          text NOT NULL DEFAULT 'queued'
                    CHECK (status IN ('queued', 'running', 'succeeded', 'failed')),
    execution       int NOT NULL DEFAULT 1, -- raised by each retry of a failed run
    attempts        int NOT NULL DEFAULT 0, -- times a worker started it (a crash makes another)
    error           text,                  -- redacted
    created_at      timestamptz NOT NULL DEFAULT now(),
    started_at      timestamptz,
    finished_at     timestamptz
);
CREATE INDEX workflow_runs_workflow ON workflow_runs (workflow_id, created_at DESC);
CREATE INDEX workflow_runs_call ON workflow_runs (call_id) WHERE call_id IS NOT NULL;
CREATE INDEX workflow_runs_status ON workflow_runs (status, created_at DESC);

CREATE TABLE workflow_step_runs (
    run_id      uuid NOT NULL REFERENCES workflow_runs (id) ON DELETE CASCADE,
    execution   int NOT NULL,
    idx         int NOT NULL,
    phase       text NOT NULL CHECK (phase IN ('do', 'undo')),  -- undo: the step's compensation
    name        text NOT NULL,
    type        text NOT NULL,
    status      text NOT NULL CHECK (status IN ('running', 'succeeded', 'failed', 'skipped')),
    attempts    int NOT NULL DEFAULT 0,
    output      jsonb,                     -- redacted
    error       text,                      -- redacted
    started_at  timestamptz NOT NULL DEFAULT now(),
    finished_at timestamptz,
    PRIMARY KEY (run_id, execution, idx, phase)
);

CREATE TABLE call_summaries (
    call_id      text PRIMARY KEY REFERENCES calls (id) ON DELETE CASCADE,
    summary      text NOT NULL,
    action_items jsonb NOT NULL DEFAULT '[]',
    disposition  text,
    run_id       uuid REFERENCES workflow_runs (id) ON DELETE SET NULL,
    created_at   timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE reports (
    id         bigserial PRIMARY KEY,
    kind       text NOT NULL,
    period     date NOT NULL,
    body       jsonb NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now(),
    UNIQUE (kind, period)
);
