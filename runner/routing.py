"""Which generation worker gets the next request: the one with the fewest requests in flight (least outstanding
requests), ties to the least recently picked (round-robin), and a URL that just failed is avoided for `cooldown`
seconds unless nothing else is left. Shared by the front router and the learner's rollout source; thread-safe."""

from __future__ import annotations

import threading
import time


class LeastLoaded:
    def __init__(self, cooldown: float = 5.0):
        self.cooldown = cooldown
        self._lock = threading.Lock()
        self._inflight: dict[str, int] = {}
        # Least recently picked, not fewest picks so far: a worker that restarts on a new URL would otherwise take
        # every sequential request until it caught up with the others.
        self._last_pick: dict[str, int] = {}
        self._sequence = 0
        self._failed_at: dict[str, float] = {}

    def acquire(self, urls: list[str]) -> str:
        """Pick one of `urls` (non-empty) and count a request against it; pair with `release`."""
        with self._lock:
            now = time.monotonic()
            healthy = [u for u in urls if now - self._failed_at.get(u, -1e9) > self.cooldown]
            url = min(healthy or urls, key=lambda u: (self._inflight.get(u, 0), self._last_pick.get(u, 0)))
            self._inflight[url] = self._inflight.get(url, 0) + 1
            self._sequence += 1
            self._last_pick[url] = self._sequence
        return url

    def release(self, url: str, failed: bool = False) -> None:
        with self._lock:
            left = self._inflight.get(url, 0) - 1
            if left > 0:
                self._inflight[url] = left
            else:
                self._inflight.pop(url, None)
            if failed:
                self._failed_at[url] = time.monotonic()
