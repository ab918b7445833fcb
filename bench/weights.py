"""Weight fan-out latency: time from the learner's publish() to every local generation worker serving the new version.

Two adapter shapes, each pushed >= 50 times through a real coordinator to real worker processes:
  - smollm2: rank 16, q/v on all 30 layers of SmolLM2-135M (hidden 576, 3 kv heads of 64)  ~3.7 MB
  - 14b:     rank 16, q/v on 8 layers of a 14B-shaped model (hidden 5120, 8 kv heads of 128) ~8.4 MB
Workers load a model directory with exactly those projection shapes (random/zero weights, tiny vocab and MLP), since
only the LoRA layout matters here. The floor is copying the same bytes once in one process (numpy memcpy).

    python bench/weights.py [--pushes 50] [--workers 1]
"""

from __future__ import annotations

import argparse
import json
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import mlx.core as mx
import numpy as np
from mlx.utils import tree_flatten

from runner.config import build_config
from runner.control import ControlClient, model_id
from workers.lora import LoraSpec, apply_lora, lora_tensors
from workers.weights import encode_adapter

COORDINATOR = """
import json, signal, sys
from pathlib import Path
from runner.config import build_config
from runner.coordinator import add_generation_workers, create_coordinator
config = build_config(json.loads(sys.argv[1]))
coord = create_coordinator(config, Path(sys.argv[2]) / "job.toml")
add_generation_workers(coord, config.generation.workers)
signal.signal(signal.SIGTERM, lambda *_: coord.request_stop("benchmark over"))
print(coord.control_endpoint, flush=True)
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

    config = {"model_type": "llama", "hidden_size": hidden, "num_hidden_layers": layers, "intermediate_size": 64,
              "num_attention_heads": heads, "num_key_value_heads": kv_heads, "rms_norm_eps": 1e-5,
              "vocab_size": 512, "tie_word_embeddings": True, "max_position_embeddings": 2048}
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


def run_shape(name: str, pushes: int, workers: int, tmp: Path) -> dict:
    hidden, heads, kv, layers, lora_layers = SHAPES[name]
    model_dir = make_model_dir(tmp / name, hidden, heads, kv, layers)
    spec = LoraSpec(rank=16, scale=20.0, keys=["self_attn.q_proj", "self_attn.v_proj"], num_layers=lora_layers)
    config = build_config({
        "model": {"path": str(model_dir)},
        "lora": {"rank": 16, "keys": spec.keys, "num_layers": lora_layers},
        "generation": {"workers": workers, "port": 0},
        "checkpoint": {"dir": str(tmp / f"run-{name}")},
        "coordinator": {"control": "tcp://127.0.0.1:0", "weights": "tcp://127.0.0.1:0", "heartbeat_timeout": 60.0},
    })
    # The coordinator runs in its own process, as under `runner launch`, so it doesn't share this one's GIL.
    coordinator = subprocess.Popen([sys.executable, "-c", COORDINATOR, json.dumps(config.to_dict()), str(tmp)],
                                   stdout=subprocess.PIPE, text=True)
    endpoint = coordinator.stdout.readline().strip()
    client = ControlClient(endpoint, "bench-learner", role="learner")
    client.hello()
    base_id = model_id(model_dir)
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
        times, accepted = [], []
        for v in range(1, pushes + 6):
            t0 = time.perf_counter()
            client.send_weights(encode_adapter(v, v, base_id, {}, tensors))  # publish()
            client.send({"type": "wait_serving", "version": v})
            client.wait_for(("published",), timeout=60)
            t_pub = time.perf_counter() - t0
            client.wait_for(("serving",), timeout=60)
            if v > 5:  # first pushes warm up allocations and sockets
                times.append(time.perf_counter() - t0)
                accepted.append(t_pub)
    finally:
        client.close()
        coordinator.send_signal(signal.SIGTERM)
        coordinator.wait(60)

    host = [np.asarray(t) for t in tensors.values()]
    dst = [np.empty_like(h) for h in host]
    floor = []
    for _ in range(pushes):
        t0 = time.perf_counter()
        for h, d in zip(host, dst):
            np.copyto(d, h)
        floor.append(time.perf_counter() - t0)
    ms = np.array(times) * 1e3
    return {"shape": name, "tensors": len(tensors), "mbytes": nbytes / 1e6, "p50": float(np.percentile(ms, 50)),
            "accepted_p50": float(np.median(accepted) * 1e3),
            "p95": float(np.percentile(ms, 95)), "floor": float(np.median(floor) * 1e3)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--pushes", type=int, default=50)
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--shapes", nargs="*", default=list(SHAPES))
    args = p.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.shapes:
            rows.append(run_shape(name, args.pushes, args.workers, Path(tmp)))
    print(f"\nweight fan-out, {args.workers} local worker(s), {args.pushes} pushes each")
    print("(accepted = the coordinator validated and fanned it out; serving = every worker acked it)")
    print(f"{'adapter':<9} {'tensors':>7} {'MB':>6} {'accepted p50':>12} {'serving p50':>11} {'p95':>8} "
          f"{'floor ms':>9} {'p50/floor':>9}")
    for r in rows:
        print(f"{r['shape']:<9} {r['tensors']:>7} {r['mbytes']:>6.1f} {r['accepted_p50']:>12.2f} {r['p50']:>11.2f} "
              f"{r['p95']:>8.2f} {r['floor']:>9.3f} {r['p50'] / r['floor']:>9.1f}")


if __name__ == "__main__":
    main()
