"""Reward functions for the dataset task: built-ins, loading by import path, and scoring in a bounded pool with a
per-call timeout.

A reward function is called with keywords `fn(completion=str, answer=Any, prompt=str, example=dict) -> float`
(a plain function or `async def`). `example` is the whole dataset row, so metadata reaches the function. The
built-ins take what they do not use as `**_`.

`Rewards.score` runs the calls (every function on every completion) on at most `POOL_SIZE` daemon threads at once
and gives each call `timeout` seconds from its start. A call that raises anything (`BaseException` included:
`SystemExit`, `KeyboardInterrupt`), returns something that is not a finite number, or is still running at its
deadline scores 0 for that completion, is counted (`Scored.errors`, the step's `reward_errors`) and logged; the job
goes on. Python cannot kill a thread, so a hung call is abandoned: its thread runs on, outside the pool, until the call
returns or the process ends. A function keeps at most `MAX_HUNG` calls running or abandoned; while that many of its
calls hang, its further calls are not started and score 0 (counted, logged) while the other functions run as before,
so the thread count stays at most POOL_SIZE + MAX_HUNG per function however long the job runs.

Threads, not processes: reward functions loaded from files (under a synthetic module name), closures and partials do
not all pickle, and a process pool pays a start and the user modules' imports per worker. The cost: a CPU-bound reward
written in Python runs one call at a time under the GIL; one that waits (an HTTP judge, a subprocess) overlaps.
"""

from __future__ import annotations

import asyncio
import importlib
import importlib.util
import inspect
import logging
import math
import os
import re
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import FIRST_COMPLETED, Future, wait
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

from runner.config import ConfigError, SourceConfig

log = logging.getLogger(__name__)

BUILTINS = ("exact_answer", "numeric_answer", "regex_format", "length_penalty")

_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?|-?\.\d+")


def exact_answer(completion: str, answer: Any = None, **_) -> float:
    """1 when the completion, stripped, is the answer (as text), else 0."""
    return float(answer is not None and completion.strip() == str(answer).strip())


def last_number(text: str) -> float | None:
    """The last number in `text` (thousands separators allowed), or None."""
    found = _NUMBER.findall(text)
    return float(found[-1].replace(",", "")) if found else None


def numeric_answer(completion: str, answer: Any = None, **_) -> float:
    """1 when the last number of the completion equals the answer numerically, else 0."""
    got = last_number(completion)
    want = last_number(str(answer)) if answer is not None else None
    return float(got is not None and want is not None and math.isclose(got, want, rel_tol=1e-9, abs_tol=1e-9))


def regex_format(completion: str, pattern: re.Pattern, **_) -> float:
    """1 when the pattern (`[source] format_pattern`) is found in the completion, else 0."""
    return float(pattern.search(completion) is not None)


def length_penalty(completion: str, limit: int, **_) -> float:
    """-(characters / limit), down to -1 at `[source] length_limit` characters: give it a small positive weight."""
    return -min(1.0, len(completion) / limit)


def load_reward(name: str, config: SourceConfig) -> Callable:
    """The function a `[source] rewards` entry names: a built-in, "module:function" or "path/to/file.py:function".
    ConfigError when it cannot be found."""
    if name == "regex_format":
        if not config.format_pattern:
            raise ConfigError("the regex_format reward needs source.format_pattern (a regular expression)")
        try:
            return partial(regex_format, pattern=re.compile(config.format_pattern))
        except re.error as e:
            raise ConfigError(f"source.format_pattern {config.format_pattern!r} is not a valid regex ({e})") from None
    if name == "length_penalty":
        return partial(length_penalty, limit=config.length_limit)
    if name in BUILTINS:
        return globals()[name]
    module_name, sep, attr = name.rpartition(":")
    if not sep or not module_name or not attr:
        raise ConfigError(
            f"unknown reward {name!r}; expected a built-in ({', '.join(BUILTINS)}) or 'module:function' "
            "or 'path/to/file.py:function'"
        )
    try:
        module = _import(module_name)
    except Exception as e:
        raise ConfigError(f"reward {name!r}: cannot import {module_name!r} ({type(e).__name__}: {e})") from None
    fn = getattr(module, attr, None)
    if not callable(fn):
        raise ConfigError(f"reward {name!r}: {module_name!r} has no function {attr!r}")
    return fn


def _import(module_name: str):
    if module_name.endswith(".py"):
        path = Path(module_name).resolve()
        if not path.is_file():
            raise FileNotFoundError(f"no file {path}")
        spec = importlib.util.spec_from_file_location(f"runner_rewards_{path.stem}", path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module
    if os.getcwd() not in sys.path:  # a console script's sys.path lacks the working directory; `python -m` has it
        sys.path.append(os.getcwd())
    return importlib.import_module(module_name)


@dataclass
class Scored:
    parts: list[list[float]]  # per item, the score of each function (0 where the call failed)
    totals: list[float]  # per item, the weighted sum
    errors: int  # calls that raised, returned a non-number or timed out


class Rewards:
    """The weighted reward functions of a dataset task (`[source] rewards`, `reward_weights`, `reward_timeout`)."""

    def __init__(self, names: list[str], functions: list[Callable], weights: list[float], timeout: float):
        if len(weights) != len(functions):
            raise ConfigError(f"{len(weights)} reward weights for {len(functions)} reward functions")
        self.names, self.functions, self.weights, self.timeout = list(names), list(functions), list(weights), timeout
        self.pool = RewardPool()

    @classmethod
    def from_config(cls, config: SourceConfig) -> Rewards:
        functions = [load_reward(name, config) for name in config.rewards]
        weights = list(config.reward_weights) or [1.0] * len(functions)
        return cls(config.rewards, functions, weights, config.reward_timeout)

    def score(self, items: list[dict]) -> Scored:
        """Score each item (keywords `completion`, `answer`, `prompt`, `example`) with every function, in the pool."""
        calls = [(fn, item) for item in items for fn in self.functions]
        outcomes = iter(self.pool.run(calls, self.timeout))
        parts, failures = [], {}
        for _ in items:
            scores = []
            for name in self.names:
                value, error = next(outcomes)
                if error is not None:
                    failures.setdefault(name, []).append(error)
                    value = 0.0
                scores.append(value)
            parts.append(scores)
        for name, why in failures.items():
            log.warning(
                "reward %s failed on %d of %d completion(s) (scored 0); first: %s", name, len(why), len(items), why[0]
            )
        totals = [sum(w * s for w, s in zip(self.weights, scores)) for scores in parts]
        return Scored(parts, totals, sum(len(why) for why in failures.values()))


POOL_SIZE = 16  # reward calls running at once
MAX_HUNG = 16  # calls of one function running or abandoned (past their timeout, still running) at once


class RewardPool:
    """Runs reward calls on at most `size` daemon threads at once; abandons a call still running `timeout` seconds
    after it started. A function never has more than `max_hung` calls running or abandoned: while that many of its
    calls hang, its next calls are not started (they fail), and the other functions run as before. Threads: at most
    size + max_hung x functions, however long the job runs. Used from one thread at a time."""

    def __init__(self, size: int = POOL_SIZE, max_hung: int = MAX_HUNG):
        self.size, self.max_hung = size, max_hung
        self._hung: dict[Callable, set[Future]] = {}  # abandoned calls still running; each leaves when it returns
        self._lock = threading.Lock()

    def hung(self, fn: Callable | None = None) -> int:
        """Abandoned calls still running, of `fn` or of every function."""
        with self._lock:
            return sum(len(calls) for f, calls in self._hung.items() if fn is None or f is fn)

    def run(self, calls: list[tuple[Callable, dict]], timeout: float) -> list[tuple[float, str | None]]:
        """(score, None) or (0.0, why it failed) for each `fn(**kwargs)` of `calls`, in order."""
        results: list[tuple[float, str | None]] = [(0.0, "not run")] * len(calls)
        pending = list(range(len(calls)))
        running: dict[Future, tuple[int, float]] = {}  # call -> (its index, its deadline)
        while pending or running:
            waiting = []
            for i in pending:
                fn = calls[i][0]
                hung, busy = self.hung(fn), sum(calls[j][0] is fn for j, _ in running.values())
                if hung >= self.max_hung:
                    results[i] = (0.0, f"not started: {hung} earlier calls of it still hang")
                elif len(running) < self.size and hung + busy < self.max_hung:
                    running[_start(*calls[i])] = (i, time.monotonic() + timeout)
                else:
                    waiting.append(i)  # a slot frees up when a running call ends
            pending = waiting
            if not running:
                break
            soonest = min(deadline for _, deadline in running.values())
            wait(running, timeout=max(0.0, soonest - time.monotonic()), return_when=FIRST_COMPLETED)
            now = time.monotonic()
            for fut, (i, deadline) in list(running.items()):
                if fut.done():
                    results[i] = _outcome(fut)
                elif now >= deadline:
                    results[i] = (0.0, f"no answer within {timeout:g}s")
                    self._abandon(calls[i][0], fut)
                else:
                    continue
                del running[fut]
        return results

    def _abandon(self, fn: Callable, fut: Future) -> None:
        with self._lock:
            self._hung.setdefault(fn, set()).add(fut)
        fut.add_done_callback(lambda f: self._returned(fn, f))  # at once if it returned meanwhile

    def _returned(self, fn: Callable, fut: Future) -> None:
        with self._lock:
            self._hung[fn].discard(fut)


def _start(fn: Callable, kwargs: dict) -> Future:
    """`fn(**kwargs)` on a daemon thread of its own (a hung one must not keep the process alive at exit)."""
    fut: Future = Future()
    fut.set_running_or_notify_cancel()

    def run() -> None:
        try:
            result = fn(**kwargs)
            if inspect.isawaitable(result):  # `async def` (or a function returning an awaitable): run it here
                result = asyncio.run(_awaited(result))
            fut.set_result(result)
        except BaseException as e:  # user code: SystemExit and the like end this call, not the learner
            fut.set_exception(e)

    threading.Thread(target=run, name="reward", daemon=True).start()
    return fut


def _outcome(fut: Future) -> tuple[float, str | None]:
    error = fut.exception()
    if error is not None:
        return 0.0, f"{type(error).__name__}: {error}"
    try:
        value = float(fut.result())
    except Exception as e:
        return 0.0, f"returned a {type(fut.result()).__name__}, not a number ({e})"
    if not math.isfinite(value):
        return 0.0, f"returned {value}"
    return value, None


async def _awaited(awaitable) -> Any:
    return await awaitable
