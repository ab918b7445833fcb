"""The learner process under a coordinator: trainer + rollout source + checkpoints + publishing versions.

Each step: wait until the generation workers serve a recent enough version (`max_staleness`), take a batch from the
source, do one GRPO update, publish the new adapter as version v+1 through the coordinator, append the step's
metrics to `metrics.jsonl`, and checkpoint every `interval` steps and at exit. A restarted learner resumes from the
newest loadable checkpoint and republishes its adapter under a version newer than anything served, so versions never
go backwards. SIGTERM finishes the current step, writes a checkpoint and exits 0.
"""

from __future__ import annotations

import argparse
import json
import logging
import signal
import sys
import threading
from pathlib import Path

from runner.args import add_join_arguments, curve_from_args
from runner.config import Config, build_config
from runner.control import ControlClient

log = logging.getLogger(__name__)


def run_learner(join: str, name: str, curve: dict | None = None) -> int:
    from workers.learner import distributed as dist
    from workers.learner.checkpoint import append_metrics, find_latest, restore, save_checkpoint, truncate_metrics
    from workers.learner.sources import make_source
    from workers.learner.trainer import Trainer
    from workers.weights import Publisher

    group = dist.init()  # started by mlx.launch: one rank of a data-parallel ring; otherwise alone
    if not dist.is_writer(group):
        return run_follower(group)
    client = ControlClient(join, name, role="learner", curve=curve)
    welcome = client.hello(capabilities={"algorithm": "grpo", "ranks": dist.size_of(group)})
    config: Config = build_config(welcome["config"], where="coordinator")
    dist.broadcast_json(welcome["config"], group)  # the other ranks build the same trainer (they never say hello)
    client.heartbeat_interval = config.coordinator.heartbeat_interval
    client.status.update(state="loading", version=welcome["latest_version"])
    client.start_heartbeats()

    stopping = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stopping.set())
    signal.signal(signal.SIGINT, lambda *_: stopping.set())
    dist.announce_rank0(group)  # now `distributed launch` may forward the coordinator's SIGTERM here

    run_dir = Path(config.checkpoint.dir)
    trainer = Trainer.from_config(config, group=group)
    publisher = Publisher(client, welcome, trainer.spec.adapter_config(len(trainer.model.layers)))
    checkpoint = Path(config.checkpoint.resume) if config.checkpoint.resume else find_latest(run_dir)
    start_step = json.loads((checkpoint / "state.json").read_text())["step"] if checkpoint else 0
    source = make_source(config, publisher.serving_urls, tokenizer=trainer.tokenizer, starting_step=start_step)
    if checkpoint is not None:
        restore(trainer, source, checkpoint)
        log.info("resumed from %s at step %d", checkpoint, trainer.step_count)
    truncate_metrics(run_dir, trainer.step_count)  # steps after the checkpoint will be redone, not logged twice
    # Versions never go backwards: continue above whatever the workers may already serve, and make them serve
    # the resumed adapter before the first rollout.
    trainer.version = max(trainer.version, welcome["latest_version"])
    if checkpoint is not None:
        trainer.version += 1
        publisher.publish(trainer.version, trainer.step_count, trainer.lora_tensors())
    dist.sync_trainer(trainer, group)  # the other ranks start from rank 0's (resumed) state
    if dist.size_of(group) > 1:
        source = dist.BroadcastSource(source, group)  # rank 0 gets the rollouts; every rank trains its share
    client.status.update(state="training", version=trainer.version)

    def checkpoint_now(metrics: dict) -> None:
        save_checkpoint(run_dir, trainer, source.state(), metrics, keep_last=config.checkpoint.keep_last, config=config)

    saved_step = trainer.step_count if checkpoint is not None else -1
    try:
        while trainer.step_count < config.learner.steps and not stopping.is_set():
            publisher.wait_for_workers(trainer.version - config.learner.max_staleness, stopping)
            if stopping.is_set():
                break
            metrics = trainer.step(source.next_batch(trainer.step_count))
            publisher.publish(trainer.version, trainer.step_count, trainer.lora_tensors())
            append_metrics(run_dir, metrics)
            client.status["version"] = trainer.version
            client.send({"type": "progress", "name": name, "metrics": _plain(metrics)})
            if trainer.step_count % config.checkpoint.interval == 0:
                checkpoint_now(metrics)
                saved_step = trainer.step_count
        if isinstance(source, dist.BroadcastSource):
            source.stop()  # done or stopping between steps: release the other ranks
    finally:
        client.status["state"] = "stopping"
        if saved_step != trainer.step_count:
            checkpoint_now(trainer.last_metrics)
        source.close()
    if not stopping.is_set():
        client.send({"type": "done", "name": name})
    client.close()
    return 0


def run_follower(group) -> int:
    """Rank > 0 of a data-parallel learner: trains its share of every batch rank 0 sends, until rank 0 says stop.
    It never talks to the coordinator; rank 0 publishes, checkpoints and reports for all ranks."""
    from workers.learner import distributed as dist
    from workers.learner.trainer import Trainer

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches every local rank: rank 0 decides, then says stop
    config = build_config(dist.broadcast_json(None, group), where="rank 0")
    trainer = Trainer.from_config(config, group=group)
    dist.sync_trainer(trainer, group)
    source = dist.BroadcastSource(None, group)
    log.info("rank %d of %d: following rank 0 from step %d", group.rank(), group.size(), trainer.step_count)
    while True:
        try:
            batch = source.next_batch(trainer.step_count)
        except dist.StopTraining:
            break
        trainer.step(batch)
    log.info("rank %d: stopped at step %d", group.rank(), trainer.step_count)
    return 0


def _plain(metrics: dict) -> dict:
    """Metrics as msgpack-able scalars."""
    return {
        k: (float(v) if isinstance(v, float) else v) for k, v in json.loads(json.dumps(metrics, default=float)).items()
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m workers.learner.main")
    add_join_arguments(p)
    p.add_argument("--name", default="learner")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return run_learner(args.join, args.name, curve=curve_from_args(args))


if __name__ == "__main__":
    sys.exit(main())
