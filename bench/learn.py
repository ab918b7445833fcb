"""Does a real model learn? SmolLM2-135M-Instruct on held-out arithmetic, runner vs mlx-lm-lora's `train_grpo`.

    python bench/learn.py [--config configs/smollm2_arithmetic.toml] [--steps N | --minutes M] [--seeds 1,2,3]
                          [--skip-peer] [--race] [--curve] [--eval-limit 500] [--keep DIR]

1. The model: `[model] path` (prepared with `runner models prepare` when missing), and a copy of it in `[model]
   dtype` written by mlx-lm (`workers.models.cast_model`, the very cast the workers and learner do at load), so the
   peer and the evaluator load exactly the weights runner trains on.
2. Held-out accuracy before training: the shared evaluator (below) on the base weights (greedy: once for all seeds).
3. For each seed S of `--seeds` (default 1, 2, 3):
   - runner: `runner launch CONFIG --set learner.seed=S` (S draws its prompt order and its sampling) for `--steps`
     steps, or until `--minutes` have passed (then it is stopped with SIGTERM; a step completed after the deadline
     does not count); the config's in-job `[eval]` is switched off (the peer has none; `--job-eval` keeps it). Every
     step is checkpointed, so the last step completed within the budget is the one evaluated.
   - the peer (skipped when `mlx_lm_lora` does not import): `train_grpo` in a child process on the same weights
     directory, training rows, reward (`numeric_answer`), group size, batch, completion length, temperature, learning
     rate, KL coefficient, clip band and LoRA rank/scale/keys/layers, for as many steps as runner made. Seeded with S
     too: `np.random.seed(S)` (its `iterate_grpo_batches` sorts the rows by prompt length, cuts batches and permutes
     them with NumPy's global generator: that permutation is its prompt order, which its own CLI seeds the same way)
     and `mx.random.seed(S)` (its sampling). Its batches are not runner's: the same rows, another order and grouping.
   - held-out accuracy after: the same evaluator on each side's final in-budget adapter.
4. The headline: the final in-budget held-out accuracy of each side, mean and standard error over the seeds
   (stdev / sqrt(seeds)), and the mean of the per-seed differences with its standard error.

`--race` asks the wall-time question: for each seed the peer runs `--steps` steps first, then runner gets half that
run's wall time (as many steps as fit); the figure compared is runner's final held-out accuracy in half the peer's wall
time against the peer's final held-out accuracy. `--curve` also evaluates runner's checkpoint every `[checkpoint]
interval` steps: a curve against wall time, each point as noisy as one evaluation (a standard error of about 2.2
points at 500 problems and 50%), so it is printed below the tables and is never the headline.

The evaluator: mlx-lm `batch_generate`, greedy, `[learner] max_tokens` tokens, the first `--eval-limit` (500) rows of
`[eval] path` through the chat template exactly as the dataset task encodes them, scored by the built-in
`numeric_answer` (correct = 1). It runs in a child process with the same BLAS preloaded as runner's workers.

Columns: `acc before/after` (held-out accuracy, %), `steps`, `wall` (process start to the last step: loading
included, in-job or final evaluation not), `s/step`, `tokens` (completion tokens generated for training), `wait /
train / publish` (runner: sums of the learner's wait_s, train_s, publish_s from metrics.jsonl; the peer: time in its
rollout generation / the rest of its steps), `peak RSS` (sum over every process of the job of its peak resident set,
VmHWM from /proc, read every 0.5 s while they run; the peer: its one process), `peak PSS` (the largest sum over the
job's processes of their proportional set size, smaps_rollup, sampled every 0.5 s: a page shared by several processes
counts once, where RSS counts it in each; the PSS of each process at that moment is printed). `reward` is the mean
training reward over the last 10 steps. The machine's load average is printed: on a shared machine the times are not
an idle one's.
Every process the bench starts is stopped when it ends, on an error or on Ctrl-C/SIGTERM.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.rl import CpuSampler, say, stop_launch  # noqa: E402
from runner.blas import blas_library, child_environment  # noqa: E402
from runner.config import Config, load_config  # noqa: E402
from runner.hub import resolve_model  # noqa: E402

FINAL = 10  # final training reward = mean over this many last steps


def _json_line(text: str) -> dict:
    """The last line of a child's stdout that is a JSON object (its result)."""
    for line in reversed(text.splitlines()):
        if line.startswith("{"):
            return json.loads(line)
    raise RuntimeError(f"no result line in: {text[-400:]}")


def child(args: list[str], env: dict, log: Path, timeout: float) -> dict:
    """Run `python bench/learn.py <args>` (one of the internal commands below) and return its JSON result."""
    with open(log, "w") as out:
        proc = subprocess.Popen(
            [sys.executable, __file__, *args], cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=out, text=True
        )
        try:
            stdout, _ = proc.communicate(timeout=timeout)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(args[:1])} failed (exit {proc.returncode}); see {log}")
    return _json_line(stdout)


def peak_rss() -> int:
    """This process's peak resident set in bytes (VmHWM), 0 without /proc."""
    return _vm_hwm(os.getpid()) or 0


def _proc_bytes(path: str, key: str) -> int | None:
    """A "Key:   N kB" line of a /proc file, in bytes; None when the process or the line is gone."""
    try:
        for line in Path(path).read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _vm_hwm(pid: int) -> int | None:
    return _proc_bytes(f"/proc/{pid}/status", "VmHWM")


def _pss(pid: int) -> int | None:
    """The process's proportional set size in bytes: its private pages plus its share of each page it shares (a
    file or shared mapping counted once over the processes that map it, where RSS counts it in each)."""
    return _proc_bytes(f"/proc/{pid}/smaps_rollup", "Pss")


class PeakRss(CpuSampler):
    """CpuSampler (every process under `root`) that also keeps each process's last VmHWM (its peak RSS so far) and
    the peak over the samples of the processes' summed PSS (`peak_pss`: what the job held at its fullest moment)."""

    def __init__(self, root: int, interval: float = 0.5):
        self.peaks: dict[tuple[int, int], int] = {}
        self.peak_pss = 0
        self.pss_by_role: dict[str, int] = {}  # each role's PSS at the moment of `peak_pss`
        super().__init__(root, interval)

    def sample(self) -> None:
        super().sample()
        if self.samples:
            pss: dict[str, int] = {}
            for pid, start in self.samples[-1][2]:
                hwm = _vm_hwm(pid)
                if hwm:
                    self.peaks[(pid, start)] = max(hwm, self.peaks.get((pid, start), 0))
                role = self.seen.get((pid, start), "?")
                pss[role] = pss.get(role, 0) + (_pss(pid) or 0)
            if sum(pss.values()) > self.peak_pss:
                self.peak_pss, self.pss_by_role = sum(pss.values()), pss

    def by_role(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for key, hwm in self.peaks.items():
            role = self.seen.get(key, "?")
            out[role] = out.get(role, 0) + hwm
        return out


# ------------------------------------------------------------------------------------------ internal child commands


def cmd_cast(src: str, dst: str, dtype: str) -> dict:
    """Write `src` in `dtype` (dequantized) as an mlx-lm directory at `dst`."""
    from mlx_lm.utils import save

    from workers.models import load_model

    model, tokenizer, config, path = load_model(src, dtype)
    for key in ("quantization", "quantization_config"):
        config.pop(key, None)
    save(dst, path, model, tokenizer, config)
    return {"path": dst}


def _eval_rows(config: Config, limit: int) -> list[dict]:
    from workers.learner.sources.dataset import load_examples

    return load_examples(config.eval.path, config.eval.split, "eval.path", limit=limit)


def cmd_eval(config_path: str, model: str, adapter: str, limit: int) -> dict:
    """Greedy held-out accuracy with mlx-lm's batch generation (the shared evaluator of every row)."""
    from mlx_lm import load
    from mlx_lm.generate import batch_generate

    from workers.learner.rewards import numeric_answer
    from workers.learner.sources.dataset import encode

    config = load_config(config_path)
    rows = _eval_rows(config, limit)
    net, tokenizer = load(model, adapter_path=adapter or None)
    prompts = [encode(tokenizer, row, config.source.chat_template) for row in rows]
    tic = time.perf_counter()
    out = batch_generate(net, tokenizer, prompts, max_tokens=config.learner.max_tokens, verbose=False)
    seconds = time.perf_counter() - tic
    correct = [numeric_answer(completion=text, answer=row.get("answer")) >= 1.0 for row, text in zip(rows, out.texts)]
    return {
        "accuracy": sum(correct) / len(rows),
        "n": len(rows),
        "seconds": seconds,
        "examples": [[row["prompt"], text] for row, text in list(zip(rows, out.texts))[:3]],
    }


def cmd_peer(config_path: str, model: str, out_dir: str, steps: int, seed: int) -> dict:
    """mlx-lm-lora's train_grpo on the config's data, reward and shape, in this process, seeded with `seed`; saves
    the adapter."""
    tic = time.time()  # its wall time counts loading, as runner's does
    import mlx.core as mx
    import numpy as np
    from mlx_lm import load
    from mlx_lm.tuner.utils import linear_to_lora_layers

    from bench.rl import train_grpo_peer
    from workers.learner.rewards import numeric_answer
    from workers.learner.sources.dataset import encode, load_examples
    from workers.lora import LoraSpec

    config = load_config(config_path)
    lc, lora = config.learner, config.lora
    memory = PeakRss(os.getpid())  # this process is the peer's whole job
    mx.random.seed(seed)  # its sampling
    np.random.seed(seed)  # its prompt order: iterate_grpo_batches permutes its batches with NumPy's global generator
    net, tokenizer = load(model)
    net.freeze()
    layers = len(net.layers) if lora.num_layers == -1 else lora.num_layers
    linear_to_lora_layers(
        net, layers, {"rank": lora.rank, "scale": lora.scale, "dropout": lora.dropout, "keys": lora.keys}
    )
    rows = load_examples(config.source.path, config.source.split)
    dataset = [(encode(tokenizer, r, config.source.chat_template), [], r["prompt"], str(r["answer"])) for r in rows]

    def numeric(prompts, completions, answer, types=None):
        return [numeric_answer(completion=c, answer=a) for c, a in zip(completions, answer)]

    rollout = {"seconds": 0.0, "tokens": 0}
    times: list[float] = []
    rewards: list[float] = []

    def record_rollouts(completions, texts, seconds):
        rollout["seconds"] += seconds
        rollout["tokens"] += sum(int(c.size) for c in completions)

    def record_step(info: dict) -> None:
        times.append(time.time())
        rewards.append(float(info["train_total_rewards_mean"]))
        print(f"step {info['iteration']}/{steps} reward {rewards[-1]:.3f} ({times[-1] - tic:.0f} s)", file=sys.stderr)

    out = Path(out_dir)
    started = time.time()  # the model is loaded: training starts
    with contextlib.redirect_stdout(sys.stderr):  # stdout carries only the result line
        train_grpo_peer(
            net,
            tokenizer,
            dataset,
            numeric,
            steps,
            out / "adapters.safetensors",
            group=lc.group_size,
            batch=lc.batch_size,
            max_tokens=lc.max_tokens,
            lr=lc.learning_rate,
            temperature=lc.temperature,
            beta=lc.kl_coef,
            clip=(lc.clip_low, lc.clip_high),
            on_step=record_step,
            on_rollouts=record_rollouts,
        )
    spec = LoraSpec(rank=lora.rank, scale=lora.scale, dropout=lora.dropout, keys=list(lora.keys), num_layers=layers)
    (out / "adapter_config.json").write_text(json.dumps(spec.adapter_config(len(net.layers)), indent=2))
    return {
        "steps": len(times),
        "wall": times[-1] - tic if times else float("nan"),
        "s_step": (times[-1] - times[0]) / (len(times) - 1) if len(times) > 1 else float("nan"),
        "reward": statistics.fmean(rewards[-FINAL:]) if rewards else float("nan"),
        "tokens": rollout["tokens"],
        "wait": rollout["seconds"],
        "train": times[-1] - started - rollout["seconds"] if times else float("nan"),  # all but rollouts
        "publish": None,
        "peak_rss": peak_rss(),
        "peak_pss": memory.peak_pss,
        "adapter": str(out),
    }


# ---------------------------------------------------------------------------------------------------- runner's row


def run_runner(
    config_path: Path,
    model: str,
    run_dir: Path,
    steps: int,
    minutes: float | None,
    job_eval: bool,
    extra: tuple[str, ...] = (),
    name: str = "runner",
) -> dict:
    """`runner launch` for `steps` steps or `minutes`, with the `extra` --set overrides; its summary row (peak RSS
    summed over its processes)."""
    sets = [
        f"model.path={json.dumps(model)}",
        f"checkpoint.dir={json.dumps(str(run_dir))}",
        f"learner.steps={steps}",
        # Every step's adapter: a --minutes deadline can fall mid-step (that step is lost when the learner is killed
        # after stop_grace), and the last completed step is what gets evaluated. Small files (LoRA + Adam state).
        "checkpoint.interval=1",
        "checkpoint.keep_last=100000",
        'coordinator.control="tcp://127.0.0.1:0"',  # free ports: other jobs may run on this machine
        'coordinator.weights="tcp://127.0.0.1:0"',
        "generation.port=0",
        *extra,
    ]
    if not job_eval:
        sets.append('eval.path=""')
    cmd = [sys.executable, "-m", "runner.cli", "launch", str(config_path)]
    for s in sets:
        cmd += ["--set", s]
    log_path = run_dir.parent / f"launch-{run_dir.name}.log"
    say(f"[{name}] runner launch {config_path.name} {' '.join(extra)} ... (log {log_path})")
    t0 = time.time()
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        sampler = PeakRss(proc.pid)
        budget = minutes * 60 if minutes else None
        # --minutes: SIGTERM at the deadline; the learner checkpoints its last completed step and the job stops.
        watchdog = threading.Timer(budget, proc.send_signal, (signal.SIGTERM,)) if budget else None
        if watchdog:
            watchdog.start()
        try:
            shown = 0
            while proc.poll() is None:
                time.sleep(2.0)
                metrics = _metrics(run_dir)
                for m in metrics[shown:]:
                    say(f"[{name}]   step {m['step']}  reward {m['reward_mean']:.3f}  ({m['time'] - t0:.0f} s)")
                shown = len(metrics)
        finally:
            if watchdog:
                watchdog.cancel()
            leftovers = stop_launch(proc, sampler)
    if leftovers:
        say(f"[{name}] killed processes left running: {', '.join(leftovers)}")
    metrics = _metrics(run_dir)
    if budget:  # a step the learner finished in its stop grace, after the deadline, does not count
        metrics = [m for m in metrics if m["time"] - t0 <= budget]
    if not metrics:
        raise RuntimeError(f"runner made no step (exit {proc.returncode}); see {log_path}")
    rss = sampler.by_role()
    say(f"[{name}] peak RSS by process: {', '.join(f'{k} {v / 2**30:.2f} GB' for k, v in sorted(rss.items()))}")
    pss = sampler.pss_by_role
    say(f"[{name}] PSS at the job's peak: {', '.join(f'{k} {v / 2**30:.2f} GB' for k, v in sorted(pss.items()))}")
    n = len(metrics)
    return {
        "steps": n,
        "wall": metrics[-1]["time"] - t0,
        "s_step": (metrics[-1]["time"] - metrics[0]["time"]) / (n - 1) if n > 1 else float("nan"),
        "reward": statistics.fmean(m["reward_mean"] for m in metrics[-FINAL:]),
        "tokens": sum(m.get("trained_tokens", 0) for m in metrics),
        "wait": sum(m.get("wait_s", 0.0) for m in metrics),
        "train": sum(m.get("train_s", 0.0) for m in metrics),
        "publish": sum(m.get("publish_s", 0.0) for m in metrics),
        "peak_rss": sum(rss.values()),
        "peak_pss": sampler.peak_pss,
        "pss_by_role": pss,
        "t0": t0,
        "budget": budget,
        "run_dir": str(run_dir),
        "evals": [m for m in _rows(run_dir) if "eval_accuracy" in m],
    }


def _rows(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(x) for x in path.read_text().splitlines() if x.strip()]


def _metrics(run_dir: Path) -> list[dict]:
    """The step rows of metrics.jsonl (eval rows left out), in step order."""
    rows = [m for m in _rows(run_dir) if "reward_mean" in m and isinstance(m.get("step"), int)]
    return sorted(rows, key=lambda m: m["step"])


def checkpoints(run_dir: Path) -> list[tuple[int, float, Path]]:
    """(step, time written, directory) of every complete checkpoint of a run."""
    out = []
    for d in sorted((run_dir / "checkpoints").glob("step_*")):
        state = d / "state.json"
        if state.is_file():
            s = json.loads(state.read_text())
            out.append((int(s["step"]), float(s.get("time", 0.0)), d))
    return out


def final_checkpoint(run_dir: Path, steps: int) -> tuple[int, float, Path] | None:
    """The checkpoint of the last step that counts (`steps`: the steps completed within the budget)."""
    kept = [c for c in checkpoints(run_dir) if c[0] <= steps]
    return max(kept, key=lambda c: c[0]) if kept else None


# ------------------------------------------------------------------------------------ shared with bench/offpolicy.py


def prepare_weights(config: Config, work: Path, env: dict, timeout: float) -> tuple[Path, Path]:
    """(the model directory runner loads, the weights in `[model] dtype` the evaluator and the peer load)."""
    model = ROOT / config.model.path  # the launch runs in ROOT; an absolute path stays as it is
    if not (model / "config.json").exists() and config.model.prepare:
        say(f"preparing {config.model.prepare} in {model}")
        subprocess.run(
            [sys.executable, "-m", "runner.cli", "models", "prepare", config.model.prepare, "--out", str(model)],
            check=True,
            stdout=subprocess.DEVNULL,
        )
    elif not model.exists():  # a Hugging Face id: its directory in the hub cache
        model = resolve_model(config.model.path, "[model] path")
    weights = model
    if config.model.dtype not in ("", "auto"):
        weights = work / f"{model.name}-{config.model.dtype}"
        if not (weights / "config.json").exists():
            child(["_cast", str(model), str(weights), config.model.dtype], env, work / "cast.log", timeout)
    say(f"weights for the evaluator and the peer: {weights}")
    return model, weights


def evaluate(
    config_path: Path, weights: Path, adapter: Path | None, limit: int, env: dict, log: Path, timeout: float, what: str
) -> dict:
    """Held-out accuracy of `weights` (+ `adapter`) by the shared evaluator, in a child process."""
    res = child(["_eval", str(config_path), str(weights), str(adapter or ""), str(limit)], env, log, timeout)
    if res["n"] < limit:
        say(f"[eval] the held-out set has {res['n']} problems, fewer than --eval-limit {limit}")
    say(
        f"[eval] {what}: {res['accuracy'] * 100:.1f}% of {res['n']} ({res['seconds']:.0f} s); e.g. {res['examples'][0]}"
    )
    return res


def mean_se(values: list[float]) -> tuple[float, float]:
    """Mean and its standard error (stdev / sqrt(n); nan for one value)."""
    se = statistics.stdev(values) / len(values) ** 0.5 if len(values) > 1 else float("nan")
    return statistics.fmean(values), se


def pm(values: list[float], scale: float = 100.0, fmt: str = ".1f") -> str:
    """'mean ± SE' of `values` x `scale` (the SE left out for one value)."""
    m, se = mean_se([v * scale for v in values])
    return format(m, fmt) if se != se else f"{m:{fmt}} ± {se:{fmt.lstrip('+')}}"


# ------------------------------------------------------------------------------------------------------------ report


def _gb(v: float | None) -> str:
    return "-" if not v else f"{v / 2**30:.2f} GB"


def _s(v: float | None) -> str:
    return "-" if v is None else f"{v:.0f}"


def table(base: dict, rows: list[tuple[str, int, dict, dict]]) -> str:
    """One line per run: (label, seed, its summary row, its final evaluation)."""
    head = (
        "| run | seed | acc before | acc after | d acc | steps | wall s | s/step | tokens | wait / train / publish s "
        "| reward (last 10) | peak RSS | peak PSS |"
    )
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for label, seed, r, after in rows:
        acc = after["accuracy"] * 100
        lines.append(
            f"| {label} | {seed} | {base['accuracy'] * 100:.1f}% | {acc:.1f}% | {acc - base['accuracy'] * 100:+.1f} | "
            f"{r['steps']} | {r['wall']:.0f} | {r['s_step']:.1f} | {r['tokens']} | "
            f"{_s(r['wait'])} / {_s(r['train'])} / {_s(r['publish'])} | {r['reward']:.3f} | {_gb(r['peak_rss'])} | "
            f"{_gb(r.get('peak_pss'))} |"
        )
    return "\n".join(lines)


def summary(base: dict, sides: list[tuple[str, list[tuple[int, dict, dict]]]]) -> str:
    """One line per side over its seeds: the final in-budget held-out accuracy as mean ± standard error."""
    head = (
        "| run | seeds | acc before | final held-out accuracy, mean ± SE | per seed | steps | wall s | s/step "
        "| peak RSS | peak PSS |"
    )
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for label, runs in sides:
        accs = [after["accuracy"] for _, _, after in runs]
        lines.append(
            f"| {label} | {', '.join(str(seed) for seed, _, _ in runs)} | {base['accuracy'] * 100:.1f}% | "
            f"**{pm(accs)}%** | {' / '.join(f'{a * 100:.1f}' for a in accs)} | "
            f"{pm([r['steps'] for _, r, _ in runs], 1, '.0f')} | {pm([r['wall'] for _, r, _ in runs], 1, '.0f')} | "
            f"{pm([r['s_step'] for _, r, _ in runs], 1, '.1f')} | {_gb(max(r['peak_rss'] for _, r, _ in runs))} | "
            f"{_gb(max(r.get('peak_pss') or 0 for _, r, _ in runs))} |"
        )
    return "\n".join(lines)


def _interrupt(*_) -> None:
    raise KeyboardInterrupt


def parse_seeds(text: str) -> list[int]:
    """'1,2,3' -> [1, 2, 3]: distinct non-negative integers."""
    try:
        seeds = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--seeds {text!r}: expected integers separated by commas") from None
    if not seeds or len(set(seeds)) != len(seeds) or min(seeds) < 0:
        raise argparse.ArgumentTypeError(f"--seeds {text!r}: expected distinct non-negative integers")
    return seeds


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    internal = {"_cast": cmd_cast, "_eval": cmd_eval, "_peer": cmd_peer}
    if argv and argv[0] in internal:  # a child process of this bench
        fn = internal[argv[0]]
        kinds = fn.__annotations__
        names = [k for k in kinds if k != "return"]
        values = [int(v) if kinds[k] == "int" else v for k, v in zip(names, argv[1:])]
        print(json.dumps(fn(*values)), flush=True)
        return 0
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", type=Path, default=ROOT / "configs" / "smollm2_arithmetic.toml")
    ap.add_argument("--steps", type=int, help="optimizer steps (default: the config's [learner] steps)")
    ap.add_argument(
        "--minutes", type=float, help="stop runner after this many minutes (then the peer runs as many steps)"
    )
    ap.add_argument("--seeds", type=parse_seeds, default=[1, 2, 3], help="[learner] seed of each run, e.g. 1,2,3")
    ap.add_argument("--eval-limit", type=int, default=500, help="held-out problems evaluated before and after")
    ap.add_argument(
        "--curve", action="store_true", help="also evaluate runner's checkpoint every [checkpoint] interval"
    )
    ap.add_argument("--job-eval", action="store_true", help="keep the config's in-job [eval] (off: the peer has none)")
    ap.add_argument("--skip-peer", action="store_true", help="do not run mlx-lm-lora's train_grpo")
    ap.add_argument(
        "--race",
        action="store_true",
        help="per seed, the peer runs --steps steps first; runner gets half its wall time",
    )
    ap.add_argument("--timeout", type=float, default=7200.0, help="seconds one evaluation or the peer may take")
    ap.add_argument("--keep", help="a directory to keep the runs in (default: a temp dir, removed at the end)")
    args = ap.parse_args(argv)
    if args.race and (args.skip_peer or args.minutes):
        ap.error("--race sets runner's budget from the peer's run: it goes with neither --skip-peer nor --minutes")
    signal.signal(signal.SIGTERM, _interrupt)
    config_path = args.config.resolve()
    config = load_config(config_path)
    steps = args.steps or config.learner.steps
    env = child_environment(blas_library(config.coordinator.blas))
    peer_missing, peer_label = None, "mlx-lm-lora train_grpo"
    if not args.skip_peer:
        try:
            import mlx_lm_lora

            peer_label = f"mlx-lm-lora {mlx_lm_lora.__version__} train_grpo"
        except ImportError as e:
            peer_missing = f"mlx_lm_lora does not import ({e}); `pip install -e '.[bench]'` adds it"
            if args.race:
                raise SystemExit(f"--race needs the peer: {peer_missing}") from e
            say(f"[peer] skipped: {peer_missing}")

    with contextlib.ExitStack() as stack:
        if args.keep:
            work = Path(args.keep).resolve()
            work.mkdir(parents=True, exist_ok=True)
        else:
            work = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="bench-learn-")))
        say(f"{os.cpu_count()} cores; load average at start {os.getloadavg()[0]:.2f}; runs in {work}")
        model, weights = prepare_weights(config, work, env, args.timeout)

        def evaluate_here(what: str, adapter: Path | None, log: str) -> dict:
            return evaluate(config_path, weights, adapter, args.eval_limit, env, work / log, args.timeout, what)

        def run_peer(seed: int, peer_steps: int) -> tuple[dict, dict]:
            out, log = work / f"peer-s{seed}", work / f"peer-s{seed}.log"
            say(f"[peer s{seed}] mlx-lm-lora train_grpo, {peer_steps} steps, seed {seed} ... (log {log})")
            peer = child(
                ["_peer", str(config_path), str(weights), str(out), str(peer_steps), str(seed)], env, log, args.timeout
            )
            say(f"[peer s{seed}] {peer['steps']} steps in {peer['wall']:.0f} s")
            return peer, evaluate_here(f"mlx-lm-lora, seed {seed}", Path(peer["adapter"]), f"eval-peer-s{seed}.log")

        base = evaluate_here("base", None, "eval-base.log")
        runs: list[tuple[int, dict, dict]] = []  # runner: (seed, summary row, final evaluation)
        peers: list[tuple[int, dict, dict]] = []
        curves: list[tuple[int, list[tuple[int, float, float]]]] = []
        for seed in args.seeds:
            minutes, runner_steps = args.minutes, steps
            if args.race:
                peer, peer_after = run_peer(seed, steps)
                peers.append((seed, peer, peer_after))
                minutes = peer["wall"] / 2 / 60
                say(f"[runner s{seed}] budget: half the peer's wall time, {minutes * 60:.0f} s")
            if minutes:
                runner_steps = max(steps, 100_000)  # the clock stops it
            run_dir = work / f"runner-s{seed}"
            r = run_runner(
                config_path,
                str(model),
                run_dir,
                runner_steps,
                minutes,
                args.job_eval,
                (f"learner.seed={seed}",),
                name=f"runner s{seed}",
            )
            final = final_checkpoint(run_dir, r["steps"])
            if final is None:
                raise RuntimeError(f"runner, seed {seed}: no checkpoint of a step within the budget in {run_dir}")
            after = evaluate_here(f"runner step {final[0]}, seed {seed}", final[2], f"eval-runner-s{seed}.log")
            runs.append((seed, r, after))
            if args.curve:  # the config's checkpoint interval, and the last step
                every = config.checkpoint.interval
                points = []
                for step, written, path in checkpoints(run_dir):
                    if step <= r["steps"] and (step % every == 0 or step == final[0]):
                        what, log = f"runner step {step}, seed {seed}", f"eval-runner-s{seed}-step{step}.log"
                        res = after if step == final[0] else evaluate_here(what, path, log)
                        points.append((step, written - r["t0"], res["accuracy"]))
                curves.append((seed, points))
            if not args.skip_peer and not peer_missing and not args.race:
                peer, peer_after = run_peer(seed, r["steps"])
                peers.append((seed, peer, peer_after))

        lc = config.learner
        runner_label = "runner, half the peer's wall time" if args.race else "runner"
        say("")
        say(
            f"{config_path.name}: group {lc.group_size} x {lc.batch_size} prompts, {lc.max_tokens} tokens, LoRA r"
            f"{config.lora.rank} on {len(config.lora.keys)} linears x {config.lora.num_layers} layers, lr "
            f"{lc.learning_rate}, async_depth {lc.async_depth}; held-out accuracy: greedy, {base['n']} problems, "
            f"the last step within the budget; seeds {', '.join(map(str, args.seeds))}; load average at end "
            f"{os.getloadavg()[0]:.2f} on {os.cpu_count()} cores"
        )
        say("")
        rows = [(runner_label, seed, r, after) for seed, r, after in runs]
        rows += [(peer_label, seed, r, after) for seed, r, after in peers]
        say(table(base, rows))
        say("")
        sides = [(runner_label, runs)] + ([(peer_label, peers)] if peers else [])
        say(summary(base, sides))
        say("")
        accs = [after["accuracy"] for _, _, after in runs]
        mean = statistics.fmean(accs) * 100
        walls = [r["wall"] for _, r, _ in runs]
        say(
            f"runner: final held-out accuracy {pm(accs)}% (mean ± SE over {len(accs)} seeds; base "
            f"{base['accuracy'] * 100:.1f}%) in at most {max(walls) / 60:.1f} min (target: >= 65% within 30 min): "
            + ("met" if mean >= 65 and max(walls) <= 1800 else "NOT met")
        )
        if peers:
            by_seed = {seed: after["accuracy"] for seed, _, after in peers}
            diffs = [(after["accuracy"] - by_seed[seed]) * 100 for seed, _, after in runs if seed in by_seed]
            when = "in half the peer's wall time" if args.race else "after as many steps as the peer"
            say(
                f"runner {when} minus the peer, per seed: {', '.join(f'{x:+.1f}' for x in diffs)} points; mean "
                f"{pm(diffs, 1, '+.1f')} (target: runner >= peer): "
                + ("met" if statistics.fmean(diffs) >= 0 else "NOT met")
            )
        for seed, r, _ in runs:
            for m in r["evals"]:
                say(f"runner seed {seed} in-job eval at step {m['step']}: accuracy {m['eval_accuracy'] * 100:.1f}%")
        if curves:
            say("")
            say(
                f"runner held-out accuracy by checkpoint (each point one evaluation of {base['n']} problems: noisy, "
                f"a standard error of up to {50 / base['n'] ** 0.5:.1f} points; the figure above is the last point "
                "within the budget):"
            )
            for seed, points in curves:
                say(f"  seed {seed}: " + ", ".join(f"step {s} ({t:.0f} s) {a * 100:.1f}%" for s, t, a in points))
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        print("interrupted: every process the bench started has been stopped", file=sys.stderr)
        sys.exit(130)
