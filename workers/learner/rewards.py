"""Reward functions for the dataset task: built-ins, loading by import path, and scoring with a per-call timeout.

A reward function is called with keywords `fn(completion=str, answer=Any, prompt=str, example=dict) -> float`
(a plain function or `async def`). `example` is the whole dataset row, so metadata reaches the function. The
built-ins take what they do not use as `**_`.

`Rewards.score` calls every function on every completion at once, each in a thread of its own, and gives each call
`timeout` seconds from its start. A call that raises, returns something that is not a finite number, or is still
running at its deadline scores 0 for that completion, is counted (`Scored.errors`, the step's `reward_errors`) and
logged; the job goes on. A call that hangs cannot be killed from Python: its daemon thread is abandoned and ends
with the process.
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
import time
from collections.abc import Callable
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

    @classmethod
    def from_config(cls, config: SourceConfig) -> Rewards:
        functions = [load_reward(name, config) for name in config.rewards]
        weights = list(config.reward_weights) or [1.0] * len(functions)
        return cls(config.rewards, functions, weights, config.reward_timeout)

    def score(self, items: list[dict]) -> Scored:
        """Score each item (keywords `completion`, `answer`, `prompt`, `example`) with every function, concurrently."""
        from workers.learner.sources import in_daemon_thread  # here: `runner launch` checks rewards without MLX

        # Each call in a daemon thread of its own: one that hangs must not keep the process alive at exit.
        calls = [[(time.monotonic(), in_daemon_thread(_call, fn, item)) for fn in self.functions] for item in items]
        parts, failures = [], {}
        for row in calls:
            scores = []
            for name, (started, fut) in zip(self.names, row):
                try:
                    value = float(fut.result(timeout=max(0.0, started + self.timeout - time.monotonic())))
                    if not math.isfinite(value):
                        raise ValueError(f"returned {value}")
                except TimeoutError:
                    failures.setdefault(name, []).append(f"no answer within {self.timeout:g}s")
                    value = 0.0
                except Exception as e:
                    failures.setdefault(name, []).append(f"{type(e).__name__}: {e}")
                    value = 0.0
                scores.append(value)
            parts.append(scores)
        for name, why in failures.items():
            log.warning(
                "reward %s failed on %d of %d completion(s) (scored 0); first: %s", name, len(why), len(items), why[0]
            )
        totals = [sum(w * s for w, s in zip(self.weights, scores)) for scores in parts]
        return Scored(parts, totals, sum(len(why) for why in failures.values()))


def _call(fn: Callable, kwargs: dict) -> Any:
    result = fn(**kwargs)
    if inspect.isawaitable(result):  # `async def` (or a function returning an awaitable): run it to the end here
        result = asyncio.run(_awaited(result))
    return result


async def _awaited(awaitable) -> Any:
    return await awaitable
