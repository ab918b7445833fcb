"""Reward functions for configs/dataset.toml (named there as "examples/tiny_arith/rewards.py:digit_share").

A reward function gets keywords `completion`, `answer`, `prompt` and `example` (the whole JSONL row) and returns a
number; `async def` works too.
"""


def digit_share(completion: str, **_) -> float:
    """The share of the completion's non-space characters that are digits: a shaping reward for answering with a
    number, which a tiny random model can learn before it gets any sum right."""
    chars = [c for c in completion if not c.isspace()]
    return sum(c.isdigit() for c in chars) / len(chars) if chars else 0.0
