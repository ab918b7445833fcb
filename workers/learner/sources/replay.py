"""`ReplaySource`: batches recorded as JSONL (`base.BatchRecorder`), replayed in order."""

from __future__ import annotations

from pathlib import Path

from workers.learner.sources.base import Batch


class ReplaySource:
    """Batches from a JSONL file, one per line, in order; the position is the next line."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self._lines = [line for line in self.path.read_text().splitlines() if line.strip()]
        if not self._lines:
            raise ValueError(f"{self.path} has no batches")
        self.position = 0

    def next_batch(self, step: int) -> Batch:
        if self.position >= len(self._lines):
            raise EOFError(f"{self.path} has only {len(self._lines)} batches")
        batch = Batch.from_json(self._lines[self.position])
        self.position += 1
        return batch

    def state(self) -> dict:
        return {"type": "replay", "position": self.position}

    def load_state(self, d: dict) -> None:
        self.position = int(d.get("position", 0))

    def close(self) -> None:
        pass
