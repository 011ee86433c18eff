"""Call recording: both sides of a call on one clock, spoken personal data replaced before anything is written
(timeline.py), mapped from transcripts to audio (redaction.py), encoded to Opus in Ogg as the call goes (ogg.py),
and one call's recorder tying them to the call's audio taps and events (recorder.py)."""
