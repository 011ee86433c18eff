"""A local write-ahead journal for writes Postgres could not take: JSON lines, fsync'd, replayed in order.

Appends go to `pending.jsonl`. A replay first rotates that file to `replay-<n>.jsonl` (new appends start
a fresh pending file), applies it, and deletes it only once every write in it has landed.
"""

from __future__ import annotations

import json
import logging
import os
import threading
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)


class Journal:
    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.folder.mkdir(parents=True, exist_ok=True)
        self.folder.chmod(0o700)  # redacted, but still callers' words
        self.pending = folder / "pending.jsonl"
        self._lock = threading.Lock()  # appends come from a worker thread; rotation from another

    def append(self, records: list[dict[str, Any]]) -> None:
        """Blocking (fsync): call it from a worker thread."""
        data = "".join(json.dumps(r, separators=(",", ":"), default=str) + "\n" for r in records).encode()
        with self._lock:
            fd = os.open(self.pending, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
            try:
                os.write(fd, data)
                os.fsync(fd)
            finally:
                os.close(fd)

    def rotate(self) -> list[Path]:
        """Move pending writes aside for replay; return every file awaiting replay, oldest first."""
        with self._lock:
            if self.pending.exists() and self.pending.stat().st_size > 0:
                number = 1 + max((int(p.stem.split("-")[1]) for p in self._replay_files()), default=0)
                self.pending.rename(self.folder / f"replay-{number:08d}.jsonl")
            return self._replay_files()

    def _replay_files(self) -> list[Path]:
        return sorted(self.folder.glob("replay-*.jsonl"))

    @staticmethod
    def read(path: Path) -> list[dict[str, Any]]:
        records: list[dict[str, Any]] = []
        for number, line in enumerate(path.read_text().splitlines(), 1):
            if not line.strip():
                continue
            try:
                records.append(json.loads(line))
            except ValueError:
                # A torn last line from a crash mid-append: the write it held was never acknowledged.
                log.warning("skipping unreadable journal line %s:%d", path.name, number)
        return records

    def has_pending(self) -> bool:
        with self._lock:
            return (self.pending.exists() and self.pending.stat().st_size > 0) or bool(self._replay_files())

    def size_bytes(self) -> int:
        files = [self.pending, *self._replay_files()]
        return sum(f.stat().st_size for f in files if f.exists())
