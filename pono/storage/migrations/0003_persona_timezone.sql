-- The persona's time zone, for current_datetime and anything else that says "today".
ALTER TABLE personas ADD COLUMN timezone text NOT NULL DEFAULT 'UTC';
