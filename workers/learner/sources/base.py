"""What every source shares: `Sample`, `Batch`, the `Source` interface, recording, the retry and wait helpers, and
`FreshSource` (see the package doc)."""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Callable
from concurrent.futures import FIRST_EXCEPTION, Future, wait
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Protocol

import tenacity

log = logging.getLogger(__name__)


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


class UnversionedSample(ValueError):
    """A trained sample that says no adapter version: how stale it is cannot be checked, so it is not trained on."""


def require_versions(batch: Batch) -> None:
    """Raise UnversionedSample if a sample with trained tokens has no `version` (the staleness check needs one)."""
    missing = [
        (g, i) for g, group in enumerate(batch.groups) for i, s in enumerate(group) if s.version is None and any(s.mask)
    ]
    if missing:
        g, i = missing[0]
        raise UnversionedSample(
            f"{len(missing)} sample(s) of the batch (the first: group {g}, sample {i}) carry no policy version, so "
            "their staleness cannot be checked against [learner] max_staleness: refusing the batch. The generation "
            "workers stamp every rollout with the adapter version that sampled it; an Atropos environment must pass "
            "it on as ScoredData overrides[i].policy_version (the `policy_version` of the worker's reply)"
        )


class FreshSource:
    """A source minus batches the trainer could not use: when every group has a sample older than `min_version()`
    (Trainer.step would drop them all and raise StaleBatch), the batch is dropped with a log line, `wait(version)`
    blocks until the generation workers serve a recent enough version (False: a stop), and the next batch is drawn.
    The dropped prompts are skipped, as a dropped group is. A batch with an unversioned sample: UnversionedSample."""

    def __init__(self, source: Source, min_version: Callable[[], int], wait: Callable[[int], bool]):
        self.source, self.min_version, self.wait = source, min_version, wait
        self.dropped_batches = 0

    def next_batch(self, step: int) -> Batch:
        while True:
            batch = self.source.next_batch(step)
            require_versions(batch)
            limit = self.min_version()
            if any(all(s.version >= limit for s in g if any(s.mask)) for g in batch.groups):
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
