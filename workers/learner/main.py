"""The learner process under a coordinator: `trainer.fit` with callbacks that publish each version.

    python -m workers.learner.main --config RUN/config.resolved.toml --join ENDPOINT --name learner
        [--resume CHECKPOINT] [--key K --server-key S]

The config comes from the file (any learner can be started by hand from it); the coordinator's `welcome` adds the
runtime facts (base model id, latest version, where versions go). `fit` resumes from `--resume` or else the newest
loadable checkpoint of the run dir, and around each step the callbacks wait until the generation workers serve a
recent enough version (`max_staleness`), then publish the new adapter as version v+1 and report progress. With
`[learner] async_depth` d > 0 the source keeps the next d batches' rollouts running meanwhile, each started once the
workers serve a version within max_staleness of the one it will be trained at (workers.learner.sources). Each step's
metrics get where its time went (`wait_s` for the workers' version and the rollouts, `train_s`, `publish_s`,
`step_s` = wall time since the previous step ended) and `gen_busy`, the generation workers' busy fraction over it
(time in decode steps from their /metrics, summed, over wall time x workers). Versions
never go backwards: a learner continues above the latest version the coordinator has seen and republishes a resumed
adapter before the first rollout. SIGTERM during a step finishes it; during the wait for rollouts (or an Atropos
batch) it abandons them at once; either way the learner checkpoints the last completed step and exits 0 (a step
longer than the coordinator's `stop_grace` is cut short by SIGKILL: the last checkpoint stays the newest).

A failure a restart would only repeat ends the job instead of a restart loop: the learner logs the reason and exits
EXIT_FATAL, which the coordinator takes as the end of the job. That is a run dir whose checkpoints all fail to load
(workers.learner.checkpoint.CheckpointError), or a step that fails the same way on the same input (the source's
position) as the failure before it (RUN/learner_failure.json records the last one).

Started as ring ranks (`[learner] hosts`), rank 0 does all of the above and sends the config to the other ranks (other
hosts need not have the file); they follow through the same `fit` with no callbacks (workers.learner.distributed).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import mlx.core as mx

from runner.args import add_join_arguments, curve_from_args
from runner.config import Config, build_config, load_config, redact
from runner.control import EXIT_FATAL, EXIT_ORPHANED, HOSTED_TOKEN_ENV, ControlClient, Publisher
from runner.rundir import check_job
from workers.generation.worker import Hosted, run_worker
from workers.learner import checkpoint as ck
from workers.learner import distributed as dist
from workers.learner.evaluation import make_evaluator
from workers.learner.sources.base import FreshSource, Stopped
from workers.learner.sources.factory import make_source
from workers.learner.tracking import make_sink
from workers.learner.trainer import Callbacks, Trainer, fit
from workers.models import weight_sharing_copy

log = logging.getLogger(__name__)


def run_learner(args: argparse.Namespace) -> int:
    """Rank 0 (or the only rank): join the coordinator, train with publishing callbacks, say `done` at the end."""
    group = dist.init()  # started by mlx.launch: one rank of a data-parallel ring; otherwise alone
    if not dist.is_writer(group):
        return run_follower(group)
    if why := check_job():  # started by a launch that is gone, or whose run dir another launch took: write nothing
        log.error("%s; exiting", why)
        return EXIT_ORPHANED
    config = load_config(args.config)
    sink = make_sink(config)  # metrics.jsonl and the [logging] trackers; fails here if a tracker's package is missing
    client = ControlClient(args.join, args.name, role="learner", curve=curve_from_args(args))
    welcome = client.hello(capabilities={"algorithm": "grpo", "ranks": dist.size_of(group)})
    # The other ranks build the same trainer (they never say hello), and watch this rank's beats to end with it.
    # They call no worker: the config goes over the ring (plain TCP between machines) with its secrets redacted.
    beats = dist.rank0_beats(group) if dist.size_of(group) > 1 else ""
    dist.broadcast_json({"config": redact(config), "rank0": beats}, group)
    client.heartbeat_interval = config.coordinator.heartbeat_interval
    client.heartbeat_timeout = config.coordinator.heartbeat_timeout
    client.status.update(state="loading", version=welcome["latest_version"])
    client.start_heartbeats()

    stopping = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stopping.set())
    signal.signal(signal.SIGINT, lambda *_: stopping.set())
    dist.announce_rank0(group)  # now `distributed launch` may forward the coordinator's SIGTERM here

    trainer = Trainer.from_config(config, group=group)
    hosted = _host_worker(args, trainer, stopping) if args.serve else None
    warmup_s = trainer.warm_up()
    log.info("warmed up the training step in %.1fs (kernels compile at their first use)", warmup_s)
    publisher = Publisher(client, welcome, trainer.spec.adapter_config(len(trainer.model.layers)))
    source = fresh = _paced_source(config, trainer, publisher, stopping)
    if dist.size_of(group) > 1:
        source = dist.BroadcastSource(source, group)  # rank 0 gets the rollouts; every rank trains its share
    evaluator = make_evaluator(
        config,
        publisher.serving_urls,
        trainer.tokenizer,
        stopping,
        serving_version=lambda: publisher.status()["job"]["oldest_serving_version"],
        report=lambda row: client.send({"type": "progress", "name": args.name, "metrics": _plain(row)}),
        write=sink.write,
    )
    callbacks = _publishing_callbacks(
        trainer,
        client,
        publisher,
        config,
        welcome["latest_version"],
        stopping,
        lambda: fresh.dropped_batches,
        evaluator,
        warmup_s,
    )
    fatal = ""  # why a restart would only repeat this failure: exit EXIT_FATAL, the coordinator stops the job
    try:
        fit(
            trainer,
            source,
            config.learner.steps,
            config.checkpoint.dir,
            interval=config.checkpoint.interval,
            keep_last=config.checkpoint.keep_last,
            config=config,
            resume=args.resume or config.checkpoint.resume or True,
            stopping=stopping,
            callbacks=callbacks,
            sink=sink,
        )
        if evaluator is not None and not stopping.is_set():
            evaluator.finish(trainer.step_count, trainer.version)  # the final eval; the job ends after it
    except Stopped as e:  # SIGTERM while waiting for rollouts: fit has checkpointed the last completed step
        log.info("%s; stopping at step %d", e, trainer.step_count)
    except ck.CheckpointError as e:  # starting over instead would redo the run on top of its history
        fatal = str(e)
    except Exception as e:
        fatal = ck.failed_again(config.checkpoint.dir, trainer.step_count + 1, source.state(), e) or ""
        if not fatal:
            raise  # the coordinator restarts the learner: it may get past this
        log.exception("the step failed")
        stopping.set()  # rollouts still in flight give up
    finally:
        client.status["state"] = "stopping"
        source.close()
        if evaluator is not None:
            evaluator.close()
        sink.close()
        if hosted is not None:
            hosted.stopping.set()
            hosted.thread.join(30)
    if fatal:
        log.error("%s; stopping the job", fatal)  # last: the coordinator ends the job with the end of this log
        client.close()
        return EXIT_FATAL
    if not stopping.is_set():
        client.send({"type": "done", "name": args.name})
    client.close()
    return 0


@dataclass
class HostedWorker:
    stopping: threading.Event
    thread: threading.Thread


def _host_worker(args: argparse.Namespace, trainer: Trainer, stopping: threading.Event) -> HostedWorker:
    """Run the generation worker `args.serve` on a thread of this process, over the trainer's base weights
    (`[generation] colocate`). Its exit while the learner trains (a failed engine, a dead HTTP front, a refused
    hello) stops this process too, after a checkpoint, so that the coordinator restarts both."""
    mx.eval(trainer.model.parameters())
    model = weight_sharing_copy(trainer.model)
    hosted = Hosted(model, trainer.tokenizer, os.environ.pop(HOSTED_TOKEN_ENV, ""), threading.Event())

    def serve() -> None:
        try:
            code = run_worker(
                args.join,
                args.serve,
                args.serve_host,
                args.serve_port,
                curve=curve_from_args(args),
                config_path=args.config,
                hosted=hosted,
            )
        except Exception:
            log.exception("%s (run by this process) failed", args.serve)
            code = 1
        if not stopping.is_set() and not hosted.stopping.is_set():
            log.error("%s (run by this process) exited (code %s); stopping for a restart of both", args.serve, code)
            os.kill(os.getpid(), signal.SIGTERM)

    thread = threading.Thread(target=serve, name=args.serve, daemon=True)
    thread.start()
    return HostedWorker(hosted.stopping, thread)


def _paced_source(config: Config, trainer: Trainer, publisher: Publisher, stopping: threading.Event) -> FreshSource:
    """The job's source, paced by the workers' versions and wrapped to wait out batches that are stale as a whole."""
    max_staleness = config.learner.max_staleness

    def ready(j: int) -> bool:
        # The batch trained j steps after the next one (at version trainer.version + j) may start now only if every
        # worker serves a version within max_staleness of that; they never go back, so every token it gets will be.
        return publisher.wait_for_workers(trainer.version + j - max_staleness, stopping) is not None

    source = make_source(config, publisher.serving_urls, tokenizer=trainer.tokenizer, stop=stopping, ready=ready)
    # A batch stale as a whole (e.g. rollouts from a worker restarted at an old version) would make Trainer.step
    # raise StaleBatch: drop it and wait for the workers instead of crashing into a restart.
    return FreshSource(
        source,
        min_version=lambda: trainer.version - max_staleness,
        wait=lambda version: publisher.wait_for_workers(version, stopping) is not None,
    )


def _publishing_callbacks(
    trainer: Trainer,
    client: ControlClient,
    publisher: Publisher,
    config: Config,
    latest_version: int,
    stopping: threading.Event,
    dropped_batches=lambda: 0,
    evaluator=None,
    warmup_s: float | None = None,
) -> Callbacks:
    def on_start(resumed: Path | None) -> None:
        # Versions never go backwards: continue above whatever the workers may already serve, and make them serve
        # the resumed adapter before the first rollout.
        trainer.version = max(trainer.version, latest_version)
        if resumed is not None:
            trainer.version += 1
            publisher.publish(trainer.version, trainer.step_count, trainer.lora_buffers())
        client.status.update(state="training", version=trainer.version)
        if evaluator is not None:
            evaluator.started(trainer.step_count, trainer.version)

    busy = BusyMeter(publisher.serving_urls, config.security.api_token)
    clock = {"begin": 0.0, "ended": None}  # this step's before_step; the previous step's end

    def before_step() -> None:
        clock["begin"] = time.perf_counter()
        if clock["ended"] is None:
            clock["ended"] = clock["begin"]
            busy.sample()  # the baseline of the first step
        publisher.wait_for_workers(trainer.version - config.learner.max_staleness, stopping)

    def after_step(metrics: dict) -> None:
        nonlocal warmup_s
        trained = time.perf_counter()
        publisher.publish(trainer.version, trainer.step_count, trainer.lora_buffers())
        now = time.perf_counter()
        metrics.update(
            wait_s=max(trained - clock["begin"] - metrics["seconds"], 0.0),
            train_s=metrics["seconds"],
            publish_s=now - trained,
            step_s=now - clock["ended"],
            gen_busy=busy.sample(),
            dropped_batches=dropped_batches(),  # so far: batches stale as a whole, dropped and waited out (logged)
        )
        if warmup_s is not None:  # the first step's line says what came before it
            metrics["warmup_s"], warmup_s = warmup_s, None
        clock["ended"] = now
        client.status["version"] = trainer.version
        client.send({"type": "progress", "name": client.name, "metrics": _plain(metrics)})
        if evaluator is not None:
            evaluator.step_done(trainer.step_count, trainer.version)  # in the background

    return Callbacks(on_start=on_start, before_step=before_step, after_step=after_step)


class BusyMeter:
    """The generation workers' busy fraction between two calls: seconds spent in decode steps (each worker's
    `runner_decode_seconds_total` on /metrics) over wall time, summed over the workers seen both times."""

    def __init__(self, urls, api_token: str = ""):
        self.urls = urls
        headers = {"Authorization": f"Bearer {api_token}"} if api_token else None
        self._client = httpx.Client(timeout=2.0, headers=headers)
        self._last: dict[str, tuple[float, float]] = {}  # url -> (time, decode seconds)

    def sample(self) -> float | None:
        now, seen = time.perf_counter(), {}
        try:
            urls = self.urls()
        except Exception as e:  # a metric must not fail a step
            log.debug("no worker list for the busy fraction: %s", e)
            return None
        for url in urls:
            try:
                text = self._client.get(f"{url.rstrip('/')}/metrics").text
                seen[url] = (now, _prometheus_value(text, "runner_decode_seconds_total"))
            except (httpx.HTTPError, ValueError) as e:
                log.debug("no /metrics from %s: %s", url, e)
        pairs = [(seen[u], self._last[u]) for u in seen if u in self._last]
        self._last = seen
        wall = sum(t1 - t0 for (t1, _), (t0, _) in pairs)
        # max(.., 0): a restarted worker's counter starts again from 0
        return sum(max(d1 - d0, 0.0) for (_, d1), (_, d0) in pairs) / wall if wall > 0 else None


def _prometheus_value(text: str, name: str) -> float:
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    raise ValueError(f"{name} is not in the metrics")


def run_follower(group: dist.Group) -> int:
    """Rank > 0 of a data-parallel learner: the same `fit`, on the batches rank 0 sends, until rank 0 stops it.
    It never talks to the coordinator; rank 0 publishes, checkpoints and reports for all ranks."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches every local rank: rank 0 decides, then says stop
    job = dist.broadcast_json(None, group)
    config = build_config(job["config"], where="rank 0")
    # Blocked in a collective, this rank would outlive a dead rank 0 (and hold the ring's ports): watch it instead.
    finished = threading.Event()
    dist.watch_rank0(job["rank0"], config.coordinator.heartbeat_timeout, finished)
    trainer = Trainer.from_config(config, group=group)
    trainer.warm_up()  # the same kernels as rank 0's, compiled while rank 0 does
    log.info("rank %d of %d: following rank 0", group.rank(), group.size())
    fit(trainer, dist.BroadcastSource(None, group), config.learner.steps)
    finished.set()
    log.info("rank %d: stopped at step %d", group.rank(), trainer.step_count)
    return 0


def _plain(metrics: dict) -> dict:
    """Metrics as msgpack-able scalars."""
    return {
        k: (float(v) if isinstance(v, float) else v) for k, v in json.loads(json.dumps(metrics, default=float)).items()
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m workers.learner.main", description=__doc__.split("\n\n")[0])
    p.add_argument("--config", required=True, help="the run's resolved config (RUN/config.resolved.toml)")
    add_join_arguments(p)
    p.add_argument("--name", default="learner")
    p.add_argument("--resume", help="a checkpoint directory to resume from (default: the run dir's newest)")
    p.add_argument("--serve", help="also run this generation worker, over the learner's weights (colocate)")
    p.add_argument("--serve-host", default="127.0.0.1", help="where the served worker's HTTP API listens")
    p.add_argument("--serve-port", type=int, default=0)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return run_learner(args)


if __name__ == "__main__":
    sys.exit(main())
