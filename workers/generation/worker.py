"""A generation worker attached to a coordinator: the engine of `workers.generation.engine`, its HTTP front in a
process of its own (`workers.generation.front`: the server of `workers.generation.server`, started and stopped with
the worker, and a front that exits makes the worker exit to be restarted), plus the weight plane's receiving end
(`runner.control.WeightReceiver`, installing through `Engine.install_message`).

Start-up: hello -> the job config (`--config`, the file `runner launch` wrote; or, for a worker joining from another
host without it, `get_config` from the coordinator, which redacts secrets: such a worker of a job with an API token
reads the token from `--api-token-file` or RUNNER_API_TOKEN, never from its command line) -> load the base model (the
config's path, or `--model`) and check its id against the coordinator's -> apply the job's LoRA spec -> catch up:
install the coordinator's latest adapter -> only then start HTTP and report `serving` with its advertised URL
(`--advertise-url`, or the address of the interface that reaches the coordinator when bound to a wildcard). Afterwards
every new version is installed between decode steps (at once when the engine is idle) and acked the moment it is live.

When the coordinator goes away (silent for its heartbeat timeout, or restarted): a worker it started exits
(`runner.control.ControlClient`); a remote one keeps serving its version, says hello again with backoff until a
coordinator answers, and catches up to its latest version, with no restart.

Liveness: the heartbeat thread reports the engine's progress (`engine_steps`) and says `failed` once the engine
thread died or the engine has had requests and finished no step for `[generation] stall_timeout`; the worker then
exits, and the coordinator kills (if need be) and restarts it.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import socket
import sys
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.nn as nn
import tenacity

from runner.args import add_join_arguments, curve_from_args
from runner.config import (
    API_TOKEN_ENV,
    REDACTED,
    Config,
    ConfigError,
    api_token_override,
    build_config,
    load_config,
    with_api_token,
)
from runner.control import (
    EXIT_ORPHANED,
    WEIGHTS_MAX_BYTES,
    ControlClient,
    CoordinatorGone,
    HelloRefused,
    SlotTransport,
    WeightReceiver,
    advertised_url,
    model_id,
    weight_transport,
    weights_max_bytes,
)
from runner.hub import ModelNotFound, is_local, resolve_model
from runner.rundir import check_job
from workers.generation.engine import Engine
from workers.generation.front import start_front
from workers.generation.server import engine_over, load_engine
from workers.lora import LoraSpec

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised only on Python 3.10
    import tomli as tomllib

log = logging.getLogger(__name__)


@dataclass
class Hosted:
    """A worker run on a thread of the learner's process (`[generation] colocate`). `model`: what its engine serves,
    a copy of the learner's model over the same base weight arrays (`workers.models.weight_sharing_copy`: its own
    adapter, its own versions), so the machine holds them once; made on the learner's thread with every array
    evaluated, since MLX runs an array's pending work only on the thread that made it. `token`: its role secret;
    `stopping`: set by the learner to stop it."""

    model: nn.Module
    tokenizer: Any
    token: str
    stopping: threading.Event


def run_worker(
    join: str,
    name: str,
    host: str,
    port: int,
    model_override: str | None = None,
    curve: dict | None = None,
    config_path: str | None = None,
    advertise_url: str | None = None,
    api_token: str | None = None,
    hosted: Hosted | None = None,
) -> int:
    """Join the coordinator at `join`, serve until told to stop (SIGTERM, SIGINT or the coordinator's `stop`; a
    hosted worker: its `stopping`). `api_token` (from `--api-token-file` or RUNNER_API_TOKEN) replaces the job
    config's."""
    if why := check_job():  # started by a launch that is gone, or whose run dir another launch took
        log.error("%s; exiting", why)
        return EXIT_ORPHANED
    file_config = load_config(config_path) if config_path else None
    # Without CURVE, holding the job's API token is what lets a worker the coordinator did not start say hello.
    proof_token = api_token or (file_config.security.api_token if file_config else "")
    # Weight messages come on this socket too (catch-up, same-host fan-out): the format's limits until the adapter's
    # size is known.
    client = ControlClient(
        join,
        name,
        role="generate",
        curve=curve,
        max_message_bytes=WEIGHTS_MAX_BYTES,
        api_token=proof_token,
        token=hosted.token if hosted else None,
    )
    try:
        capabilities = {"api": ["openai", "atropos-vllm"], "device": str(mx.default_device())}
        capabilities["model_override"] = bool(model_override)
        welcome = client.hello(capabilities=capabilities)
        config = _job_config(client, file_config, api_token)
        client.heartbeat_interval = config.coordinator.heartbeat_interval
        client.heartbeat_timeout = config.coordinator.heartbeat_timeout
        client.status.update(state="loading", version=0)
        client.start_heartbeats()
        model_name = model_override or config.model.path
        try:
            model_path = resolve_model(model_name, "--model" if model_override else "[model] path")
        except ModelNotFound as e:
            log.error("%s", e)
            return 2
        if not _is_base_model(model_path, welcome["base_model_id"]):
            return 2
        engine = _start_engine(model_path, config, hosted)
        client.max_message_bytes = weights_max_bytes(model_path, config.lora)
        transport = weight_transport(welcome["weights_slots"])
        slots = transport if isinstance(transport, SlotTransport) else None  # else versions come as frames
        receiver = WeightReceiver(engine, welcome["base_model_id"], slots)
        sub = None if receiver.slots else client.subscribe_weights(welcome["weights_endpoint"])
        client.status["state"] = "catching_up"
        receiver.catch_up(client)
        log.info("%s caught up at adapter version %d (new versions by %s)", name, engine.version, transport.name)
        served_name = Path(model_name).name if is_local(model_name) else model_name  # a hub id as given
        stopping = hosted.stopping if hosted else _stop_on_signals()
        return _serve(client, receiver, sub, config, served_name, host, port, stopping, advertise_url, capabilities)
    finally:
        client.close()


def _job_config(client: ControlClient, file_config: Config | None, api_token: str | None = None) -> Config:
    """The job's resolved config: the one read from `--config`, or the coordinator's (a worker on another host). The
    coordinator sends it with its secrets redacted: a worker of a job with an API token brings the token itself
    (`api_token`)."""
    if file_config is not None:
        config = file_config
    else:
        toml = client.request({"type": "get_config"}, ("config",), timeout=60)[1]["toml"]
        config = build_config(tomllib.loads(toml), where="the coordinator's config")
    if api_token:
        if not config.security.api_token:
            log.warning("this worker wants a bearer token, but the job has no [security] api_token to send it")
        return with_api_token(config, api_token)
    if config.security.api_token == REDACTED:
        raise ConfigError(
            "the job's HTTP API requires its [security] api_token, which the coordinator never sends: pass "
            f"--api-token-file PATH (a 0600 file holding it) or set {API_TOKEN_ENV}"
        )
    return config


def _is_base_model(model_path: Path, base_model_id: str) -> bool:
    if model_id(model_path) != base_model_id:
        log.error(
            "model %s (id %s) is not the job's base model (id %s)", model_path, model_id(model_path), base_model_id
        )
        return False
    return True


def _start_engine(model_path: Path, config: Config, hosted: Hosted | None = None) -> Engine:
    lora, gen = config.lora, config.generation
    sizes = dict(
        max_batch=gen.max_batch,
        prefill_batch=gen.prefill_batch,
        max_queue=gen.max_queue,
        stall_timeout=gen.stall_timeout,
    )
    if hosted is not None:  # the learner's model, with the adapter layout the learner publishes
        engine = engine_over(hosted.model, hosted.tokenizer, model_path, **sizes).start()
        engine.warm_up()
        return engine
    spec = LoraSpec(
        rank=lora.rank, scale=lora.scale, dropout=lora.dropout, keys=list(lora.keys), num_layers=lora.num_layers
    )
    engine = load_engine(model_path, lora_spec=spec, dtype=config.model.dtype, **sizes).start()
    engine.warm_up()
    return engine


def _serve(
    client,
    receiver: WeightReceiver,
    sub,
    config: Config,
    model_name: str,
    host: str,
    port: int,
    stopping: threading.Event,
    advertise_url: str | None = None,
    capabilities: dict | None = None,
) -> int:
    """HTTP up, `serving` reported, then new versions taken until a stop; returns the exit code."""
    engine, gen = receiver.engine, config.generation
    front = start_front(
        engine,
        model_name,
        host,
        port,
        api_token=config.security.api_token,
        max_tokens_default=gen.max_tokens,
        max_tokens_limit=gen.max_tokens_limit,
    )
    http_url = advertised_url(host, front.port, client.endpoint, advertise_url)
    client.status.update(state="serving", version=engine.version, http_url=http_url)
    client.send(
        {"type": "ack", "name": client.name, "version": engine.version, "state": "serving", "http_url": http_url}
    )
    log.info("%s serving on %s/v1", client.name, http_url)
    # Each version is acked the moment it is live, by the thread that swapped it in, on a socket of its own used
    # under the engine's model lock: never by two threads at once.
    engine.on_version = client.acker()
    # The heartbeat thread reports the engine's progress, and its failure even while this thread is held up.
    client.before_beat = lambda: _beat_status(client, engine)
    try:
        while not stopping.is_set():
            if client.coordinator_lost.is_set():
                sub = _rejoin(client, receiver, sub, stopping, capabilities or {})
                continue
            if any(msg["type"] == "stop" for msg in receiver.receive(client, sub, timeout=0.05)):
                stopping.set()
            if not front.alive():
                log.error("the HTTP front exited unexpectedly (code %s)", front.proc.returncode)
                return 1
            if failure := engine.failure:  # /health says 503 "failed"; exit so the coordinator (or launchd) restarts us
                log.error("%s; reporting failed and exiting", failure)
                client.status["state"] = "failed"
                client.send({"type": "heartbeat", "name": client.name, "state": "failed", "version": engine.version})
                return 1
    finally:
        client.status["state"] = "stopping"
        front.stop()
        engine.stop()
        if sub is not None:
            sub.close()
    return 0


def _stop_on_signals() -> threading.Event:
    stopping = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stopping.set())
    signal.signal(signal.SIGINT, lambda *_: stopping.set())
    return stopping


def _beat_status(client: ControlClient, engine: Engine) -> None:
    """Before each heartbeat: the engine's progress, and `failed` once its thread died or a step hung (the coordinator
    then kills and restarts this worker)."""
    client.status["engine_steps"] = engine.steps
    if client.status.get("state") == "serving" and (failure := engine.failure):
        log.error("%s; reporting failed", failure)
        client.status["state"] = "failed"


def _rejoin(client: ControlClient, receiver: WeightReceiver, sub, stopping: threading.Event, capabilities: dict):
    """The coordinator went away (Paranoid Pirate): keep serving this version (HTTP is untouched) while saying hello
    again, with exponential backoff, until one answers; then follow it from its latest version. Returns the new
    weights SUB socket (None when versions come through slots)."""
    version = receiver.engine.version

    def hello() -> dict:
        client.reconnect()  # a new socket: no stale hello reaches the next coordinator
        info = {"version": version, "state": "serving", "http_url": client.status.get("http_url", "")}
        return client.hello(timeout=max(5.0, 2 * client.heartbeat_interval), capabilities=capabilities, **info)

    retrying = tenacity.Retrying(
        retry=tenacity.retry_if_exception_type(CoordinatorGone),
        wait=tenacity.wait_exponential(multiplier=0.5, max=10),
        stop=lambda _: stopping.is_set(),
        sleep=stopping.wait,  # a SIGTERM ends the wait
        before_sleep=lambda state: log.info("no coordinator at %s yet (try %d)", client.endpoint, state.attempt_number),
        reraise=True,
    )
    try:
        welcome = retrying(hello)
    except CoordinatorGone:
        return sub  # stopping
    if welcome["base_model_id"] != receiver.base_model_id:
        log.error("the coordinator at %s now runs another base model; stopping", client.endpoint)
        stopping.set()
        return sub
    transport = weight_transport(welcome["weights_slots"])
    receiver.slots = transport if isinstance(transport, SlotTransport) else None
    if sub is not None:
        sub.close()
    sub = None if receiver.slots else client.subscribe_weights(welcome["weights_endpoint"])
    receiver.catch_up(client)
    engine = receiver.engine
    client.status.update(state="serving", version=engine.version)
    msg = {"type": "ack", "name": client.name, "version": engine.version, "state": "serving"}
    client.send({**msg, "http_url": client.status.get("http_url", "")})
    client.coordinator_lost.clear()
    log.info("%s rejoined at adapter version %d (served %d meanwhile)", client.name, engine.version, version)
    return sub


def join(args: argparse.Namespace) -> int:
    """`runner worker generate --join tcp://HOST:PORT`."""
    name = args.name or f"gen-{socket.gethostname()}-{os.getpid()}"
    try:
        curve = curve_from_args(args)
        advertised_url(args.host, args.port, args.join, args.advertise_url)  # refuse before loading anything
        api_token = api_token_override(getattr(args, "api_token_file", None))  # a ConfigError is a ValueError
    except ValueError as e:
        print(f"runner: error: {e}", file=sys.stderr)
        return 2
    try:
        return run_worker(
            args.join, name, args.host, args.port, args.model, curve, args.config, args.advertise_url, api_token
        )
    except HelloRefused as e:  # e.g. its name is live in another process: one line, and a supervisor retries
        print(f"runner: error: {e}", file=sys.stderr)
        return 2


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m workers.generation.worker")
    add_join_arguments(p)
    p.add_argument("--name", default=None)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=0)
    p.add_argument("--model", default=None)
    p.add_argument("--config", default=None, help="the job's resolved config (default: ask the coordinator)")
    p.add_argument("--advertise-url", default=None, help="the URL others reach this worker's HTTP API at")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return join(args)


if __name__ == "__main__":
    sys.exit(main())
