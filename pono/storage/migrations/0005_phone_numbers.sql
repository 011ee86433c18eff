-- Which persona answers a dialed number (the SIP Request-URI user part, or a provider's "to" number).
CREATE TABLE phone_numbers (
    number     text PRIMARY KEY,          -- normalised: digits, with a leading + when dialed with one
    persona_id uuid NOT NULL REFERENCES personas (id),
    created_at timestamptz NOT NULL DEFAULT now()
);
