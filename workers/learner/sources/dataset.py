"""The dataset task: prompts (and optional answers and metadata) from a JSONL file or a Hugging Face `datasets` set,
scored by weighted reward functions (workers/learner/rewards.py).

A row is `{"prompt": "What is 12+7?", "answer": "19", ...}`: `prompt` a string, or `messages` a list of chat
messages instead; `answer` optional; every other key is metadata, passed to the reward functions with the whole row
(`example`). `path` is a JSONL file; a directory (written by `Dataset.save_to_disk`, or holding parquet/JSON/CSV
files that `datasets.load_dataset` reads); or a dataset id on the hub (its `split`; offline with HF_HUB_OFFLINE=1,
from the `datasets` cache or else the repo's files in the huggingface_hub cache).

`DatasetTask` is a `Task` (workers/learner/tasks.py), so `BuiltinSource` serves it unchanged (pipelining, pacing,
versions, log-probs): prompt i is row order[i mod n] of epoch i // n, where order is the identity or, with `shuffle`,
a permutation drawn from (seed, epoch). Prompt i is a pure function of i, so the source's checkpointed position
resumes at the exact next prompt.

Checked before a job starts (`runner check`, `runner launch`): `check_dataset_config` (the rows load, every row has a
prompt, the reward functions import) and `check_prompts_fit` (every prompt fits the model's context with
`[learner] max_tokens`, else the rows that do not, by number). A prompt that gets past it (the model was not on this
machine at the check) is refused by the worker and skipped by the source (workers.learner.sources.builtin).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from runner.config import Config, ConfigError
from runner.hub import ModelNotFound, resolve_model
from workers.learner.rewards import Rewards, Scored
from workers.learner.tasks import Prompt

log = logging.getLogger(__name__)


def load_examples(path: str, split: str, key: str = "source.path", limit: int | None = None) -> list[dict]:
    """The rows of a JSONL file or a `datasets` set, validated; ConfigError naming the file and line otherwise."""
    p = Path(path)
    if p.is_file():
        rows, where = _read_jsonl(p), str(p)
    elif p.suffix in (".jsonl", ".json") or (not p.exists() and path.startswith((".", "/", "~"))):
        raise ConfigError(f"{key} = {path!r}: no such file")
    else:
        rows, where = _load_datasets(path, split, key), f"{path} (split {split!r})"
    if limit is not None:
        rows = rows[:limit]
    if not rows:
        raise ConfigError(f"{key} = {path!r}: no examples in {where}")
    for i, row in enumerate(rows, 1):
        _check_row(row, f"{where}: row {i}")
    return rows


def _read_jsonl(path: Path) -> list[dict]:
    rows = []
    for lineno, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as e:
            raise ConfigError(f"{path}:{lineno}: not valid JSON ({e.msg}, column {e.colno})") from None
    return rows


def _load_datasets(path: str, split: str, key: str) -> list[dict]:
    try:
        import datasets
    except ImportError:
        raise ConfigError(f"{key} = {path!r} is not a file, and the `datasets` package is not installed") from None
    p = Path(path)
    try:
        if (p / "dataset_dict.json").is_file() or (p / "state.json").is_file():  # Dataset(Dict).save_to_disk
            data = datasets.load_from_disk(str(p))
            data = data[split] if isinstance(data, datasets.DatasetDict) else data
        else:
            data = datasets.load_dataset(path, split=split)
    except Exception as e:
        snapshot = None if p.exists() else _hub_snapshot(path)
        if snapshot is None:
            raise ConfigError(f"{key} = {path!r}: cannot load split {split!r} ({type(e).__name__}: {e})") from None
        log.info("%s: loading the copy in the hub cache, %s (%s)", path, snapshot, e)
        return _load_datasets(snapshot, split, key)
    return [dict(row) for row in data]


def _hub_snapshot(repo_id: str) -> str | None:
    """The dataset repo's files in the huggingface_hub cache (offline, `datasets` finds only what it has converted
    itself), or None."""
    from huggingface_hub import snapshot_download

    try:
        return snapshot_download(repo_id, repo_type="dataset", local_files_only=True)
    except Exception:
        return None


def _check_row(row: Any, where: str) -> None:
    if not isinstance(row, dict):
        raise ConfigError(f"{where}: a JSON {type(row).__name__}, expected an object with 'prompt' or 'messages'")
    if isinstance(row.get("prompt"), str):
        return
    messages = row.get("messages")
    if (
        isinstance(messages, list)
        and messages
        and all(isinstance(m, dict) and isinstance(m.get("content"), str) and "role" in m for m in messages)
    ):
        return
    raise ConfigError(
        f"{where}: needs 'prompt' (a string) or 'messages' (a list of {{role, content}}); has keys {sorted(row)}"
    )


def prompt_text(row: dict) -> str:
    """What reward functions get as `prompt`: the row's prompt, or the content of its last message."""
    return row["prompt"] if isinstance(row.get("prompt"), str) else row["messages"][-1]["content"]


def encode(tokenizer, row: dict, chat_template: bool) -> list[int]:
    """The prompt's token ids: through the chat template, or the raw text (messages joined by newlines)."""
    if chat_template:
        messages = row["messages"] if "messages" in row and not isinstance(row.get("prompt"), str) else None
        messages = messages or [{"role": "user", "content": row["prompt"]}]
        ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True)
        return list(ids["input_ids"] if isinstance(ids, Mapping) else ids)  # a bare transformers tokenizer: a dict
    text = row["prompt"] if isinstance(row.get("prompt"), str) else "\n".join(m["content"] for m in row["messages"])
    return list(tokenizer.encode(text))


@dataclass
class DatasetTask:
    """A `Task` over dataset rows with weighted reward functions; `score` scores a whole batch at once."""

    tokenizer: Any
    rows: list[dict]
    rewards: Rewards
    chat_template: bool = True
    seed: int = 0
    shuffle: bool = True
    name: str = "dataset"
    _ids: dict[int, list[int]] = field(default_factory=dict, repr=False)  # row -> prompt ids
    _orders: dict[int, np.ndarray] = field(default_factory=dict, repr=False)  # epoch -> row order

    def __post_init__(self) -> None:
        if self.chat_template and not getattr(self.tokenizer, "chat_template", None):
            raise ConfigError("source.chat_template = true, but the model's tokenizer has no chat template")

    def _order(self, epoch: int) -> np.ndarray:
        if epoch not in self._orders:
            n = len(self.rows)
            rng = np.random.default_rng([self.seed & 0xFFFFFFFF, epoch])
            self._orders = {e: o for e, o in self._orders.items() if e == epoch - 1}  # a batch may span two epochs
            self._orders[epoch] = rng.permutation(n) if self.shuffle else np.arange(n)
        return self._orders[epoch]

    def row_index(self, index: int) -> int:
        epoch, i = divmod(index, len(self.rows))
        return int(self._order(epoch)[i])

    def prompt(self, index: int) -> Prompt:
        r = self.row_index(index)
        if r not in self._ids:
            self._ids[r] = encode(self.tokenizer, self.rows[r], self.chat_template)
        row = self.rows[r]
        return Prompt(index=index, ids=self._ids[r], text=prompt_text(row), answer=row)

    def score_items(self, items: list[tuple[Prompt, str]]) -> Scored:
        return self.rewards.score(
            [
                {"completion": text, "answer": p.answer.get("answer"), "prompt": p.text, "example": p.answer}
                for p, text in items
            ]
        )

    def score(self, items: list[tuple[Prompt, list[int], str]]) -> tuple[list[float], int]:
        """Rewards of (prompt, completion ids, text) items, and how many reward calls failed."""
        scored = self.score_items([(p, text) for p, _, text in items])
        return scored.totals, scored.errors

    def reward(self, prompt: Prompt, completion_ids: list[int], text: str) -> float:
        return self.score([(prompt, completion_ids, text)])[0][0]


def check_dataset_config(config: Config) -> None:
    """What can be checked without the model, before anything starts: the dataset files load and every row has a
    prompt, and every reward function imports (ConfigError otherwise)."""
    sc, ec = config.source, config.eval
    if sc.type != "dataset":
        return
    load_examples(sc.path, sc.split)
    Rewards.from_config(sc)
    if ec.path:
        load_examples(ec.path, ec.split, key="eval.path", limit=ec.limit)


def check_prompts_fit(config: Config) -> None:
    """Every dataset prompt, training and eval rows, fits the model's context with `[learner] max_tokens`; else a
    ConfigError naming the rows that do not (by number, from 1, as `load_examples` counts them). Reads the model's
    tokenizer and config.json (the context length the workers use); skipped while the model is not on this machine
    (a hub id not yet fetched, a model `prepare` will build): the workers then refuse such a prompt and the learner
    skips it (workers.learner.sources.builtin)."""
    sc, ec, mc = config.source, config.eval, config.model
    if sc.type != "dataset":
        return
    model_dir = _local_model(mc.path)
    if model_dir is None:
        log.info("the prompt lengths are not checked: model %s is not on this machine yet", mc.path)
        return
    # As the generation workers (workers/generation/server.py) take it.
    context = int(json.loads((model_dir / "config.json").read_text()).get("max_position_embeddings") or 2048)
    from transformers import AutoTokenizer  # what mlx-lm wraps; no MLX here

    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    if sc.chat_template and not getattr(tokenizer, "chat_template", None):
        raise ConfigError("source.chat_template = true, but the model's tokenizer has no chat template")
    room = context - config.learner.max_tokens
    sets = [("source.path", sc.path, sc.split, None)] + (
        [("eval.path", ec.path, ec.split, ec.limit)] if ec.path else []
    )
    for key, path, split, limit in sets:
        lengths = [len(encode(tokenizer, row, sc.chat_template)) for row in load_examples(path, split, key, limit)]
        too_long = [(i, n) for i, n in enumerate(lengths, 1) if n > room]
        if too_long:
            rows = ", ".join(f"row {i} ({n} tokens)" for i, n in too_long[:5]) + (", ..." if len(too_long) > 5 else "")
            raise ConfigError(
                f"{key} = {path!r}: {len(too_long)} prompt(s) longer than {room} tokens, the model's context "
                f"({context}) less learner.max_tokens ({config.learner.max_tokens}): {rows}"
            )


def _local_model(name: str) -> Path | None:
    """The model's directory if it is on this machine (a local directory, or a hub id in the hub cache), else None."""
    try:
        return resolve_model(name, download=False)
    except ModelNotFound:  # not a model, or not fetched yet
        return None


def make_dataset_task(config: Config, tokenizer, evaluation: bool = False) -> DatasetTask:
    """The training task of `[source]`, or (`evaluation`) the held-out task of `[eval]` in file order."""
    sc, ec = config.source, config.eval
    rows = load_examples(ec.path, ec.split, "eval.path", ec.limit) if evaluation else load_examples(sc.path, sc.split)
    return DatasetTask(
        tokenizer,
        rows,
        Rewards.from_config(sc),
        chat_template=sc.chat_template,
        seed=config.learner.seed,
        shuffle=sc.shuffle and not evaluation,
        name="eval" if evaluation else "dataset",
    )
