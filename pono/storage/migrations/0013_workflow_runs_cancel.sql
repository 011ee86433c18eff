-- Workflow runs can be cancelled (by an operator, or by deleting their workflow), and keep the raw values their
-- runner needs apart from what the API shows (redacted): a manual run's input as given, and each step's output
-- before redaction while the run lasts (pono.storage.workflow_runs says when they are cleared).
ALTER TABLE workflow_runs DROP CONSTRAINT workflow_runs_status_check;
ALTER TABLE workflow_runs ADD CONSTRAINT workflow_runs_status_check
    CHECK (status IN ('queued', 'running', 'succeeded', 'failed', 'cancelled'));
ALTER TABLE workflow_runs ADD COLUMN cancel_reason text;  -- set when a cancel is asked for: by whom, or why
ALTER TABLE workflow_runs ADD COLUMN raw_input jsonb;     -- runner only; `input` is what the API shows
CREATE INDEX workflow_runs_created ON workflow_runs (created_at);  -- retention purges runs by age

ALTER TABLE workflow_step_runs DROP CONSTRAINT workflow_step_runs_status_check;
ALTER TABLE workflow_step_runs ADD CONSTRAINT workflow_step_runs_status_check
    CHECK (status IN ('running', 'succeeded', 'failed', 'skipped', 'cancelled'));
ALTER TABLE workflow_step_runs ADD COLUMN raw_output jsonb;  -- runner only; `output` is what the API shows
