"""Seconds per GRPO step vs a plain mlx-lm LoRA training step, same model, same LoRA, same batch, same optimizer.

    python bench/learner.py                      # tiny random model (prepared in a temp dir)
    python bench/learner.py --model models/smollm2 --batch 4 --prompt 24 --completion 24 --steps 3

The plain step is what `mlx_lm.tuner.trainer.train` runs: `nn.value_and_grad(model, default_loss)` over the [B, T]
tokens, `optimizer.update`, `mx.eval` -- both eager and `mx.compile`d as mlx-lm does. The GRPO step is
`Trainer.step(batch)` end to end (padding, advantages, loss with stop-gradient old log-probs, clipping, update,
metrics). Steps alternate between the two so drift in machine load hits both; the median after warmup is reported.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np
from mlx_lm.tuner.trainer import default_loss

from runner.config import LearnerConfig
from workers.learner.sources.base import Batch, Sample
from workers.learner.trainer import Trainer
from workers.lora import LoraSpec


def make_batch(groups: int, group_size: int, prompt: int, completion: int, vocab: int, seed: int = 0) -> Batch:
    """Fixed-length synthetic rollouts (so both steps see exactly the same [B, T] tokens)."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(groups):
        p = rng.integers(3, vocab, prompt).tolist()
        g = []
        for _ in range(group_size):
            c = rng.integers(3, vocab, completion).tolist()
            lp = (-rng.random(completion) * 5).tolist()
            g.append(Sample.from_completion(p, c, float(rng.random()), lp))
        out.append(g)
    return Batch(out)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", help="model directory (default: a freshly prepared tiny model)")
    ap.add_argument("--groups", type=int, default=4)
    ap.add_argument("--group-size", type=int, default=8)
    ap.add_argument("--prompt", type=int, default=32)
    ap.add_argument("--completion", type=int, default=32)
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--keys", default="self_attn.q_proj,self_attn.v_proj")
    ap.add_argument("--kl-coef", type=float, default=0.0)
    ap.add_argument("--micro-batch", type=int, default=0)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=2)
    return ap.parse_args(argv)


def fresh(batch: Batch, version: int) -> Batch:
    """The batch as if sampled at `version` (one batch is trained again and again: it must stay fresh)."""
    for s in batch.samples:
        s.version = version
    return batch


def step_functions(trainer: Trainer, batch: Batch, prompt: int) -> dict[str, Callable[[], None]]:
    """The three steps on the same model and batch: mlx-lm's plain LoRA step (eager and compiled) and Trainer.step."""
    model = trainer.model
    B, T = len(batch.samples), len(batch.samples[0].tokens)
    tokens = mx.array(np.array([s.tokens for s in batch.samples], dtype=np.int32))
    lengths = mx.array(np.array([[prompt, T - 1]] * B, dtype=np.int32))  # train the completion positions
    opt = optim.Adam(learning_rate=1e-5, bias_correction=True)
    loss_value_and_grad = nn.value_and_grad(model, default_loss)

    def plain_step():
        (loss, ntoks), grad = loss_value_and_grad(model, tokens, lengths)
        opt.update(model, grad)
        mx.eval(model.parameters(), opt.state, loss)

    state = [model.state, opt.state, mx.random.state]

    @partial(mx.compile, inputs=state, outputs=state)
    def compiled_inner(tokens, lengths):
        (loss, ntoks), grad = loss_value_and_grad(model, tokens, lengths)
        opt.update(model, grad)
        return loss

    def compiled_step():
        loss = compiled_inner(tokens, lengths)
        mx.eval(state, loss)

    return {
        "mlx-lm LoRA step (eager)": plain_step,
        "mlx-lm LoRA step (mx.compile)": compiled_step,
        "GRPO step (Trainer.step)": lambda: trainer.step(fresh(batch, trainer.version)),
    }


def median_seconds(runs: dict[str, Callable[[], None]], warmup: int, steps: int) -> dict[str, float]:
    """Alternating runs, so drift in machine load hits every step alike; the median after warmup."""
    times: dict[str, list[float]] = {k: [] for k in runs}
    for i in range(warmup + steps):
        for name, fn in runs.items():
            tic = time.perf_counter()
            fn()
            dt = time.perf_counter() - tic
            if i >= warmup:
                times[name].append(dt)
    return {k: statistics.median(v) for k, v in times.items()}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    tmp = None
    model_path = args.model
    if not model_path:
        from workers.models import prepare_tiny

        tmp = tempfile.TemporaryDirectory()
        model_path = prepare_tiny(Path(tmp.name) / "tiny")

    spec = LoraSpec(rank=args.rank, keys=args.keys.split(","))
    cfg = LearnerConfig(
        learning_rate=1e-5,
        kl_coef=args.kl_coef,
        micro_batch_size=args.micro_batch,
        group_size=args.group_size,
        batch_size=args.groups,
    )
    trainer = Trainer.load(model_path, cfg, spec)
    vocab = trainer.model.args.vocab_size if hasattr(trainer.model, "args") else 512
    batch = make_batch(args.groups, args.group_size, args.prompt, args.completion, vocab)
    B, T = len(batch.samples), args.prompt + args.completion
    med = median_seconds(step_functions(trainer, batch, args.prompt), args.warmup, args.steps)

    print(
        f"model {model_path}  batch {B} x {T} tokens ({args.groups} groups of {args.group_size}, prompt "
        f"{args.prompt} + completion {args.completion})  LoRA rank {args.rank} on {args.keys}  kl_coef "
        f"{args.kl_coef}  micro_batch {args.micro_batch or 'all'}  median of {args.steps} after {args.warmup} warmup"
    )
    print(f"{'step':34s} {'s/step':>9s} {'tok/s':>9s} {'vs eager':>9s} {'vs compiled':>12s}")
    base_e, base_c = med["mlx-lm LoRA step (eager)"], med["mlx-lm LoRA step (mx.compile)"]
    for name, t in med.items():
        print(f"{name:34s} {t:9.4f} {B * T / t:9.0f} {t / base_e:8.2f}x {t / base_c:11.2f}x")
    ratio = med["GRPO step (Trainer.step)"] / min(base_e, base_c)
    print(f"GRPO / fastest plain step = {ratio:.2f}x (target <= 1.15x)")
    if tmp:
        tmp.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
