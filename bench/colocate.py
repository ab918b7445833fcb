"""What `[generation] colocate` costs in speed: rollouts beside training, in one process or in two.

    python bench/colocate.py [--model models/smollm2] [--rounds 3]

The config's shape on SmolLM2 float32 (configs/smollm2_arithmetic.toml: LoRA rank 8 on the seven linears of the last
16 blocks, 4 prompts x 8 completions x 16 tokens at temperature 0.7, one group per training micro-batch), three ways:
- `alone`: the engine generates `--rounds` batches with nothing else running;
- `one process`: the same while a thread of the same process trains (forward and backward passes of one group, over
  and over), the engine serving a weight-sharing copy of the trainer's model, as `colocate = true` runs them;
- `two processes`: the same while another process trains, as `colocate = false` runs them.
Each row: the seconds the rollouts took, and the seconds per training pass meanwhile. Both sides get the BLAS and
thread settings `runner launch` gives its children (OpenBLAS preloaded when installed, one thread each).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from runner.blas import blas_library, child_environment  # noqa: E402

KEYS = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj"]
KEYS += ["mlp.up_proj", "mlp.down_proj"]


def trainer(model: str):
    from runner.config import LearnerConfig
    from workers.learner.trainer import Trainer
    from workers.lora import LoraSpec

    spec = LoraSpec(rank=8, scale=20.0, keys=KEYS, num_layers=16)
    t = Trainer.load(model, LearnerConfig(micro_batch_size=8, temperature=0.7), spec, dtype="float32")
    t.warm_up()
    return t


def train_until(t, stop: threading.Event | float) -> tuple[int, float]:
    """Training passes until `stop` is set (or its time has come); (passes, seconds)."""
    n, tic = 0, time.perf_counter()
    while not (stop.is_set() if isinstance(stop, threading.Event) else time.time() >= stop):
        t.warm_up(prompt_tokens=40)  # one forward and backward pass over a group, nothing updated
        n += 1
    return n, time.perf_counter() - tic


def rollouts(engine, tokenizer, rounds: int) -> float:
    from workers.generation.engine import SamplingParams

    prompt = list(
        tokenizer.apply_chat_template([{"role": "user", "content": "What is 12+7?"}], add_generation_prompt=True)
    )

    async def run() -> float:
        loop, tic = asyncio.get_running_loop(), time.perf_counter()
        for _ in range(rounds):
            reqs = [
                engine.submit(prompt, SamplingParams(max_tokens=16, temperature=0.7), n=8, loop=loop) for _ in range(4)
            ]
            for r in reqs:
                while not all(c.finish_reason for c in r.completions):
                    event = await r.events.get()
                    if event[0] == "error":
                        raise RuntimeError(event)
        return time.perf_counter() - tic

    return asyncio.run(run())


def measure(model: str, rounds: int) -> list[tuple[str, float, float | None]]:
    import mlx.core as mx

    from workers.generation.server import engine_over
    from workers.models import weight_sharing_copy

    t = trainer(model)
    mx.eval(t.model.parameters())
    engine = engine_over(weight_sharing_copy(t.model), t.tokenizer, Path(model), max_batch=32).start()
    engine.warm_up()
    rows = [("alone", rollouts(engine, t.tokenizer, rounds), None)]
    stop = threading.Event()
    result: list = []
    worker = threading.Thread(target=lambda: result.append(train_until(t, stop)))
    worker.start()
    seconds = rollouts(engine, t.tokenizer, rounds)
    stop.set()
    worker.join()
    rows.append(("one process (colocate = true)", seconds, result[0][1] / max(result[0][0], 1)))
    # The other process trains from before the rollouts start until well after they end.
    until = time.time() + 20 + 4 * seconds
    other = subprocess.Popen(
        [sys.executable, __file__, "_train", model, str(until)], stdout=subprocess.PIPE, text=True, env=os.environ
    )
    try:
        time.sleep(15)  # its model loaded and training
        seconds = rollouts(engine, t.tokenizer, rounds)
        out = other.communicate(timeout=120 + 4 * seconds)[0].split()
    finally:
        if other.poll() is None:
            other.kill()
    rows.append(("two processes (colocate = false)", seconds, float(out[1]) / max(int(out[0]), 1)))
    engine.stop()
    return rows


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "_train":  # the other process of the last row: "passes seconds" on stdout
        n, seconds = train_until(trainer(argv[1]), float(argv[2]))
        print(n, seconds)
        return 0
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=str(ROOT / "models" / "smollm2"))
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args(argv)
    library = blas_library("auto")
    if library and library not in os.environ.get("LD_PRELOAD", ""):  # preload it as the launch does: re-exec
        os.execve(sys.executable, [sys.executable, __file__, *argv], child_environment(library, processes=2))
    rows = measure(args.model, args.rounds)
    print(f"\n{args.rounds} batches of 4 x 8 completions x 16 tokens; BLAS {os.environ.get('LD_PRELOAD') or 'MLX'}")
    print("| rollouts beside training | rollout seconds | vs alone | training s per pass meanwhile |")
    print("|---|---|---|---|")
    for name, seconds, per_pass in rows:
        extra = "-" if per_pass is None else f"{per_pass:.2f}"
        print(f"| {name} | {seconds:.1f} | {seconds / rows[0][1]:.2f}x | {extra} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
