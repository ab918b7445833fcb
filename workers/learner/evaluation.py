"""Evaluation during training (`[eval]`): a held-out dataset, sent through the generation workers every `every` steps
and at the end (and before the first step with `at_start`), scored with the `[source]` reward functions.

It runs in a background thread, so training goes on meanwhile: the learner only starts it after publishing a version.
It first waits (polling the coordinator's status, at most `VERSION_WAIT` seconds) until every serving worker serves
that version, then sends each example once with n = `pass_k` at `[eval] temperature` (0 = greedy) and
`[learner] max_tokens`, at most `[learner] batch_size` requests at once. One eval at a time: one that comes due while
the previous still runs is skipped (logged). The final one runs after the last step, and the learner waits for it.

An eval row in metrics.jsonl: `step`, `version` (the oldest version that answered), `eval_reward` (mean weighted
reward over all completions), `eval_accuracy` (pass@1: the share of examples whose first completion scores
>= `[eval] threshold` with the first reward function), `eval_pass_at_k` (k > 1: the share with at least one such
completion among k), `eval_examples`, `eval_reward_errors`, `eval_s` (wall time).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

import numpy as np

from runner.config import Config
from workers.learner.sources.base import Stopped, in_daemon_thread, wait_unless_stopped
from workers.learner.sources.builtin import BuiltinSource, choices
from workers.learner.sources.dataset import DatasetTask, make_dataset_task

log = logging.getLogger(__name__)

VERSION_WAIT = 60.0


class Evaluator:
    def __init__(
        self,
        task: DatasetTask,
        client: BuiltinSource,
        config: Config,
        serving_version: Callable[[], int | None],
        report: Callable[[dict], None],
        write: Callable[[dict], None],
    ):
        self.task, self.client, self.serving_version, self.report = task, client, serving_version, report
        self.write = write  # the learner's metrics sink (metrics.jsonl and the trackers)
        self.every, self.steps = config.eval.every, config.learner.steps
        self.pass_k, self.threshold, self.at_start = config.eval.pass_k, config.eval.threshold, config.eval.at_start
        self._thread: threading.Thread | None = None
        self.last_step: int | None = None  # the step of the last eval row written

    def started(self, step: int, version: int) -> None:
        """Training starts (or resumes) at `step`, `version`: evaluate it in the background if `at_start` asks."""
        if self.at_start and step < self.steps:
            self._start(step, version)

    def step_done(self, step: int, version: int) -> None:
        """After step `step` published `version`: start an eval in the background if one is due."""
        if self.every and step % self.every == 0 and step < self.steps:  # the last step's eval is `finish`'s
            self._start(step, version)

    def _start(self, step: int, version: int) -> None:
        if self._thread is not None and self._thread.is_alive():
            log.warning("the evaluation started earlier still runs; skipping the one of step %d", step)
            return
        self._thread = threading.Thread(target=self._run, args=(step, version), name="eval", daemon=True)
        self._thread.start()

    def finish(self, step: int, version: int) -> None:
        """At the end of training: wait for a running eval, then evaluate the final version (unless just done)."""
        if self._thread is not None:
            self._thread.join()
        if self.last_step != step:
            self._run(step, version)

    def _run(self, step: int, version: int) -> None:
        try:
            row = self.evaluate(step, version)
        except Stopped:
            return
        except Exception:  # an eval must never stop training
            log.exception("the evaluation of step %d failed", step)
            return
        self.write(row)
        self.last_step = step
        log.info(
            "eval at step %d (v%d): reward %.4f accuracy %.3f%s in %.1fs",
            step,
            row["version"],
            row["eval_reward"],
            row["eval_accuracy"],
            f" pass@{self.pass_k} {row['eval_pass_at_k']:.3f}" if self.pass_k > 1 else "",
            row["eval_s"],
        )
        self.report(row)

    def evaluate(self, step: int, version: int) -> dict:
        tic = time.perf_counter()
        deadline = time.monotonic() + VERSION_WAIT
        while (self.serving_version() or 0) < version and time.monotonic() < deadline:
            if self.client.stop.wait(0.1):
                raise Stopped("stopped while the evaluation waited for the workers' version")
        prompts = [self.task.prompt(i) for i in range(len(self.task.rows))]
        futures = [in_daemon_thread(self.client.complete, p.ids, p.index) for p in prompts]
        wait_unless_stopped(futures, self.client.stop, f"the evaluation of step {step}")
        responses = [f.result() for f in futures]
        items = [(p, c.get("text", "")) for p, r in zip(prompts, responses) for c in choices(r)]
        scored = self.task.score_items(items)
        k = len(choices(responses[0]))
        correct = np.array([parts[0] >= self.threshold for parts in scored.parts]).reshape(len(prompts), k)
        row = {
            "step": step,
            "version": min(r.get("policy_version", version) for r in responses),
            "eval_reward": float(np.mean(scored.totals)),
            "eval_accuracy": float(correct[:, 0].mean()),
            "eval_examples": len(prompts),
            "eval_reward_errors": scored.errors,
            "eval_s": time.perf_counter() - tic,
        }
        if self.pass_k > 1:
            row["eval_pass_at_k"] = float(correct.any(axis=1).mean())
        return row

    def close(self) -> None:
        self.client.close()


def make_evaluator(
    config: Config,
    urls: Callable[[], list[str]],
    tokenizer,
    stop: threading.Event,
    serving_version: Callable[[], int | None],
    report: Callable[[dict], None],
    write: Callable[[dict], None],
) -> Evaluator | None:
    """The `[eval]` of a job config, or None when it has none."""
    if not config.eval.path:
        return None
    lc, ec = config.learner, config.eval
    task = make_dataset_task(config, tokenizer, evaluation=True)
    client = BuiltinSource(
        task,
        urls,
        ec.pass_k,
        lc.batch_size,  # at most this many eval requests at once
        lc.max_tokens,
        ec.temperature,
        lc.seed,
        api_token=config.security.api_token,
        stop=stop,
    )
    return Evaluator(task, client, config, serving_version, report, write)
