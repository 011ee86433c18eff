-- Retention deletes users and personas for good: what hangs off them goes with them, or the purge fails.
ALTER TABLE api_keys
    DROP CONSTRAINT api_keys_user_id_fkey,
    ADD CONSTRAINT api_keys_user_id_fkey FOREIGN KEY (user_id) REFERENCES users (id) ON DELETE CASCADE;
ALTER TABLE refresh_tokens
    DROP CONSTRAINT refresh_tokens_user_id_fkey,
    ADD CONSTRAINT refresh_tokens_user_id_fkey FOREIGN KEY (user_id) REFERENCES users (id) ON DELETE CASCADE;
ALTER TABLE phone_numbers
    DROP CONSTRAINT phone_numbers_persona_id_fkey,
    ADD CONSTRAINT phone_numbers_persona_id_fkey FOREIGN KEY (persona_id) REFERENCES personas (id) ON DELETE CASCADE;
