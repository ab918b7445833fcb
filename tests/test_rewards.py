"""The reward pool (workers/learner/rewards.py) driven with real functions: a reward that hangs on every call and one
that raises SystemExit score 0 and are counted, the thread count stays bounded step after step, and the caller (the
learner's thread) goes on."""

from __future__ import annotations

import threading
import time

from workers.learner.rewards import MAX_HUNG, POOL_SIZE, Rewards

release = threading.Event()  # lets the hung calls return at the end of the test


def hangs(completion, **_):
    release.wait(120)
    return 1.0


def exits(completion, **_):
    raise SystemExit(3)


def interrupts(completion, **_):
    raise KeyboardInterrupt


def length(completion, **_):
    return len(completion)


def test_hanging_and_exiting_rewards_score_0_are_counted_and_threads_stay_bounded(caplog):
    rewards = Rewards(["len", "hangs", "exits", "interrupts"], [length, hangs, exits, interrupts], [1, 1, 1, 1], 0.2)
    items = [{"completion": "x" * (i + 1), "answer": None, "prompt": "p", "example": {}} for i in range(8)]
    before = threading.active_count()
    peak, steps = before, 6
    try:
        for _ in range(steps):  # 8 hung calls a step: `hangs` reaches MAX_HUNG after two steps
            scored = rewards.score(items)
            peak = max(peak, threading.active_count())
            assert scored.errors == 3 * len(items)  # hangs, exits and interrupts, every completion
            assert scored.totals == [float(i + 1) for i in range(8)]  # `len` ran every time
        assert rewards.pool.hung(hangs) == rewards.pool.hung() == MAX_HUNG
        assert peak - before <= POOL_SIZE + MAX_HUNG, (before, peak)
        text = caplog.text
        assert "reward exits failed on 8 of 8" in text and "SystemExit: 3" in text
        assert "reward interrupts failed on 8 of 8" in text and "KeyboardInterrupt" in text
        assert f"not started: {MAX_HUNG} earlier calls of it still hang" in text  # no more threads for `hangs`
    finally:
        release.set()
    deadline = time.monotonic() + 10
    while rewards.pool.hung() and time.monotonic() < deadline:  # the abandoned calls returned: room again
        time.sleep(0.05)
    assert rewards.pool.hung() == 0
    scored = rewards.score(items[:1])
    assert scored.parts == [[1.0, 1.0, 0.0, 0.0]] and scored.errors == 2
    print(f"{steps} steps of {len(items)} completions; threads {before} before, {peak} at most")
