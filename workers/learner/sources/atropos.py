"""`AtroposSource`: scored groups from an Atropos API server (`run-api`)."""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import httpx
import numpy as np

from workers.learner.grpo import ATROPOS_PROMPT
from workers.learner.sources.base import (
    Batch,
    BatchRecorder,
    Sample,
    Stopped,
    in_daemon_thread,
    retrying,
    wait_unless_stopped,
)

log = logging.getLogger(__name__)


def scored_data_to_group(item: dict) -> list[Sample]:
    """One Atropos ScoredData (a group) -> samples.

    masks: -100 at prompt positions, the token id where trained. inference_logprobs: 1.0 placeholders at prompt
    positions (the trainer ignores any value > 0). advantages are per token in Atropos; GRPO here takes one advantage
    per sequence, so it is the mean over the trained positions (environments normally send it constant).
    The adapter version that sampled a sequence (the `policy_version` of the generation worker's reply) comes from
    `overrides[i]["policy_version"]`, else `group_overrides["policy_version"]`; ScoredData has no field of its own
    for it, and the trainer refuses a sample without one (its staleness could not be checked).
    """
    tokens, masks, scores = item["tokens"], item["masks"], item["scores"]
    if not (len(tokens) == len(masks) == len(scores)):
        raise ValueError("ScoredData tokens, masks and scores differ in length")
    advs = item.get("advantages")
    lps = item.get("inference_logprobs")
    overrides = item.get("overrides") or []
    group_version = (item.get("group_overrides") or {}).get("policy_version")
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
        own = overrides[i] if i < len(overrides) and isinstance(overrides[i], dict) else {}
        version = own.get("policy_version", group_version)
        version = None if version is None else int(version)
        group.append(
            Sample(tokens=list(toks), mask=mask, reward=float(score), logprobs=lp, advantage=adv, version=version)
        )
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
