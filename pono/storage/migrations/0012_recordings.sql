-- Call recordings (stereo Opus in Ogg): one row per recorded call; the file lives under the data dir or in
-- object storage (storage_key). Personas choose whether calls are recorded, the redaction sound and how long
-- recordings are kept. dlp_findings also holds audio redactions: the channel and the span in the recording.
CREATE TABLE recordings (
    call_id        text PRIMARY KEY REFERENCES calls (id) ON DELETE CASCADE,
    storage_key    text NOT NULL,
    codec          text NOT NULL DEFAULT 'opus',
    duration_s     double precision,
    size_bytes     bigint,
    sha256         text,
    status         text NOT NULL DEFAULT 'recording' CHECK (status IN ('recording', 'complete')),
    retention_days integer,
    started_at     timestamptz NOT NULL,
    completed_at   timestamptz
);
CREATE INDEX recordings_started ON recordings (started_at);

ALTER TABLE dlp_findings
    ADD COLUMN channel text NOT NULL DEFAULT '',  -- '' for a transcript finding; 'caller' or 'agent' in the audio
    ADD COLUMN audio_start_ms integer,
    ADD COLUMN audio_end_ms integer,
    DROP CONSTRAINT dlp_findings_call_id_turn_idx_span_start_entity_type_key,
    ADD CONSTRAINT dlp_findings_key UNIQUE (call_id, turn_idx, span_start, entity_type, channel);

ALTER TABLE personas
    ADD COLUMN recording text NOT NULL DEFAULT 'off' CHECK (recording IN ('off', 'on', 'announce')),
    ADD COLUMN recording_notice text NOT NULL DEFAULT '',
    ADD COLUMN recording_redaction text NOT NULL DEFAULT 'tone' CHECK (recording_redaction IN ('tone', 'silence')),
    ADD COLUMN recording_retention_days integer CHECK (recording_retention_days > 0);
