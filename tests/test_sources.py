"""Learner sources around the trainer: a batch stale as a whole is dropped and waited out (no StaleBatch crash), and
a stop ends a wait for rollouts at once."""

from __future__ import annotations

import logging
import threading

import pytest

from workers.learner.sources.base import Batch, FreshSource, Sample, Stopped
from workers.learner.sources.builtin import BuiltinSource
from workers.learner.sources.replay import ReplaySource


def batch(*versions: int) -> Batch:
    """One group per version, two samples each."""
    return Batch(
        groups=[
            [Sample([1, 2, 3], [0, 1, 1], 1.0, version=v), Sample([1, 2], [0, 1], 0.0, version=v)] for v in versions
        ]
    )


def test_a_batch_stale_as_a_whole_is_dropped_and_waited_out(tmp_path, caplog):
    """Trainer.step would raise StaleBatch on the first batch (every group older than version 4): FreshSource drops
    it with a log line, waits for the workers, and hands out the next batch (one group fresh enough is enough)."""
    path = tmp_path / "batches.jsonl"
    path.write_text("".join(b.to_json() + "\n" for b in (batch(1, 2), batch(2, 5), batch(6))))
    waits: list[int] = []
    source = FreshSource(ReplaySource(path), min_version=lambda: 4, wait=lambda v: waits.append(v) or True)
    with caplog.at_level(logging.WARNING):
        got = source.next_batch(1)
    assert [g[0].version for g in got.groups] == [2, 5] and waits == [4] and source.dropped_batches == 1
    assert "waiting for fresh rollouts" in caplog.text
    assert source.state() == {"type": "replay", "position": 2}  # the dropped batch's prompts are skipped
    stopped = FreshSource(ReplaySource(path), min_version=lambda: 10, wait=lambda v: False)
    with pytest.raises(Stopped):
        stopped.next_batch(1)


def test_a_stop_ends_the_wait_for_rollouts_at_once(tiny_model):
    """No worker answers (none is up): the rollout requests retry for minutes, but setting the stop event makes
    next_batch raise Stopped right away."""
    from mlx_lm.utils import load_tokenizer

    from workers.learner.tasks import make_task

    task = make_task("target_tokens", load_tokenizer(tiny_model), 16)
    stop = threading.Event()
    source = BuiltinSource(task, lambda: [], group_size=2, batch_size=2, max_tokens=16, retry_seconds=600, stop=stop)
    threading.Timer(0.5, stop.set).start()
    try:
        with pytest.raises(Stopped, match="rollouts of step 1"):
            source.next_batch(1)
    finally:
        source.close()
