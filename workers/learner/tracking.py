"""Metrics sinks: where each step's metrics row goes. RUN/metrics.jsonl always; Weights & Biases and TensorBoard when
`[logging]` asks for them (optional packages: the `tracking` extra).

`fit` hands every row to one `MetricsSink`; the learner process builds it with `make_sink` (rank 0 only: the other
ranks of a data-parallel learner write nothing). A tracker that fails to log (a network hiccup, a full disk under
RUN/tensorboard) logs a warning and never fails the step; metrics.jsonl failing does fail it, as before.

    RUN/metrics.jsonl           one JSON object per step (workers.learner.checkpoint)
    RUN/wandb/...               W&B's local files (the offline runs to `wandb sync`); RUN/wandb-run-id names the run
    RUN/tensorboard/events.*    TensorBoard event files, one scalar per numeric metric, at the row's step

The W&B run's config is the job's, its secrets redacted (`runner.config.redact`); TensorBoard gets the metrics only.

A job is one W&B run however often the learner restarts: its id is kept in RUN/wandb-run-id and the run resumed.
TensorBoard: a (re)started learner opens its writer at the first step it logs, with `purge_step` there, so steps that
are redone after a resume replace the old points instead of doubling them.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from pathlib import Path
from typing import Protocol

from runner.config import Config, redact
from runner.files import write_atomic
from workers.learner import checkpoint as ck

log = logging.getLogger(__name__)

WANDB_RUN_ID = "wandb-run-id"
TENSORBOARD_DIR = "tensorboard"


class MetricsSink(Protocol):
    def write(self, metrics: dict) -> None:
        """One step's metrics row (it has `step`)."""

    def close(self) -> None: ...


def scalars(metrics: dict) -> dict[str, float]:
    """The row's numeric values, `step` excepted (it is the x axis); None (not measured this step) is left out."""
    return {
        k: float(v)
        for k, v in metrics.items()
        if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool)
    }


class JsonlSink:
    """RUN/metrics.jsonl (each line fsynced; a resume truncates it at the checkpoint's step)."""

    def __init__(self, run_dir: str | Path):
        self.run_dir = Path(run_dir)

    def write(self, metrics: dict) -> None:
        ck.append_metrics(self.run_dir, metrics)

    def close(self) -> None:
        pass


class WandbSink:
    def __init__(self, run_dir: Path, project: str, mode: str, config: dict):
        import wandb

        id_file = run_dir / WANDB_RUN_ID
        run_id = id_file.read_text().strip() if id_file.exists() else uuid.uuid4().hex[:8]
        write_atomic(id_file, run_id + "\n")
        self.run = wandb.init(
            project=project,
            dir=str(run_dir),
            name=run_dir.name,
            id=run_id,
            resume="allow",
            config=config,
            mode=mode or None,
            settings=wandb.Settings(console="off"),  # the learner's own output stays as it is (logs/learner.log)
        )
        # Rows are plotted against their own `step`, not W&B's call counter: an eval row (written from the eval
        # thread) can arrive after the next step's row, and W&B drops a `step=` that goes backwards.
        self.run.define_metric("step")
        self.run.define_metric("*", step_metric="step")
        log.info("logging metrics to W&B project %r, run %s (%s)", project, run_id, self.run.settings.mode)

    def write(self, metrics: dict) -> None:
        self.run.log({"step": metrics["step"], **scalars(metrics)})

    def close(self) -> None:
        self.run.finish()


class TensorBoardSink:
    def __init__(self, log_dir: Path):
        import tensorboardX

        self._writer_class = tensorboardX.SummaryWriter
        self.log_dir = log_dir
        self.writer = None  # opened at the first row: its step is where this learner's history starts

    def write(self, metrics: dict) -> None:
        if self.writer is None:
            # Two writers started within a second (the file name has the time in seconds) get distinct files, named
            # in start order: readers take a directory's event files in name order.
            suffix = f".{time.time_ns()}"
            self.writer = self._writer_class(str(self.log_dir), purge_step=metrics["step"], filename_suffix=suffix)
            log.info("logging metrics to TensorBoard in %s", self.log_dir)
        for name, value in scalars(metrics).items():
            self.writer.add_scalar(name, value, metrics["step"])
        self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


class Sinks:
    """Every row to each sink in turn: metrics.jsonl first; a tracker's failure is logged, not raised."""

    def __init__(self, sinks: list[MetricsSink]):
        self.sinks = sinks
        self.lock = threading.Lock()  # the training loop and the eval thread both write rows

    def write(self, metrics: dict) -> None:
        with self.lock:
            self.sinks[0].write(metrics)
            for sink in self.sinks[1:]:
                try:
                    sink.write(metrics)
                except Exception as e:  # a tracker must not stop training
                    log.warning("%s could not log step %s: %s", type(sink).__name__, metrics.get("step"), e)

    def close(self) -> None:
        for sink in self.sinks:
            try:
                sink.close()
            except Exception as e:
                log.warning("%s did not close cleanly: %s", type(sink).__name__, e)


def make_sink(config: Config) -> Sinks:
    """metrics.jsonl in the run dir plus the trackers `[logging]` names. Raises ConfigError, before anything is
    created, when a tracker's package is missing."""
    cfg = config.logging
    cfg.require_packages()
    run_dir = Path(config.checkpoint.dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    sinks: list[MetricsSink] = [JsonlSink(run_dir)]
    if cfg.wandb_project:
        sinks.append(WandbSink(run_dir, cfg.wandb_project, cfg.wandb_mode, redact(config)))  # no secret to W&B
    if cfg.tensorboard:
        sinks.append(TensorBoardSink(run_dir / TENSORBOARD_DIR))
    return Sinks(sinks)
