"""`BuiltinSource`: rollouts of a task (a built-in one, `workers.learner.tasks`, or the dataset task,
`workers.learner.sources.dataset`) from the generation workers, scored by the task."""

from __future__ import annotations

import logging
import threading
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import httpx

from runner.routing import LeastLoaded
from workers.learner.sources.base import (
    Batch,
    BatchRecorder,
    Retryable,
    Sample,
    Stopped,
    in_daemon_thread,
    retrying,
    wait_unless_stopped,
)
from workers.learner.tasks import Task

log = logging.getLogger(__name__)

RETRY_STATUS = {429, 502, 503, 504}
REFUSED_STATUS = {400, 413, 422}  # the worker refused this prompt (e.g. it cannot fit the context): skip it


class Refused(Exception):
    """A worker refused one prompt as the caller's mistake; the prompt is skipped, not retried."""


def choices(response: dict) -> list[dict]:
    """The completions of a `/v1/completions` response, in order."""
    return sorted(response["choices"], key=lambda c: c["index"])


def score(task: Task, items: list[tuple[Any, dict]]) -> tuple[list[float], int | None]:
    """Rewards of (prompt, choice) items, all at once when the task can (the dataset task: its reward calls run
    concurrently), with the number of failed reward calls (None: the task does not count them)."""
    triples = [(p, c["token_ids"], c.get("text", "")) for p, c in items]
    if hasattr(task, "score"):
        return task.score(triples)
    return [task.reward(*t) for t in triples], None


class BuiltinSource:
    """Rollouts from the generation workers for a built-in task.

    Each prompt of a batch is one `POST /v1/completions` with `n = group_size`, sent concurrently. Each attempt goes
    to the worker URL with the fewest requests in flight from this source (least outstanding requests: a group's
    cost varies with its completions' lengths, so this balances better than round-robin), re-reading `urls()` every
    time so a restarted, re-addressed or newly joined worker is picked up. A URL that just failed is skipped by the
    retry (and avoided by other requests for `FAILED_COOLDOWN` seconds) unless it is the only one. Connection errors
    and 429/5xx answers are retried with backoff up to `retry_seconds`. Once `stop` is set, `next_batch` raises
    `Stopped` at once and the batch's requests are abandoned (see `in_daemon_thread`).

    `depth` > 0: the next `depth` batches are started (paced by `ready`, module doc) before `next_batch` waits for
    the one it returns, none past step `steps`. At most `batch_size` requests are sent at once, oldest batch first
    as slots free up, so the batch the learner waits for is never queued behind prefetched ones.
    """

    FAILED_COOLDOWN = 5.0
    MAX_REFUSED = 256  # refused prompts in a row before `next_batch` gives up

    def __init__(
        self,
        task: Task,
        urls: Callable[[], list[str]],
        group_size: int,
        batch_size: int,
        max_tokens: int,
        temperature: float = 1.0,
        seed: int = 0,
        record: str | Path | None = None,
        timeout: float = 600.0,
        retry_seconds: float = 120.0,
        seeded: bool = False,
        api_token: str = "",
        stop: threading.Event | None = None,
        depth: int = 0,
        ready: Callable[[int], bool] | None = None,
        steps: int | None = None,
    ):
        self.task = task
        self.depth, self.ready, self.steps = depth, ready, steps
        self._ahead: deque[tuple[int, list, list[Future]]] = deque()  # started batches: (position, prompts, futures)
        self.stop = stop or threading.Event()
        self.urls = urls
        self.group_size = group_size
        self.batch_size = batch_size
        self.max_tokens = max_tokens
        self.temperature = temperature
        self.seed = seed
        self.position = 0  # index of the next prompt
        self.recorder = BatchRecorder(record) if record else None
        self.retry_seconds = retry_seconds
        # Seeded sampling makes rollouts reproducible (prompt i always gets the same draws for the same weights), but
        # the engine then samples those sequences one by one instead of batched: for tests and debugging.
        self.seeded = seeded
        headers = {"Authorization": f"Bearer {api_token}"} if api_token else None
        self._client = httpx.Client(timeout=httpx.Timeout(timeout, connect=5.0), headers=headers)
        self._slots = threading.BoundedSemaphore(max(1, min(batch_size, 32)))  # requests in flight at once
        self._routing = LeastLoaded(self.FAILED_COOLDOWN)  # the front router's policy; thread-safe

    def _acquire_url(self, last_failed: str | None) -> str:
        """Choose the least loaded worker URL, other than the one that just failed unless it is the only one, and
        count a request against it (release with `_release_url`)."""
        urls = [u.rstrip("/") for u in self.urls()]
        if not urls:
            raise Retryable("no generation worker is available yet")
        return self._routing.acquire([u for u in urls if u != last_failed] or urls)

    def _release_url(self, url: str, failed: bool) -> None:
        self._routing.release(url, failed)

    def complete(self, prompt_ids: list[int], prompt_index: int) -> dict:
        last_failed: dict[str, str | None] = {"url": None}

        def call() -> dict:
            url = self._acquire_url(last_failed["url"])
            body = {
                "prompt": prompt_ids,
                "n": self.group_size,
                "max_tokens": self.max_tokens,
                "temperature": self.temperature,
            }
            if self.seeded:  # completion j of the request draws from seed + j
                body["seed"] = (self.seed * 7919 + prompt_index * self.group_size) % 2**31
            ok = False
            try:
                r = self._client.post(f"{url}/v1/completions", json=body)
                if r.status_code in RETRY_STATUS:
                    raise Retryable(f"{url} answered {r.status_code}")
                ok = True  # a 4xx is our request's fault, not the worker's: no cooldown for it
            finally:
                self._release_url(url, failed=not ok)
                last_failed["url"] = None if ok else url
            if r.status_code in REFUSED_STATUS:
                raise Refused(f"{url} answered {r.status_code}: {_error_message(r)}")
            r.raise_for_status()
            return r.json()

        with self._slots:
            retry = retrying(self.stop, self.retry_seconds, (Retryable, httpx.TransportError), "rollout request")
            return retry(call)

    def _complete_or_refused(self, prompt_ids: list[int], prompt_index: int) -> dict | Refused:
        try:
            return self.complete(prompt_ids, prompt_index)
        except Refused as e:
            return e

    def _start(self, position: int) -> tuple[int, list, list[Future]]:
        prompts = [self.task.prompt(position + i) for i in range(self.batch_size)]
        return position, prompts, [in_daemon_thread(self._complete_or_refused, p.ids, p.index) for p in prompts]

    def next_batch(self, step: int) -> Batch:
        """The next batch's scored groups. A prompt a worker refuses (4xx: e.g. longer than the context with
        `max_tokens`) is skipped, logged and counted (`refused_prompts`); a batch whose prompts were all refused is
        replaced by the next one, up to `MAX_REFUSED` refused prompts in a row (then RuntimeError: the job's data
        or settings are wrong, not one row)."""
        refused = 0
        while True:
            batch = self._next_batch(step)
            refused += batch.info["metrics"]["refused_prompts"]
            if batch.groups:
                batch.info["metrics"]["refused_prompts"] = refused
                return batch
            if refused >= self.MAX_REFUSED:
                raise RuntimeError(f"the workers refused {refused} prompts in a row; the last: {batch.info['refused']}")

    def _next_batch(self, step: int) -> Batch:
        start, prompts, futures = self._ahead.popleft() if self._ahead else self._start(self.position)
        while len(self._ahead) < self.depth and (self.steps is None or step + len(self._ahead) < self.steps):
            j = len(self._ahead) + 1  # trained j steps after this batch
            if self.ready is not None and not self.ready(j):
                raise Stopped(f"stopped while waiting to start the rollouts of step {step + j}")
            self._ahead.append(self._start(start + j * self.batch_size))
        wait_unless_stopped(futures, self.stop, f"the rollouts of step {step}")
        responses, refused = [], []
        for p, fut in zip(prompts, futures):
            if isinstance(fut.result(), Refused):
                row = f" (row {self.task.row_index(p.index) + 1})" if hasattr(self.task, "row_index") else ""
                log.warning("prompt %d%s skipped: %s", p.index, row, fut.result())
                refused.append(f"prompt {p.index}{row}: {fut.result()}")
            else:
                responses.append((p, fut.result()))
        rewards, reward_errors = score(self.task, [(p, c) for p, r in responses for c in choices(r)])
        rewards = iter(rewards)
        groups = []
        for p, resp in responses:
            group = []
            for choice in choices(resp):
                ids = choice["token_ids"]
                reward = next(rewards)
                pv = choice.get("policy_versions") or []
                version = min(pv) if pv else resp.get("policy_version")
                versions = pv if len(pv) == len(ids) else None
                group.append(
                    Sample.from_completion(p.ids, ids, reward, choice.get("token_logprobs"), version, versions)
                )
            groups.append(group)
        self.position = start + self.batch_size
        batch = Batch(groups=groups, info={"source": "builtin", "task": self.task.name, "prompt_index": start})
        batch.info["metrics"] = {"prompt_index": start, "refused_prompts": len(refused)}  # added to the step's
        if refused:
            batch.info["refused"] = refused[-1]
        if reward_errors is not None:
            batch.info["metrics"]["reward_errors"] = reward_errors
        if self.recorder and batch.groups:
            self.recorder.write(batch)
        return batch

    def state(self) -> dict:
        return {"type": "builtin", "task": self.task.name, "position": self.position}

    def load_state(self, d: dict) -> None:
        self.position = int(d.get("position", 0))
        self._ahead.clear()  # started from another position: abandoned

    def close(self) -> None:
        self._ahead.clear()
        self._client.close()


def _error_message(r: httpx.Response) -> str:
    """The message of an OpenAI-shaped error body, else the start of the body."""
    try:
        return str(r.json()["error"]["message"])
    except (ValueError, KeyError, TypeError):
        return r.text[:200]
