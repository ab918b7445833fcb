"""Built-in tasks for the learner's own rollouts: a prompt generator and a reward function.

Prompts are a pure function of (seed, index), so a source only has to checkpoint the next index to resume exactly
where it stopped. Rewards look at the completion token ids (and the decoded text), never at the model.

- `target_tokens`: the quickstart task. Reward = fraction of the completion budget (`max_tokens`) spent on "number"
  tokens (every vocabulary entry whose text is only digits, e.g. '7', ' 42'). A random tiny model emits them ~12% of
  the time, so groups differ from the start and GRPO has a signal; dividing by the budget instead of the completion
  length means stopping early (EOS) is never a shortcut.
- `arithmetic`: "What is a+b?" through the chat template; reward 1 when the first integer of the answer is a+b, 0.1
  when the answer has an integer that is wrong (a small format signal for models that ramble), else 0. A restated
  question ("2 + 3 = 5", SmolLM2's style) is skipped before looking for the first integer.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

log = logging.getLogger(__name__)

TASKS = ("target_tokens", "arithmetic")

_TOPICS = (
    "the sun",
    "a red cat",
    "two dogs",
    "the moon",
    "green water",
    "a blue star",
    "my day",
    "the world",
    "new words",
    "three people",
    "a long way",
    "the first time",
    "good work",
    "the answer",
)


@dataclass(frozen=True)
class Prompt:
    index: int
    ids: list[int]
    text: str = ""
    answer: Any = None  # whatever the reward function needs (e.g. the expected sum)


class Task(Protocol):
    """A prompt generator and a reward. A task may also have `score([(prompt, completion_ids, text), ...])` returning
    (rewards, failed reward calls), to score a whole batch at once (the dataset task,
    workers/learner/sources/dataset.py)."""

    name: str

    def prompt(self, index: int) -> Prompt: ...

    def reward(self, prompt: Prompt, completion_ids: list[int], text: str) -> float: ...


def _rng(seed: int, index: int) -> np.random.Generator:
    # A generator per (seed, index): prompt i never depends on how many prompts were drawn before it.
    return np.random.default_rng([seed & 0xFFFFFFFF, index])


def _chat_ids(tokenizer, content: str) -> list[int]:
    messages = [{"role": "user", "content": content}]
    try:
        return list(tokenizer.apply_chat_template(messages, add_generation_prompt=True))
    except Exception:  # a tokenizer without a chat template: plain text prompt
        return list(tokenizer.encode(content + "\n"))


def number_token_ids(tokenizer) -> set[int]:
    """Ids of vocabulary entries whose text is only digits (optionally with surrounding spaces)."""
    vocab_size = len(tokenizer.vocab) if hasattr(tokenizer, "vocab") else tokenizer.vocab_size
    special = set(getattr(tokenizer, "all_special_ids", None) or [])
    ids = set()
    for i in range(vocab_size):
        if i in special:
            continue
        text = tokenizer.decode([i])
        if text.strip().isdigit() and text.strip().isascii():
            ids.add(i)
    if not ids:
        raise ValueError("the tokenizer has no digit tokens; the target_tokens task needs some")
    return ids


@dataclass
class TargetTokensTask:
    """Reward = (# completion tokens in `targets`) / max_tokens."""

    tokenizer: Any
    max_tokens: int
    seed: int = 0
    targets: set[int] = field(default_factory=set)
    name: str = "target_tokens"

    def __post_init__(self) -> None:
        if not self.targets:
            self.targets = number_token_ids(self.tokenizer)

    def prompt(self, index: int) -> Prompt:
        rng = _rng(self.seed, index)
        topic = _TOPICS[int(rng.integers(len(_TOPICS)))]
        n = int(rng.integers(2, 10))
        text = f"Write about {topic} in {n} words."
        return Prompt(index=index, ids=_chat_ids(self.tokenizer, text), text=text)

    def reward(self, prompt: Prompt, completion_ids: list[int], text: str) -> float:
        hits = sum(1 for t in completion_ids if t in self.targets)
        return min(1.0, hits / self.max_tokens)


_INT = re.compile(r"-?\d+")


@dataclass
class ArithmeticTask:
    """'What is a+b?' with a, b in [0, max_operand]; reward on the first integer of the answer."""

    tokenizer: Any
    seed: int = 0
    max_operand: int = 50
    name: str = "arithmetic"

    def prompt(self, index: int) -> Prompt:
        rng = _rng(self.seed, index)
        a, b = (int(x) for x in rng.integers(0, self.max_operand + 1, size=2))
        text = f"What is {a}+{b}?"
        return Prompt(index=index, ids=_chat_ids(self.tokenizer, text), text=text, answer=a + b)

    def reward(self, prompt: Prompt, completion_ids: list[int], text: str) -> float:
        a, b = prompt.text.removeprefix("What is ").removesuffix("?").split("+")
        text = re.sub(rf"(?<!\d){a}\s*\+\s*{b}(?!\d)", " ", text)  # "2 + 3 = 5": the operands are not the answer
        m = _INT.search(text)
        if m is None:
            return 0.0
        return 1.0 if int(m.group()) == prompt.answer else 0.1


def make_task(name: str, tokenizer, max_tokens: int, seed: int = 0) -> Task:
    """Build a built-in task by its config name."""
    if name == "target_tokens":
        return TargetTokensTask(tokenizer, max_tokens=max_tokens, seed=seed)
    if name == "arithmetic":
        return ArithmeticTask(tokenizer, seed=seed)
    raise ValueError(f"unknown task {name!r}; expected one of {', '.join(TASKS)}")
