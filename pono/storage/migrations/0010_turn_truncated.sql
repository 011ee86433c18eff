-- An agent turn whose LLM stream broke off mid-answer is kept, marked as cut short by the model.
ALTER TABLE turns ADD COLUMN IF NOT EXISTS truncated boolean NOT NULL DEFAULT false;
