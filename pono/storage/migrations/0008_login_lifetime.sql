-- A password change ends every session of its user; a login ends at an absolute age, however often it is
-- refreshed; a one-time password (the first admin's) must be changed before anything else.

-- Bumped by every password change: access tokens carry the generation they were issued in, and older ones stop.
ALTER TABLE users ADD COLUMN token_generation integer NOT NULL DEFAULT 0;
ALTER TABLE users ADD COLUMN must_change_password boolean NOT NULL DEFAULT false;

-- When the login (the refresh family) began, with a password: rotation never extends it past PONO_LOGIN_MAX_AGE_S.
ALTER TABLE refresh_tokens ADD COLUMN login_at timestamptz;
UPDATE refresh_tokens r SET login_at = f.first
    FROM (SELECT family, min(created_at) AS first FROM refresh_tokens GROUP BY family) f
    WHERE r.family = f.family;
ALTER TABLE refresh_tokens ALTER COLUMN login_at SET DEFAULT now(), ALTER COLUMN login_at SET NOT NULL;
