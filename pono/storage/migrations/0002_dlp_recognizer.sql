-- Which recognizer found each DLP finding (the raw value itself is never stored).
ALTER TABLE dlp_findings ADD COLUMN recognizer text NOT NULL DEFAULT '';
