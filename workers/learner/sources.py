"""Where the learner's scored groups come from, behind one small interface.

    source.next_batch(step) -> Batch     # blocks until the batch for optimizer step `step` (1-based) is ready
    source.state() -> dict               # JSON-able position, saved in every checkpoint
    source.load_state(d)                 # resume at that position
    source.close()

A `Batch` is a list of groups; a group is the completions of one prompt (GRPO compares within a group). Every
`Sample` carries the whole sequence (`tokens` = prompt + completion) with a per-token `mask` (1 = trained), so
built-in rollouts and Atropos' multi-turn masks look the same to the trainer. `logprobs` are the sampling
log-probs per token, aligned with `tokens` (0 where unknown/untrained); `versions` the adapter version that sampled
each token (a sequence continues under a version installed while it is generated), aligned the same way.

Asynchronous rollouts (`[learner] async_depth` d > 0): `BuiltinSource.next_batch` keeps the rollouts of the next d
batches in flight while the learner trains the one it returns. Pacing rule: the batch that will be trained j steps
after the one being handed out (at learner version V + j, V = the learner's version now) starts only once every
serving worker serves a version >= V + j - max_staleness (the `ready(j)` hook; versions on a worker never go back),
so every token it gets is at most max_staleness versions old when trained. `AtroposSource` fetches the next d
batches in the background (one poll after another) while the learner trains.

Implementations:
- `BuiltinSource`: sends the task's prompts to the generation workers (`POST /v1/completions`, n = group size),
  scores the completions, optionally records every batch to JSONL.
- `AtroposSource`: registers with an Atropos API server and polls `GET /batch`.
- `ReplaySource`: replays batches recorded as JSONL (one batch per line) -- for exact-resume tests and debugging.
- `FreshSource`: wraps one of them; drops a batch that is stale as a whole and waits for fresh rollouts.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import FIRST_EXCEPTION, Future, wait
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

import httpx
import numpy as np
import tenacity

from runner.config import Config
from runner.routing import LeastLoaded
from workers.learner.dataset import make_dataset_task
from workers.learner.grpo import ATROPOS_PROMPT
from workers.learner.tasks import Task, make_task

log = logging.getLogger(__name__)


# ----------------------------------------------------------------------------------------------------------
# Data
# ----------------------------------------------------------------------------------------------------------


@dataclass
class Sample:
    tokens: list[int]  # prompt + completion
    mask: list[int]  # same length as tokens; 1 where the token is trained (the completion), 0 for the prompt
    reward: float
    logprobs: list[float] | None = None  # sampling log-prob of each token, aligned with tokens; None = unknown
    advantage: float | None = None  # supplied by the source (Atropos); None = computed from the group's rewards
    version: int | None = None  # adapter version that generated it (oldest, if it spans versions); None = unknown
    versions: list[int] | None = None  # adapter version of each token, aligned with tokens (-1 on the prompt)

    def __post_init__(self) -> None:
        if len(self.mask) != len(self.tokens):
            raise ValueError(f"mask has {len(self.mask)} entries for {len(self.tokens)} tokens")
        if self.logprobs is not None and len(self.logprobs) != len(self.tokens):
            raise ValueError(f"logprobs has {len(self.logprobs)} entries for {len(self.tokens)} tokens")
        if self.versions is not None and len(self.versions) != len(self.tokens):
            raise ValueError(f"versions has {len(self.versions)} entries for {len(self.tokens)} tokens")

    @classmethod
    def from_completion(
        cls,
        prompt_ids: list[int],
        completion_ids: list[int],
        reward: float,
        logprobs: list[float] | None = None,
        version: int | None = None,
        versions: list[int] | None = None,
    ) -> Sample:
        p, c = list(prompt_ids), list(completion_ids)
        lp = None if logprobs is None else [0.0] * len(p) + [float(x) for x in logprobs]
        vs = None if versions is None else [-1] * len(p) + [int(v) for v in versions]
        return cls(
            tokens=p + c,
            mask=[0] * len(p) + [1] * len(c),
            reward=float(reward),
            logprobs=lp,
            version=version,
            versions=vs,
        )


@dataclass
class Batch:
    groups: list[list[Sample]]
    info: dict = field(default_factory=dict)  # source-specific notes (e.g. prompt indices), not used in training

    @property
    def samples(self) -> list[Sample]:
        return [s for g in self.groups for s in g]

    def to_json(self) -> str:
        return json.dumps({"groups": [[asdict(s) for s in g] for g in self.groups], "info": self.info})

    @classmethod
    def from_json(cls, line: str) -> Batch:
        d = json.loads(line)
        return cls(groups=[[Sample(**s) for s in g] for g in d["groups"]], info=d.get("info", {}))


class Source(Protocol):
    def next_batch(self, step: int) -> Batch: ...

    def state(self) -> dict: ...

    def load_state(self, d: dict) -> None: ...

    def close(self) -> None: ...


class BatchRecorder:
    """Append batches to a JSONL file (flushed per line, so a killed run leaves whole lines)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)

    def write(self, batch: Batch) -> None:
        with open(self.path, "a") as f:
            f.write(batch.to_json() + "\n")


# ----------------------------------------------------------------------------------------------------------
# Replay
# ----------------------------------------------------------------------------------------------------------


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


# ----------------------------------------------------------------------------------------------------------
# Built-in task over the generation workers
# ----------------------------------------------------------------------------------------------------------

RETRY_STATUS = {429, 502, 503, 504}


class Retryable(Exception):
    pass


class Stopped(InterruptedError):
    """The learner was told to stop while the source waited; nothing is wrong (the caller checkpoints and exits)."""


def retrying(stop: threading.Event, seconds: float, retry_on: tuple, what: str) -> tenacity.Retrying:
    """Retry `retry_on` with backoff for up to `seconds`, or until `stop` is set (its backoff sleeps wake on it)."""
    return tenacity.Retrying(
        retry=tenacity.retry_if_exception_type(retry_on),
        wait=tenacity.wait_exponential(multiplier=0.2, max=5.0),
        stop=tenacity.stop_after_delay(seconds) | tenacity.stop_when_event_set(stop),
        sleep=stop.wait,
        before_sleep=lambda rs: log.warning("%s failed (%s); retrying", what, rs.outcome.exception()),
        reraise=True,
    )


def in_daemon_thread(fn: Callable, *args) -> Future:
    """Run `fn(*args)` in a daemon thread. Not a ThreadPoolExecutor: its threads are joined at interpreter exit, so a
    learner told to stop would wait for every in-flight rollout (minutes with a long max_tokens). A stopping learner
    abandons them instead; its exit closes their connections, and the workers cancel requests whose client went."""
    fut: Future = Future()

    def run() -> None:
        if fut.set_running_or_notify_cancel():
            try:
                fut.set_result(fn(*args))
            except BaseException as e:  # handed to whoever waits on the future
                fut.set_exception(e)

    threading.Thread(target=run, name="rollout", daemon=True).start()
    return fut


def wait_unless_stopped(futures: list[Future], stop: threading.Event, what: str) -> None:
    """Wait for every future (re-raising the first failure); raise Stopped as soon as `stop` is set."""
    pending = set(futures)
    while pending:
        done, pending = wait(pending, timeout=0.1, return_when=FIRST_EXCEPTION)
        if stop.is_set():  # also when a request gave up because of the stop
            raise Stopped(f"stopped while waiting for {what}")
        for f in done:
            if f.exception() is not None:
                raise f.exception()


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
            r.raise_for_status()
            return r.json()

        with self._slots:
            retry = retrying(self.stop, self.retry_seconds, (Retryable, httpx.TransportError), "rollout request")
            return retry(call)

    def _start(self, position: int) -> tuple[int, list, list[Future]]:
        prompts = [self.task.prompt(position + i) for i in range(self.batch_size)]
        return position, prompts, [in_daemon_thread(self.complete, p.ids, p.index) for p in prompts]

    def next_batch(self, step: int) -> Batch:
        start, prompts, futures = self._ahead.popleft() if self._ahead else self._start(self.position)
        while len(self._ahead) < self.depth and (self.steps is None or step + len(self._ahead) < self.steps):
            j = len(self._ahead) + 1  # trained j steps after this batch
            if self.ready is not None and not self.ready(j):
                raise Stopped(f"stopped while waiting to start the rollouts of step {step + j}")
            self._ahead.append(self._start(start + j * self.batch_size))
        wait_unless_stopped(futures, self.stop, f"the rollouts of step {step}")
        responses = [(p, fut.result()) for p, fut in zip(prompts, futures)]
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
        batch.info["metrics"] = {"prompt_index": start}  # the trainer adds these to the step's metrics
        if reward_errors is not None:
            batch.info["metrics"]["reward_errors"] = reward_errors
        if self.recorder:
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


# ----------------------------------------------------------------------------------------------------------
# Atropos
# ----------------------------------------------------------------------------------------------------------


def scored_data_to_group(item: dict) -> list[Sample]:
    """One Atropos ScoredData (a group) -> samples.

    masks: -100 at prompt positions, the token id where trained. inference_logprobs: 1.0 placeholders at prompt
    positions (the trainer ignores any value > 0). advantages are per token in Atropos; GRPO here takes one advantage
    per sequence, so it is the mean over the trained positions (environments normally send it constant).
    """
    tokens, masks, scores = item["tokens"], item["masks"], item["scores"]
    if not (len(tokens) == len(masks) == len(scores)):
        raise ValueError("ScoredData tokens, masks and scores differ in length")
    advs = item.get("advantages")
    lps = item.get("inference_logprobs")
    group = []
    for i, (toks, m, score) in enumerate(zip(tokens, masks, scores)):
        mask = [0 if v == ATROPOS_PROMPT else 1 for v in m]
        adv = None
        if advs is not None and advs[i] is not None:
            a = np.asarray(advs[i], dtype=np.float64)
            if a.size == 1:
                adv = float(a.reshape(-1)[0])
            else:
                trained = np.asarray(mask[: a.size], dtype=bool)
                vals = a[: len(mask)][trained] if trained.any() else a
                if vals.size and np.ptp(vals) > 1e-6:
                    log.warning("per-token advantages vary within a sequence; using their mean")
                adv = float(vals.mean()) if vals.size else 0.0
        lp = None
        if lps is not None and i < len(lps) and lps[i] is not None and len(lps[i]) == len(toks):
            lp = [float(x) for x in lps[i]]
        group.append(Sample(tokens=list(toks), mask=mask, reward=float(score), logprobs=lp, advantage=adv))
    return group


class AtroposSource:
    """Batches from an Atropos API server (`run-api`): `POST /register`, then `GET /batch` until it is not null.

    Atropos counts `batch_size` in sequences (not groups). A trainer that resumes registers with
    `starting_step` = the step it resumes at, so environments see the right step. With `depth` > 0 the next `depth`
    batches are fetched in the background, one after another, while the learner trains (a batch fetched but not
    trained when the learner stops is lost, as with any Atropos trainer; the API has handed it out).
    """

    def __init__(
        self,
        url: str,
        batch_size: int,
        max_token_len: int = 2048,
        starting_step: int = 0,
        num_steps: int = 1000,
        checkpoint_dir: str = "",
        save_checkpoint_interval: int = 0,
        wandb_group: str = "runner",
        wandb_project: str = "runner",
        poll_interval: float = 0.1,
        max_poll_interval: float = 2.0,
        wait_timeout: float | None = None,
        record: str | Path | None = None,
        stop: threading.Event | None = None,
        depth: int = 0,
    ):
        self.url = url.rstrip("/")
        self.depth = depth
        self._ahead: deque[Future] = deque()  # background fetches, oldest first; each polls after the one before
        self.registration = {
            "wandb_group": wandb_group,
            "wandb_project": wandb_project,
            "batch_size": int(batch_size),
            "max_token_len": int(max_token_len),
            "checkpoint_dir": str(checkpoint_dir),
            "save_checkpoint_interval": int(save_checkpoint_interval),
            "starting_step": int(starting_step),
            "num_steps": int(num_steps),
        }
        self.poll_interval, self.max_poll_interval = poll_interval, max_poll_interval
        self.wait_timeout = wait_timeout
        self.stop = stop or threading.Event()
        self.steps_done = int(starting_step)
        self.recorder = BatchRecorder(record) if record else None
        self._client = httpx.Client(timeout=httpx.Timeout(60.0, connect=5.0))
        self._registered = False

    def _request(self, method: str, path: str, **kw) -> Any:
        def call() -> Any:
            r = self._client.request(method, f"{self.url}{path}", **kw)
            r.raise_for_status()
            return r.json()

        try:
            return retrying(self.stop, 120, (httpx.TransportError,), f"Atropos {method} {path}")(call)
        except httpx.TransportError:
            if self.stop.is_set():
                raise Stopped(f"stopped while retrying Atropos {method} {path}") from None
            raise

    def register(self) -> None:
        body = dict(self.registration, starting_step=self.steps_done)
        uuid = self._request("POST", "/register", json=body).get("uuid")
        self._registered = True
        log.info("registered with Atropos at %s (trainer %s, starting step %d)", self.url, uuid, self.steps_done)

    def _fetch(self, after: Future | None = None) -> dict:
        """Poll GET /batch until it returns a batch (after the fetch `after` has, so batches keep their order)."""
        if after is not None:
            after.result()
        delay = self.poll_interval
        deadline = None if self.wait_timeout is None else time.monotonic() + self.wait_timeout
        while True:
            data = self._request("GET", "/batch")
            if data.get("status") == "error":  # the API restarted and forgot us
                log.warning("Atropos: %s; registering again", data.get("message"))
                self.register()
            elif data.get("batch") is not None:
                break
            if deadline is not None and time.monotonic() > deadline:
                raise TimeoutError(f"no batch from Atropos at {self.url} within {self.wait_timeout} s")
            if self.stop.wait(delay):
                raise Stopped("stopped while waiting for an Atropos batch")
            delay = min(delay * 1.5, self.max_poll_interval)
        return data

    def next_batch(self, step: int) -> Batch:
        if not self._registered:
            self.register()
        if self.depth == 0:
            data = self._fetch()
        else:
            fut = self._ahead.popleft() if self._ahead else in_daemon_thread(self._fetch)
            while len(self._ahead) < self.depth:
                self._ahead.append(in_daemon_thread(self._fetch, self._ahead[-1] if self._ahead else fut))
            wait_unless_stopped([fut], self.stop, "an Atropos batch")
            data = fut.result()
        groups = [scored_data_to_group(item) for item in data["batch"]]
        self.steps_done += 1
        batch = Batch(groups=groups, info={"source": "atropos", "env_ids": [i.get("env_id") for i in data["batch"]]})
        if self.recorder:
            self.recorder.write(batch)
        return batch

    def state(self) -> dict:
        return {"type": "atropos", "steps_done": self.steps_done}

    def load_state(self, d: dict) -> None:
        self.steps_done = int(d.get("steps_done", self.steps_done))

    def close(self) -> None:
        self._ahead.clear()
        self._client.close()


# ----------------------------------------------------------------------------------------------------------
# Freshness
# ----------------------------------------------------------------------------------------------------------


class FreshSource:
    """A source minus batches the trainer could not use: when every group has a sample older than `min_version()`
    (Trainer.step would drop them all and raise StaleBatch), the batch is dropped with a log line, `wait(version)`
    blocks until the generation workers serve a recent enough version (False: a stop), and the next batch is drawn.
    The dropped prompts are skipped, as a dropped group is."""

    def __init__(self, source: Source, min_version: Callable[[], int], wait: Callable[[int], bool]):
        self.source, self.min_version, self.wait = source, min_version, wait
        self.dropped_batches = 0

    def next_batch(self, step: int) -> Batch:
        while True:
            batch = self.source.next_batch(step)
            limit = self.min_version()
            if any(all(s.version is None or s.version >= limit for s in g) for g in batch.groups):
                return batch
            self.dropped_batches += 1
            log.warning(
                "every group of the batch for step %d is older than version %d; waiting for fresh rollouts", step, limit
            )
            if not self.wait(limit):
                raise Stopped("stopped while waiting for fresh rollouts")

    def state(self) -> dict:
        return self.source.state()

    def load_state(self, d: dict) -> None:
        self.source.load_state(d)

    def close(self) -> None:
        self.source.close()


# ----------------------------------------------------------------------------------------------------------
# Factory
# ----------------------------------------------------------------------------------------------------------


def make_source(
    config: Config,
    urls: Callable[[], list[str]] | None = None,
    tokenizer=None,
    stop: threading.Event | None = None,
    ready: Callable[[int], bool] | None = None,
) -> Source:
    """The source a job config asks for. `urls` returns the generation workers' base URLs (builtin source);
    `tokenizer` is needed for built-in tasks (the trainer's); once `stop` is set, a wait for rollouts or for an
    Atropos batch ends at once with `Stopped`; `ready(j)` paces the rollouts started ahead (`[learner] async_depth`,
    module doc). Where a resumed source starts comes from the checkpoint (`load_state`)."""
    lc, sc = config.learner, config.source
    if sc.type in ("builtin", "dataset"):
        if urls is None or tokenizer is None:
            raise ValueError(f"the {sc.type} source needs the generation workers' URLs and the tokenizer")
        if sc.type == "dataset":
            task = make_dataset_task(config, tokenizer)
        else:
            task = make_task(sc.task, tokenizer, lc.max_tokens, seed=lc.seed)
        return BuiltinSource(
            task,
            urls,
            lc.group_size,
            lc.batch_size,
            lc.max_tokens,
            lc.temperature,
            lc.seed,
            api_token=config.security.api_token,
            stop=stop,
            depth=lc.async_depth,
            ready=ready,
            steps=lc.steps,
        )
    if sc.type == "atropos":
        if not sc.url:
            raise ValueError("source.url must name the Atropos API server (e.g. http://127.0.0.1:8000)")
        return AtroposSource(
            sc.url,
            batch_size=lc.batch_size * lc.group_size,
            num_steps=lc.steps,
            checkpoint_dir=str(Path(config.checkpoint.dir) / "checkpoints"),
            save_checkpoint_interval=config.checkpoint.interval,
            stop=stop,
            depth=lc.async_depth,
        )
    if sc.type == "verifiers":
        if urls is None:
            raise ValueError("the verifiers source needs the generation workers' URLs")
        from workers.learner.verifiers_source import VerifiersSource  # imports verifiers only when asked for

        return VerifiersSource(
            sc.environment,
            urls,
            lc.group_size,
            lc.batch_size,
            lc.max_tokens,
            lc.temperature,
            api_token=config.security.api_token,
            stop=stop,
        )
    raise ValueError(f"unknown source type {sc.type!r}")
