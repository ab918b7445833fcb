"""Weight fan-out latency: time from the learner's publish() to every local generation worker serving the new version,
next to the quickstart's mean step time (the push should cost a small fraction of a step: the goal is < 3%).

Two adapter shapes, each pushed >= 50 times through a real coordinator to real worker processes:
  - smollm2: rank 16, q/v on all 30 layers of SmolLM2-135M (hidden 576, 3 kv heads of 64)  ~3.7 MB
  - 14b:     rank 16, q/v on 8 layers of a 14B-shaped model (hidden 5120, 8 kv heads of 128) ~8.4 MB
Workers load a model directory with exactly those projection shapes (random/zero weights, tiny vocab and MLP), since
only the LoRA layout matters here. The floor is copying the same bytes once in one process (numpy memcpy), measured
right before every push. Each shape runs over both transports: "shm" (same-host shared-memory slots and the Unix
control socket, what the coordinator's own children use) and "socket" (frames over ZeroMQ on TCP, what a learner or
worker on another host uses, here on loopback). The quickstart step time is measured in the same run: `runner launch
configs/quickstart.toml` in a temporary directory, the mean wall time between consecutive steps of its metrics.jsonl
(rollouts, update and publish included; the first steps are warm-up).

    python bench/weights.py [--pushes 50] [--workers 1] [--shapes smollm2 14b] [--transports shm socket]
                            [--quickstart-steps 20]
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import mlx.core as mx
import numpy as np
from mlx.utils import tree_flatten

from runner.config import build_config
from runner.control import ControlClient, Publisher
from workers.learner.trainer import host_buffers
from workers.lora import LoraSpec, apply_lora, lora_tensors

COORDINATOR = """
import json, os, signal, sys
from pathlib import Path
from runner.config import build_config
from runner.coordinator import add_generation_workers, create_coordinator
config = build_config(json.loads(sys.argv[1]))
coord = create_coordinator(config, Path(sys.argv[2]) / "job.toml")
coord.grant("bench-learner", "learner", os.environ.pop("BENCH_LEARNER_TOKEN"))  # we play the learner
add_generation_workers(coord, config.generation.workers)
signal.signal(signal.SIGTERM, lambda *_: coord.request_stop("benchmark over"))
print(coord.local_endpoint or coord.control_endpoint, flush=True)  # what its local children join
sys.exit(coord.run())
"""

SHAPES = {
    # name: (hidden, heads, kv_heads, layers, lora layers)
    "smollm2": (576, 9, 3, 30, 30),
    "14b": (5120, 40, 8, 8, 8),
}


def make_model_dir(out: Path, hidden: int, heads: int, kv_heads: int, layers: int) -> Path:
    """A llama with the given attention shapes and a tiny vocab/MLP, weights in bf16 (content is irrelevant)."""
    from mlx_lm.models import llama

    from workers.models import build_tiny_tokenizer

    config = {
        "model_type": "llama",
        "hidden_size": hidden,
        "num_hidden_layers": layers,
        "intermediate_size": 64,
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "rms_norm_eps": 1e-5,
        "vocab_size": 512,
        "tie_word_embeddings": True,
        "max_position_embeddings": 2048,
    }
    out.mkdir(parents=True)
    build_tiny_tokenizer().save_pretrained(out)
    model = llama.Model(llama.ModelArgs.from_dict(config))
    model.set_dtype(mx.bfloat16)
    mx.save_safetensors(str(out / "model.safetensors"), dict(tree_flatten(model.parameters())))
    (out / "config.json").write_text(json.dumps(config))
    return out


def adapter_for(model_dir: Path, spec: LoraSpec) -> dict[str, mx.array]:
    from mlx_lm import load

    model, _ = load(str(model_dir))
    apply_lora(model, spec)
    return {k: mx.random.normal(v.shape) * 0.01 for k, v in lora_tensors(model).items()}


def run_shape(name: str, transport: str, pushes: int, workers: int, tmp: Path) -> dict:
    hidden, heads, kv, layers, lora_layers = SHAPES[name]
    model_dir = tmp / name
    if not model_dir.exists():
        make_model_dir(model_dir, hidden, heads, kv, layers)
    spec = LoraSpec(rank=16, scale=20.0, keys=["self_attn.q_proj", "self_attn.v_proj"], num_layers=lora_layers)
    config = build_config(
        {
            "model": {"path": str(model_dir)},
            "lora": {"rank": 16, "keys": spec.keys, "num_layers": lora_layers},
            "generation": {"workers": workers, "port": 0},
            "checkpoint": {"dir": str(tmp / f"run-{name}-{transport}")},
            "coordinator": {
                "control": "tcp://127.0.0.1:0",
                "weights": "tcp://127.0.0.1:0",
                "heartbeat_timeout": 60.0,
                "shared_memory": transport == "shm",
            },
        }
    )
    # The coordinator runs in its own process, as under `runner launch`, so it doesn't share this one's GIL.
    token = secrets.token_hex(16)  # the learner's role secret, in the coordinator's environment only
    coordinator = subprocess.Popen(
        [sys.executable, "-c", COORDINATOR, json.dumps(config.to_dict()), str(tmp)],
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "BENCH_LEARNER_TOKEN": token},
    )
    endpoint = coordinator.stdout.readline().strip()
    client = ControlClient(endpoint, "bench-learner", role="learner", token=token)
    publisher = Publisher(client, client.hello(), {})  # the learner's own publishing path
    tensors = adapter_for(model_dir, spec)
    nbytes = sum(t.nbytes for t in tensors.values())

    def versions() -> list[int]:
        status = client.request({"type": "status"}, ("status",), timeout=30)[1]
        return [w["version"] for w in status["workers"] if w["role"] == "generate" and w["state"] == "serving"]

    try:
        deadline = time.monotonic() + 300
        while len(versions()) < workers:
            if time.monotonic() > deadline:
                raise RuntimeError("workers did not become ready")
            time.sleep(0.1)
        host = [np.asarray(t) for t in tensors.values()]
        dst = [np.empty_like(h) for h in host]
        times, accepted, floor = [], [], []
        for v in range(1, pushes + 6):
            t0 = time.perf_counter()  # the floor, measured beside every push: this VM's speed drifts
            for h, d in zip(host, dst):
                np.copyto(d, h)
            floor.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            publisher.publish(v, v, host_buffers(tensors))  # as Trainer.lora_buffers() does
            t_pub = time.perf_counter() - t0
            publisher.wait_for_workers(v, threading.Event(), timeout=60)
            if v > 5:  # first pushes warm up allocations and sockets
                times.append(time.perf_counter() - t0)
                accepted.append(t_pub)
    finally:
        client.close()
        coordinator.send_signal(signal.SIGTERM)
        coordinator.wait(60)
    ms = np.array(times) * 1e3
    return {
        "shape": name,
        "transport": transport,
        "tensors": len(tensors),
        "mbytes": nbytes / 1e6,
        "p50": float(np.percentile(ms, 50)),
        "accepted_p50": float(np.median(accepted) * 1e3),
        "p95": float(np.percentile(ms, 95)),
        "floor": float(np.median(floor[5:]) * 1e3),
    }


def quickstart_step_ms(tmp: Path, steps: int, warmup: int = 3) -> float:
    """Mean wall time of one quickstart step, from a real `runner launch configs/quickstart.toml` run."""
    config = Path(__file__).resolve().parents[1] / "configs" / "quickstart.toml"
    run_dir = tmp / "quickstart-run"
    # Free ports, so the run does not collide with another job (or a test) on this machine.
    overrides = {"checkpoint.dir": str(run_dir), "learner.steps": steps}
    overrides.update({f"coordinator.{k}": "tcp://127.0.0.1:0" for k in ("control", "weights")})
    sets = [arg for key, value in overrides.items() for arg in ("--set", f"{key}={json.dumps(value)}")]
    with open(tmp / "quickstart.log", "wb") as out:
        code = subprocess.run(
            [sys.executable, "-m", "runner.cli", "launch", str(config), *sets], cwd=tmp, stdout=out, stderr=out
        ).returncode
    if code != 0:
        raise RuntimeError(f"the quickstart failed (exit {code}):\n{(tmp / 'quickstart.log').read_text()[-3000:]}")
    times = [json.loads(line)["time"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return float(np.mean(np.diff(times)[warmup:]) * 1e3)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--pushes", type=int, default=50)
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--shapes", nargs="*", default=list(SHAPES), choices=list(SHAPES))
    p.add_argument(
        "--transports",
        nargs="*",
        default=["shm", "socket"],
        choices=["shm", "socket"],
        help="shm: same-host shared-memory slots (the default for local processes); socket: frames over "
        "ZeroMQ, as for a learner or worker on another host",
    )
    p.add_argument("--quickstart-steps", type=int, default=20, help="steps of the quickstart run timed for comparison")
    args = p.parse_args()
    if args.quickstart_steps < 6:
        p.error("--quickstart-steps must be at least 6 (the first 3 steps are warm-up)")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        step_ms = quickstart_step_ms(Path(tmp), args.quickstart_steps)
        for name in args.shapes:
            for transport in args.transports:
                rows.append(run_shape(name, transport, args.pushes, args.workers, Path(tmp)))
    print(f"\nweight fan-out, {args.workers} local worker(s), {args.pushes} pushes each")
    print("(accepted = the coordinator validated and fanned it out; serving = every worker acked it)")
    print(f"quickstart mean step: {step_ms:.1f} ms (mean of {args.quickstart_steps - 4} steps after warm-up)")
    print(
        f"{'adapter':<9} {'transport':<9} {'tensors':>7} {'MB':>6} {'accepted p50':>12} {'serving p50':>11} "
        f"{'p95':>8} {'floor ms':>9} {'p50 % step':>10} {'p95 % step':>10}"
    )
    for r in rows:
        print(
            f"{r['shape']:<9} {r['transport']:<9} {r['tensors']:>7} {r['mbytes']:>6.1f} {r['accepted_p50']:>12.2f} "
            f"{r['p50']:>11.2f} {r['p95']:>8.2f} {r['floor']:>9.3f} {100 * r['p50'] / step_ms:>9.2f}% "
            f"{100 * r['p95'] / step_ms:>9.2f}%"
        )


if __name__ == "__main__":
    main()
