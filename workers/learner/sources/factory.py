"""`make_source`: the source a job config's `[source]` asks for."""

from __future__ import annotations

import threading
from collections.abc import Callable
from pathlib import Path

from runner.config import Config
from workers.learner.sources.atropos import AtroposSource
from workers.learner.sources.base import Source
from workers.learner.sources.builtin import BuiltinSource
from workers.learner.sources.dataset import make_dataset_task
from workers.learner.tasks import make_task


def make_source(
    config: Config,
    urls: Callable[[], list[str]] | None = None,
    tokenizer=None,
    stop: threading.Event | None = None,
    ready: Callable[[int], bool] | None = None,
) -> Source:
    """The source a job config asks for. `urls` returns the generation workers' base URLs (builtin source);
    `tokenizer` is needed for built-in tasks (the trainer's); once `stop` is set, a wait for rollouts or for an
    Atropos batch ends at once with `Stopped`; `ready(j)` paces the rollouts started ahead (`[learner] async_depth`,
    module doc). Where a resumed source starts comes from the checkpoint (`load_state`)."""
    lc, sc = config.learner, config.source
    if sc.type in ("builtin", "dataset"):
        if urls is None or tokenizer is None:
            raise ValueError(f"the {sc.type} source needs the generation workers' URLs and the tokenizer")
        if sc.type == "dataset":
            task = make_dataset_task(config, tokenizer)
        else:
            task = make_task(sc.task, tokenizer, lc.max_tokens, seed=lc.seed)
        return BuiltinSource(
            task,
            urls,
            lc.group_size,
            lc.batch_size,
            lc.max_tokens,
            lc.temperature,
            lc.seed,
            api_token=config.security.api_token,
            stop=stop,
            depth=lc.async_depth,
            ready=ready,
            steps=lc.steps,
        )
    if sc.type == "atropos":
        if not sc.url:
            raise ValueError("source.url must name the Atropos API server (e.g. http://127.0.0.1:8000)")
        return AtroposSource(
            sc.url,
            batch_size=lc.batch_size * lc.group_size,
            num_steps=lc.steps,
            checkpoint_dir=str(Path(config.checkpoint.dir) / "checkpoints"),
            save_checkpoint_interval=config.checkpoint.interval,
            stop=stop,
            depth=lc.async_depth,
        )
    if sc.type == "verifiers":
        if urls is None:
            raise ValueError("the verifiers source needs the generation workers' URLs")
        from workers.learner.sources.verifiers import VerifiersSource  # imports verifiers only when asked for

        return VerifiersSource(
            sc.environment,
            urls,
            lc.group_size,
            lc.batch_size,
            lc.max_tokens,
            lc.temperature,
            api_token=config.security.api_token,
            stop=stop,
        )
    raise ValueError(f"unknown source type {sc.type!r}")
