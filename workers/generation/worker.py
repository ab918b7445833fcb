"""A generation worker attached to a coordinator: the engine and HTTP server of `workers.generation.server`, plus the
weight plane's receiving end.

Start-up: hello → load the base model named by the coordinator (or `--model`), check its id → apply the job's LoRA
spec → ask for the latest adapter and install it → only then start HTTP and report `serving`. Afterwards every new
version (a shared-memory slot notice or frames on the control socket when on the coordinator's host, frames on the
weights PUB socket otherwise) is validated against the model (names, shapes, dtypes, base id, version newer), copied
into MLX, and installed between decode steps only if the copy's checksum matches (at once when the engine is idle);
it is acked the moment it is live. A bad message is logged and dropped; the current version keeps serving.
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading
from pathlib import Path

import mlx.core as mx
import zmq

from runner import slots, wire
from runner.args import add_join_arguments, curve_from_args
from runner.config import build_config
from runner.control import ControlClient, model_id
from runner.webserver import start_in_thread
from workers.generation.server import Server, load_engine
from workers.lora import LoraSpec
from workers.weights import verified_copy

log = logging.getLogger(__name__)


class WeightReceiver:
    """Validates incoming weight messages against this worker's model and hands them to the engine."""

    def __init__(self, engine, base_model_id: str, slot_reader: slots.SlotReader | None = None):
        self.engine = engine
        self.base_model_id = base_model_id
        self.layout = engine.lora_layout
        self.slot_reader = slot_reader
        self.rejected = 0

    def expectation(self) -> wire.Expectation:
        return wire.Expectation(
            base_model_id=self.base_model_id, shapes=self.layout, min_version=self.engine.newest_version
        )

    def offer(self, frames: list | None = None, notice: dict | None = None) -> threading.Event | None:
        """Validate and schedule one message (frames, or a shared-memory slot notice); returns an event set once it
        is live, or None if it was dropped."""
        try:
            if notice is not None:
                if self.slot_reader is None:
                    raise wire.WireError("a slot notice reached a worker that does not use slots")
                message = wire.decode_segment(self.slot_reader.segment(notice), self.expectation(), verify=False)
                slots.check_notice(notice, message.version)
            else:
                message = wire.decode(frames, expected=self.expectation(), verify=False)
            applied = self.engine.install_adapter(message.version, verified_copy(message))
        except (wire.WireError, ValueError) as e:
            self.rejected += 1
            log.warning("dropped a weight message: %s", e)
            return None
        return applied


def run_worker(
    join: str, name: str, host: str, port: int, model_override: str | None = None, curve: dict | None = None
) -> int:
    client = ControlClient(join, name, role="generate", curve=curve)
    welcome = client.hello(
        capabilities={
            "api": ["openai", "atropos-vllm"],
            "device": str(mx.default_device()),
            "model_override": bool(model_override),
        }
    )
    if welcome["type"] != "welcome":
        log.error("the coordinator refused %s: %s", name, welcome.get("reason"))
        return 2
    config = build_config(welcome["config"], where="coordinator")
    client.heartbeat_interval = config.coordinator.heartbeat_interval
    client.status.update(state="loading", version=0)
    client.start_heartbeats()
    model_path = Path(model_override or welcome["model_path"])
    if not (model_path / "config.json").exists():
        log.error("model directory %s does not exist on this machine; pass --model PATH", model_path)
        return 2
    if model_id(model_path) != welcome["base_model_id"]:
        log.error(
            "model %s (id %s) is not the job's base model (id %s)",
            model_path,
            model_id(model_path),
            welcome["base_model_id"],
        )
        return 2
    lora = config.lora
    gen = config.generation
    engine = load_engine(
        model_path,
        lora_spec=LoraSpec(
            rank=lora.rank, scale=lora.scale, dropout=lora.dropout, keys=list(lora.keys), num_layers=lora.num_layers
        ),
        max_batch=gen.max_batch,
        prefill_batch=gen.prefill_batch,
        max_queue=gen.max_queue,
    ).start()
    # Same host as the coordinator: versions come as shared-memory slot notices on the control socket (and as frames
    # there when uploaded from elsewhere); otherwise on the weights PUB socket.
    slot_dir = slots.usable_dir(welcome.get("weights_slots"))
    receiver = WeightReceiver(engine, welcome["base_model_id"], slots.SlotReader(slot_dir) if slot_dir else None)
    sub = None if slot_dir else client.subscribe_weights(welcome["weights_endpoint"])
    get_latest = {"type": "get_latest", "name": name, "slots": slot_dir is not None}

    # Late-joiner catch-up: subscribe first, then fetch the latest, so no version falls in between.
    client.status["state"] = "catching_up"
    reply = client.request(get_latest, ("latest", "W"), timeout=60)
    if reply[0] == "W" and (applied := receiver.offer(reply[1])) is not None:
        applied.wait(60)
    log.info(
        "%s caught up at adapter version %d (new versions by %s)",
        name,
        engine.version,
        "shared memory" if slot_dir else "PUB socket",
    )

    server = Server(
        engine,
        model_path.name,
        max_tokens_default=gen.max_tokens,
        max_tokens_limit=gen.max_tokens_limit,
        api_token=config.security.api_token,
    )
    uv, http_thread, actual_port = start_in_thread(server.app, host, port)
    http_url = f"http://{host}:{actual_port}"
    client.status.update(state="serving", version=engine.version, http_url=http_url)
    client.send({"type": "ack", "name": name, "version": engine.version, "state": "serving", "http_url": http_url})
    log.info("%s serving on %s/v1", name, http_url)

    stopping = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stopping.set())
    signal.signal(signal.SIGINT, lambda *_: stopping.set())
    # Each version is acked the moment it is live, by the thread that swapped it in (the engine thread between two
    # steps, or this one when the engine is idle), on a socket of its own used under the engine's model lock: never
    # by two threads at once, so the ack does not wait for this thread's socket.
    engine.on_version = client.acker()
    poller = zmq.Poller()
    if sub is not None:
        poller.register(sub, zmq.POLLIN)
    poller.register(client.sock, zmq.POLLIN)
    try:
        while not stopping.is_set():
            for sock, _ in poller.poll(50):
                if sock is sub:
                    receiver.offer(sub.recv_multipart(copy=False))
                    continue
                while (msg := client.receive(0)) is not None:
                    if msg[0] == "W":
                        receiver.offer(msg[1])
                    elif msg[1]["type"] == "stop":
                        stopping.set()
                    elif msg[1]["type"] == slots.NOTICE:
                        announced = msg[1].get("version")
                        if (
                            receiver.offer(notice=msg[1]) is None
                            and isinstance(announced, int)
                            and engine.newest_version < announced
                        ):
                            client.send(get_latest)  # the slot was unreadable or rewritten: ask for the frames
            if not http_thread.is_alive():
                log.error("the HTTP server stopped unexpectedly")
                return 1
    finally:
        client.status["state"] = "stopping"
        uv.should_exit = True
        http_thread.join(10)
        engine.stop()
        if sub is not None:
            sub.close()
        client.close()
    return 0


def join(args: argparse.Namespace) -> int:
    """`runner worker generate --join tcp://HOST:PORT`."""
    import socket

    name = args.name or f"gen-{socket.gethostname()}-{__import__('os').getpid()}"
    return run_worker(args.join, name, args.host, args.port, model_override=args.model, curve=curve_from_args(args))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m workers.generation.worker")
    add_join_arguments(p)
    p.add_argument("--name", default=None)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=0)
    p.add_argument("--model", default=None)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return join(args)


if __name__ == "__main__":
    sys.exit(main())
