"""The speech worker: `pono speech-worker` (server.py), its wire format (protocol.py), and the app's side
(pool.py: which worker; client.py: a call's recognizer on one, with the local fallback)."""
