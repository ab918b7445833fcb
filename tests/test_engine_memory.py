"""The generation engine's KV cache holds what its batch needs: max_batch sequences x (the longest one + KV_STEP)
positions, not mlx-lm's 256-position chunks per sequence."""

from __future__ import annotations

import time

from workers.generation.engine import KV_STEP, SamplingParams


def test_kv_cache_grows_with_the_longest_sequence_not_in_256_chunks(tiny_engine):
    capacities: list[int] = []

    def measure(elapsed: float, tokens: int) -> None:  # on the model thread, between decode steps
        batch = tiny_engine._generator._generation_batch
        capacities.extend(c.keys.shape[2] for c in batch.prompt_cache if getattr(c, "keys", None) is not None)

    tiny_engine.on_step = measure
    tiny_engine.start()
    prompt, max_tokens = list(range(3, 23)), 40
    reqs = [
        tiny_engine.submit(prompt, SamplingParams(max_tokens=max_tokens, temperature=1.0, seed=i), n=4)
        for i in range(2)
    ]
    deadline = time.monotonic() + 120
    while not all(c.finish_reason for r in reqs for c in r.completions):
        assert time.monotonic() < deadline, "generation did not finish"
        time.sleep(0.05)
    longest = len(prompt) + max_tokens
    assert capacities, "no decode step was observed"
    assert max(capacities) <= longest + KV_STEP < 256
