"""Synchronous vs asynchronous RL on the quickstart, and the peer (mlx-lm-lora's `train_grpo`) on the same task.

    python bench/rl.py [--steps 40] [--depths 0 1 2] [--workers 1 2] [--skip-peer] [--keep DIR]

Every runner row is one `runner launch configs/quickstart.toml` (tiny random llama, `target_tokens` task, group 8 x 4
prompts, 16 tokens, LoRA rank 8 on all seven linears, lr 5e-4) in a temp run dir, with `--set generation.workers=W
--set learner.async_depth=D --set learner.max_staleness=D` (the quickstart's own are 1 and 1). So the "sync" rows
(D = 0) are synchronous: before each step the learner waits until every worker serves its current version v
(workers/learner/main.py: `before_step` waits for `trainer.version - max_staleness`), no rollout runs while it
trains, and every token is trained at the version that sampled it; the bench checks that the metrics' staleness was 0
at every step of those rows and says so below the table.

The peer row calls mlx-lm-lora's `train_grpo` in this process on the same model, the same prompts
(`TargetTokensTask.prompt(0 .. steps*4-1)`), the same reward (`TargetTokensTask.reward` on the sampled token ids),
group size, batch, completion length, LoRA rank/scale/targets, optimizer (Adam, lr 5e-4), temperature 1 with no
top-k/top-p truncation, no KL term and token-summed loss ("bnpo", like runner's `loss_agg = "token"`), for the same
number of steps. Its batches are its own: `iterate_grpo_batches` sorts the prompts by length, cuts batches of 4 and
draws their order from NumPy's global generator, which the bench seeds (0), as it seeds MLX's (0). mlx-lm-lora 5.10.2
computes its loss on the token ids it sampled and hands its reward functions the decoded text; the bench's reward
function scores the recorded ids instead of that text (older releases, e.g. its repository at commit 0235704,
re-encoded the decoded text for the loss, which need not give back the sampled ids). The peer is optional (`pip
install -e ".[bench]"`): when `mlx_lm_lora` does not import, a line says so and its row is skipped.

Columns of the table:
- `s/step`: mean wall time per step = (time of the last step's metrics line - time of the first's) / (steps - 1),
  from the `time` field of metrics.jsonl (the peer: the same from its per-step report callback). Step 1 (model load,
  first compile, first rollouts) is left out.
- `speed-up`: the synchronous run's s/step (same worker count) / this row's.
- `ideal`, `% ideal`: the ideal speed-up of overlapping rollouts with training, (rollout + train) / max(rollout,
  train), from the synchronous run's own per-step breakdown (same worker count); `% ideal` = speed-up / ideal.
  Rollout = mean `wait_s` (the learner waiting for the workers' version and the batch's rollouts), train = mean
  `train_s` (Trainer.step), from metrics.jsonl, steps 2..N; a learner that does not record `wait_s` (before
  async_depth existed) gives train = `seconds` and rollout = s/step - train. Publishing (`publish_s`, ~10 ms) counts
  in neither; it is printed with the breakdown below the table.
- `gen busy`: the generation workers' busy fraction, mean over steps 2..N of the metrics' `gen_busy` (time in decode
  steps from each worker's /metrics over wall time x workers), `-` when the metrics do not have it.
- `staleness`: mean over steps of the metrics' token-weighted staleness (versions between the version that sampled a
  token and the learner's when trained on it), and after the slash the largest over all steps.
- `reward`: final reward = mean of `reward_mean` over the last 10 steps; `d reward` = this row's minus synchronous.
- `/peer`: this row's s/step / the peer's (target: <= 0.40 at a final reward equal to the peer's or better; equal =
  within twice the standard error of the difference of the two last-10-step means).
- `CPU learner`, `CPU gen`, `CPU coord`, `CPU other`: how the processes share the cores while they overlap: CPU
  seconds (utime + stime from /proc/PID/stat, sampled every 0.5 s) per wall second between the first and the last
  step, for the learner, each generation worker (`a+b`, its HTTP front process included), the coordinator (`runner
  launch`), and every other process on the machine (from /proc/stat: busy time of all cores minus ours), so a
  loaded machine shows. The peer row's
  `CPU learner` is this process. `CPU-s/step`: s/step x the job's own CPU seconds per wall second (all but `CPU
  other`): the CPU time a step costs, which depends less on what else runs on the machine than s/step does. `CPU
  util`: the job's CPU seconds per wall second over the machine's cores, i.e. how busy the job kept the machine. It
  is a utilisation, not a bound: a row that wastes CPU (spinning, duplicated work) scores higher, and nothing says
  another schedule could not take less time per step. Linux only (`-` elsewhere).

Every process the bench starts is stopped when it ends, on an error or on Ctrl-C/SIGTERM: `runner launch` gets
SIGTERM (its own bounded shutdown), then SIGKILL after its stop_grace, and any of its children still alive is
SIGKILLed.
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

from runner.blas import blas_library, child_environment  # noqa: E402

# The quickstart's task shape (configs/quickstart.toml); the peer is given the same.
GROUP, BATCH, MAX_TOKENS, RANK, SCALE, LR = 8, 4, 16, 8, 20.0, 5e-4
KEYS = [f"self_attn.{k}_proj" for k in "qkvo"] + [f"mlp.{k}_proj" for k in ("gate", "up", "down")]
FINAL = 10  # final reward = mean over this many last steps
STOP_GRACE = 20.0  # [coordinator] stop_grace default: how long `runner launch` may take to stop

# The learner's per-step metrics (workers/learner/main.py): wait for the workers' version and the rollouts, training,
# publishing, generation busy fraction; `seconds` (Trainer.step) and `staleness` are there in every version.
WAIT_KEYS = ("wait_s",)
TRAIN_KEYS = ("train_s", "seconds")
PUBLISH_KEYS = ("publish_s",)
BUSY_KEYS = ("gen_busy",)
STALE_KEYS = ("staleness_mean", "staleness")

HZ = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def say(msg: str) -> None:
    print(msg, flush=True)


# --------------------------------------------------------------------------------------------- CPU sampling (/proc)


def _proc_stat(pid: int) -> tuple[int, float, int] | None:
    """(ppid, CPU seconds utime+stime, start time in ticks) of a process, or None when it is gone."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    # After the command: state ppid ... utime(12) stime(13) ... starttime(20), 0-based from state.
    return int(fields[1]), (int(fields[11]) + int(fields[12])) / HZ, int(fields[19])


def machine_busy() -> float | None:
    """CPU seconds all cores have been busy since boot (/proc/stat), or None without /proc."""
    try:
        v = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    except OSError:
        return None
    # user nice system idle iowait irq softirq steal: everything but idle and iowait is busy.
    return (sum(v[:8]) - v[3] - v[4]) / HZ


def _role(pid: int, root: int) -> str:
    if pid == root:
        return "coord"
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0")
    except OSError:
        return f"?pid {pid}"
    if "workers.generation.front" in argv:
        return "front"
    if "--name" in argv and argv.index("--name") + 1 < len(argv):
        return argv[argv.index("--name") + 1]
    return "?" + " ".join(argv)[:80]  # not (yet) a named child: looked at again at the next sample


class CpuSampler:
    """Every `interval` s: the CPU seconds of `root` and each of its descendants, and the machine's busy seconds.
    It also remembers every descendant (pid, start time), so they can be killed after `root` has gone."""

    def __init__(self, root: int, interval: float = 0.5):
        self.root, self.interval = root, interval
        self.samples: list[tuple[float, float | None, dict[tuple[int, int], float]]] = []
        self.seen: dict[tuple[int, int], str] = {}  # (pid, start time) -> role
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.sample()

    def sample(self) -> None:
        if not Path("/proc/self/stat").exists():
            return
        stats = {}
        for d in os.listdir("/proc"):
            if d.isdigit():
                s = _proc_stat(int(d))
                if s is not None:
                    stats[int(d)] = s
        tree, frontier = set(), [self.root]
        children: dict[int, list[int]] = {}
        for pid, (ppid, _, _) in stats.items():
            children.setdefault(ppid, []).append(pid)
        while frontier:
            pid = frontier.pop()
            if pid in stats and pid not in tree:
                tree.add(pid)
                frontier += children.get(pid, [])
        cpu = {}
        for pid in tree:
            key = (pid, stats[pid][2])
            if self.seen.get(key, "").startswith("?"):  # seen between fork and exec: its command line was the parent's
                del self.seen[key]
            if key not in self.seen:
                self.seen[key] = _role(pid, self.root)
                if self.seen[key] == "front":  # a generation worker's HTTP front counts as part of that worker
                    parent = (stats[pid][0], stats.get(stats[pid][0], (0, 0.0, 0))[2])
                    self.seen[key] = self.seen.get(parent, "?") + " front"
            cpu[key] = stats[pid][1]
        self.samples.append((time.time(), machine_busy(), cpu))

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()

    def rates(self, t0: float, t1: float) -> dict[str, float] | None:
        """CPU seconds per wall second between t0 and t1 for each role, and `other` (the rest of the machine)."""
        inside = [s for s in self.samples if t0 <= s[0] <= t1]
        if len(inside) < 2:
            return None
        (a_t, a_busy, a), (b_t, b_busy, b) = inside[0], inside[-1]
        wall = b_t - a_t
        out: dict[str, float] = {}
        for key, cpu in b.items():
            role = self.seen[key]
            out[role] = out.get(role, 0.0) + (cpu - a.get(key, 0.0)) / wall
        if a_busy is not None and b_busy is not None:
            out["other"] = max(0.0, (b_busy - a_busy) / wall - sum(out.values()))
        return out

    def kill_leftovers(self) -> list[str]:
        """SIGKILL every descendant seen that still runs (same pid and start time); returns their roles."""
        killed = []
        for (pid, start), role in self.seen.items():
            s = _proc_stat(pid)
            if pid != self.root and s is not None and s[2] == start:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
                    killed.append(f"{role} ({pid})")
        return killed


# ------------------------------------------------------------------------------------------------------ runner rows


def _first(record: dict, keys: tuple[str, ...]) -> float | None:
    for k in keys:
        if isinstance(record.get(k), (int, float)):
            return float(record[k])
    return None


def _mean(values: list[float | None]) -> float | None:
    values = [v for v in values if v is not None]
    return statistics.fmean(values) if values else None


def _standard_error(values: list[float]) -> float:
    """Of the mean of `values`: the noise of a final reward, which decides when two rewards count as equal."""
    return statistics.stdev(values) / len(values) ** 0.5 if len(values) > 1 else float("nan")


def summarize(metrics: list[dict]) -> dict:
    """s/step, final reward and the time breakdown of one run's metrics.jsonl lines (step 1 left out)."""
    metrics = sorted((m for m in metrics if isinstance(m.get("step"), int)), key=lambda m: m["step"])
    n = len(metrics)
    steady = metrics[1:] if n > 1 else metrics
    per_step = (metrics[-1]["time"] - metrics[0]["time"]) / (n - 1) if n > 1 else float("nan")
    train = _mean([_first(m, TRAIN_KEYS) for m in steady])
    rollout = _mean([_first(m, WAIT_KEYS) for m in steady])  # the learner waiting for the version and rollouts
    measured = rollout is not None
    if rollout is None and train is not None:
        rollout = max(per_step - train, 0.0)  # everything but Trainer.step: rollouts, publishing, waiting
    return {
        "steps": n,
        "s_step": per_step,
        "train": train,
        "rollout": rollout,
        "rollout_measured": measured,
        "publish": _mean([_first(m, PUBLISH_KEYS) for m in steady]),
        "busy": _mean([_first(m, BUSY_KEYS) for m in steady]),
        "staleness": _mean([_first(m, STALE_KEYS) for m in steady]),
        # every step, the first included: a synchronous run must have trained nothing stale
        "staleness_max": max((m["staleness"] for m in metrics if isinstance(m.get("staleness"), int)), default=None),
        "reward": statistics.fmean(m["reward_mean"] for m in metrics[-FINAL:]) if metrics else float("nan"),
        "reward_se": _standard_error([m["reward_mean"] for m in metrics[-FINAL:]]),
        "t0": metrics[0]["time"] if metrics else 0.0,
        "t1": metrics[-1]["time"] if metrics else 0.0,
    }


def stop_launch(proc: subprocess.Popen, sampler: CpuSampler | None) -> list[str]:
    """SIGTERM (runner launch's bounded stop), SIGKILL after its grace, then SIGKILL any child of it still alive."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(STOP_GRACE + 5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    if sampler is None:
        return []
    sampler.sample()  # the children it had at the end, too
    sampler.stop()
    return sampler.kill_leftovers()


def run_runner(
    model: Path,
    work: Path,
    steps: int,
    depth: int,
    workers: int,
    timeout: float,
    extra: tuple[str, ...] = (),
    tag: str = "",
) -> dict:
    """One `runner launch` of the quickstart with these overrides (and `extra` --set ones, named `tag` in the
    label and run dir); its summary row."""
    name = f"async {depth}" if depth else "sync"
    label = f"{name}, {workers} worker{'s' if workers > 1 else ''}" + (f", {tag}" if tag else "")
    run_dir = work / (f"run-d{depth}-w{workers}" + (f"-{tag}" if tag else ""))
    sets = [
        f"model.path={json.dumps(str(model))}",
        f"checkpoint.dir={json.dumps(str(run_dir))}",
        f"learner.steps={steps}",
        f"generation.workers={workers}",
        'coordinator.control="tcp://127.0.0.1:0"',  # free ports: other jobs may run on this machine
        'coordinator.weights="tcp://127.0.0.1:0"',
        "generation.port=0",
        *extra,
    ]
    # Always given (the quickstart's own are 1 and 1). A batch started d steps ahead is trained d versions later, so
    # the config requires max_staleness >= d; max_staleness = 0 makes the learner wait for its own version before
    # every step, which is what makes depth 0 synchronous.
    sets += [f"learner.async_depth={depth}", f"learner.max_staleness={depth}"]
    cmd = [sys.executable, "-m", "runner.cli", "launch", str(ROOT / "configs" / "quickstart.toml")]
    for s in sets:
        cmd += ["--set", s]
    row = {"label": label, "depth": depth, "workers": workers, "run_dir": str(run_dir)}
    log_path = work / f"launch-{run_dir.name.removeprefix('run-')}.log"
    say(f"[{label}] runner launch ... (log {log_path})")
    tic = time.monotonic()
    row["launched"] = time.time()  # the wall time to finish counts from here (loading included)
    # Its own session: a Ctrl-C in the terminal reaches the bench, which stops the launch (and so its children).
    with open(log_path, "w") as log:
        proc = subprocess.Popen(
            cmd, cwd=work, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True
        )
        sampler = CpuSampler(proc.pid)
        # A hung launch prints nothing, so the read below would never see the deadline: a timer stops it instead.
        watchdog = threading.Timer(timeout, proc.send_signal, (signal.SIGTERM,))
        watchdog.start()
        try:
            last = ""
            for line in proc.stdout:  # ends when the launch (and every child sharing its stdout) has exited
                log.write(line)
                last = line.strip() or last
                if line.startswith("step ") and "/" in line.split()[1]:
                    done = int(line.split()[1].split("/")[0])
                    if done == 1 or done % 10 == 0 or done == steps:
                        say(f"[{label}]   {line.split('  [')[0].strip()}   ({time.monotonic() - tic:.0f} s)")
            code = proc.wait()
            if time.monotonic() - tic >= timeout:
                last = f"stopped after the --timeout of {timeout:.0f} s; {last}"
        finally:
            watchdog.cancel()
            leftovers = stop_launch(proc, sampler)
    if leftovers:
        say(f"[{label}] killed processes left running: {', '.join(leftovers)}")
    metrics_path = run_dir / "metrics.jsonl"
    metrics = (
        [json.loads(x) for x in metrics_path.read_text().splitlines() if x.strip()] if metrics_path.exists() else []
    )
    if code != 0 or len(metrics) < steps:
        row["error"] = f"exit {code}, {len(metrics)} step(s): {last[:160]}"
        say(f"[{label}] FAILED: {row['error']}")
        return row
    row.update(summarize(metrics))
    row["cpu"] = sampler.rates(row["t0"], row["t1"])
    say(
        f"[{label}] done in {time.monotonic() - tic:.0f} s: {row['s_step']:.3f} s/step, final reward "
        f"{row['reward']:.3f}"
    )
    return row


# ---------------------------------------------------------------------------------------------------------- the peer


def train_grpo_peer(
    net,
    tokenizer,
    dataset: list[tuple],
    reward,
    steps: int,
    adapter_file: Path,
    *,
    group: int,
    batch: int,
    max_tokens: int,
    lr: float,
    temperature: float = 1.0,
    beta: float = 0.0,
    clip: tuple[float, float] = (0.2, 0.28),
    on_step=None,
    on_rollouts=None,
) -> None:
    """mlx-lm-lora's `train_grpo` on `net` (LoRA layers already in place) in runner's terms: Adam at `lr`,
    sampling at `temperature` with no top-k/top-p truncation, token-summed loss ("bnpo", runner's loss_agg "token"),
    KL coefficient `beta`, clip band `clip`. `dataset`: (prompt ids, [], prompt text, answer text) rows; `reward`: an
    mlx-lm-lora reward function. `on_step(info)` gets its per-step report; `on_rollouts(completions, texts,
    seconds)` each batch of rollouts (token id arrays, texts, time taken)."""
    import mlx.optimizers as optim
    from mlx_lm.tuner.callbacks import TrainingCallback
    from mlx_lm_lora.trainer import grpo_trainer

    class Record(TrainingCallback):
        def on_train_loss_report(self, info: dict) -> None:
            if on_step:
                on_step(info)

        def on_val_loss_report(self, info: dict) -> None:
            pass

    original = grpo_trainer.generate_grpo

    def generate_recording(*args, **kwargs):
        tic = time.perf_counter()
        completions, texts, indices = original(*args, **kwargs)
        if on_rollouts:
            on_rollouts(completions, texts, time.perf_counter() - tic)
        return completions, texts, indices

    args = grpo_trainer.GRPOTrainingArgs(
        batch_size=batch,
        iters=steps,
        group_size=group,
        max_completion_length=max_tokens,
        beta=beta,  # 0: no reference model forward
        epsilon=clip[0],  # inactive with one update per batch (ratio 1), given anyway
        epsilon_high=clip[1],
        temperature=temperature,
        top_p=1.0,
        top_k=0,
        min_p=0.0,
        grpo_loss_type="bnpo",  # token sum / tokens: runner's loss_agg "token"
        steps_per_report=1,
        steps_per_eval=10**9,
        steps_per_save=10**9,
        max_seq_length=512,
        adapter_file=str(adapter_file),
    )
    Path(adapter_file).parent.mkdir(parents=True, exist_ok=True)
    grpo_trainer.generate_grpo = generate_recording
    try:
        grpo_trainer.train_grpo(
            net,
            None,
            tokenizer,
            optim.Adam(learning_rate=lr, bias_correction=True),
            dataset,
            None,
            reward_funcs=[reward],
            args=args,
            training_callback=Record(),
            end_answer_token="",
        )
    finally:
        grpo_trainer.generate_grpo = original


def run_peer(model: Path, work: Path, steps: int) -> dict | None:
    """mlx-lm-lora's train_grpo in this process on the same model, prompts, reward and shape; its summary row."""
    try:
        import mlx_lm_lora
    except ImportError as e:
        say(f"[peer] skipped: mlx_lm_lora does not import ({e}); `pip install -e '.[bench]'` adds it")
        return None
    import mlx.core as mx
    import numpy as np
    from mlx_lm import load
    from mlx_lm.tuner.utils import linear_to_lora_layers

    from workers.learner.tasks import TargetTokensTask

    label = f"mlx-lm-lora {mlx_lm_lora.__version__} train_grpo"
    mx.random.seed(0)  # its sampling
    np.random.seed(0)  # its batch order (iterate_grpo_batches permutes the batches with NumPy's global generator)
    net, tokenizer = load(str(model))
    net.freeze()
    linear_to_lora_layers(net, len(net.layers), {"rank": RANK, "scale": SCALE, "dropout": 0.0, "keys": KEYS})
    task = TargetTokensTask(tokenizer, max_tokens=MAX_TOKENS)
    prompts = [task.prompt(i) for i in range(steps * BATCH)]  # the prompts runner's built-in source uses
    dataset = [(p.ids, [], p.text, "") for p in prompts]

    # mlx-lm-lora 5.10.2 trains on the token ids it sampled (generate_grpo returns them) but hands its reward
    # functions the decoded text; older releases re-encoded that text for the loss, which need not give back the
    # sampled ids. runner's reward counts sampled token ids: keep the ids of the latest rollouts (same order as the
    # texts) and score those, as runner does.
    generated: dict[str, list[list[int]]] = {}

    def record_ids(completions, texts, seconds):
        generated["ids"] = [c.tolist() for c in completions]

    def target_tokens(prompts, completions, answer, types=None):
        ids = generated["ids"]
        assert len(ids) == len(completions)
        return [task.reward(None, c, t) for c, t in zip(ids, completions)]

    out = sys.stdout
    times: list[float] = []
    rewards: list[float] = []
    cpu: list[tuple[float, float | None]] = []  # (our CPU seconds, machine busy seconds) at each step
    tic = time.monotonic()

    def record_step(info: dict) -> None:
        times.append(time.time())
        t = os.times()
        cpu.append((t.user + t.system, machine_busy()))
        rewards.append(float(info["train_total_rewards_mean"]))
        it = info["iteration"]
        if it == 1 or it % 10 == 0 or it == steps:
            print(
                f"[peer]   step {it}/{steps}  reward {rewards[-1]:.3f}   ({time.monotonic() - tic:.0f} s)",
                file=out,
                flush=True,
            )

    log_path = work / "peer.log"
    say(f"[peer] {label} ... (log {log_path})")
    with open(log_path, "w") as log, contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):
        train_grpo_peer(
            net,
            tokenizer,
            dataset,
            target_tokens,
            steps,
            work / "peer" / "adapters.safetensors",
            group=GROUP,
            batch=BATCH,
            max_tokens=MAX_TOKENS,
            lr=LR,
            on_step=record_step,
            on_rollouts=record_ids,
        )
    n = len(times)
    row = {
        "label": label,
        "steps": n,
        "s_step": (times[-1] - times[0]) / (n - 1) if n > 1 else float("nan"),
        "reward": statistics.fmean(rewards[-FINAL:]),
        "reward_se": _standard_error(rewards[-FINAL:]),
        "cpu": None,
    }
    if n > 1:
        wall = times[-1] - times[0]
        row["cpu"] = {"learner": (cpu[-1][0] - cpu[0][0]) / wall}
        if cpu[0][1] is not None:
            row["cpu"]["other"] = max(0.0, (cpu[-1][1] - cpu[0][1]) / wall - row["cpu"]["learner"])
    say(f"[peer] done in {time.monotonic() - tic:.0f} s: {row['s_step']:.3f} s/step, final reward {row['reward']:.3f}")
    return row


# ------------------------------------------------------------------------------------------------------------ report


def _f(v: float | None, fmt: str = ".3f") -> str:
    return "-" if v is None else format(v, fmt)


def _cpu(row: dict, role: str) -> str:
    cpu = row.get("cpu")
    if not cpu:
        return "-"
    if role == "gen":
        gens = [cpu[k] + cpu.get(f"{k} front", 0.0) for k in sorted(cpu) if k.startswith("gen-") and " " not in k]
        return "+".join(f"{v:.2f}" for v in gens) if gens else "-"
    return _f(cpu.get(role), ".2f")


def _cpu_seconds(row: dict) -> float | None:
    """CPU seconds the job's own processes spent per step: s/step x their CPU seconds per wall second."""
    cpu = row.get("cpu")
    return row["s_step"] * sum(v for k, v in cpu.items() if k != "other") if cpu else None


def _cpu_per_step(row: dict) -> str:
    return _f(_cpu_seconds(row), ".2f")


def _utilisation(row: dict) -> str:
    """The job's CPU seconds per wall second over the machine's cores, in %."""
    cpu = row.get("cpu")
    if not cpu:
        return "-"
    return f"{sum(v for k, v in cpu.items() if k != 'other') / (os.cpu_count() or 1) * 100:.0f}%"


def _staleness(row: dict) -> str:
    return f"{_f(row.get('staleness'), '.2f')} / {_f(row.get('staleness_max'), 'd')}"


def report(rows: list[dict], peer: dict | None) -> str:
    sync = {r["workers"]: r for r in rows if r["depth"] == 0 and "error" not in r}
    head = (
        "| run | s/step | speed-up | ideal | % ideal | gen busy | staleness mean / max | reward | d reward | /peer "
        "| CPU learner | CPU gen | CPU coord | CPU other | CPU-s/step | CPU util |"
    )
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['label']} | failed: {r['error']} |" + " |" * 14)
            continue
        base = sync.get(r["workers"])
        ideal = None
        if base and base["train"] is not None and base["rollout"] is not None:
            ideal = (base["rollout"] + base["train"]) / max(base["rollout"], base["train"])
        speedup = base["s_step"] / r["s_step"] if base else None
        reach = speedup / ideal if speedup is not None and ideal and r["depth"] else None
        lines.append(
            f"| {r['label']} | {r['s_step']:.3f} | {_f(speedup, '.2f')}x | {_f(ideal, '.2f')}x | "
            f"{'-' if reach is None else format(reach * 100, '.0f') + '%'} | {_f(r['busy'], '.2f')} | "
            f"{_staleness(r)} | {r['reward']:.3f} | "
            f"{_f(r['reward'] - base['reward'] if base else None, '+.3f')} | "
            f"{_f(r['s_step'] / peer['s_step'] if peer else None, '.2f')} | {_cpu(r, 'learner')} | {_cpu(r, 'gen')} | "
            f"{_cpu(r, 'coord')} | {_cpu(r, 'other')} | {_cpu_per_step(r)} | {_utilisation(r)} |"
        )
    if peer:
        lines.append(
            f"| {peer['label']} | {peer['s_step']:.3f} | | | | | | {peer['reward']:.3f} | | 1.00 | "
            f"{_cpu(peer, 'learner')} | | | {_cpu(peer, 'other')} | {_cpu_per_step(peer)} | {_utilisation(peer)} |"
        )
    return "\n".join(lines)


def verdicts(rows: list[dict], peer: dict | None) -> list[str]:
    out = []
    for w, base in sorted({r["workers"]: r for r in rows if r["depth"] == 0 and "error" not in r}.items()):
        if base["train"] is not None:
            how = "wait_s" if base["rollout_measured"] else "s/step minus Trainer.step seconds"
            publish = f", publish {base['publish']:.3f} s" if base["publish"] is not None else ""
            out.append(
                f"sync, {w} worker(s) per step: rollout {base['rollout']:.3f} s ({how}) + train {base['train']:.3f} s"
                f"{publish}; wall {base['s_step']:.3f} s"
            )
    ok = [r for r in rows if "error" not in r]
    other = [r["cpu"]["other"] for r in ok + ([peer] if peer else []) if r.get("cpu") and "other" in r["cpu"]]
    if other and statistics.fmean(other) > 0.25:
        out.append(
            f"other processes kept {statistics.fmean(other):.2f} of the {os.cpu_count()} cores busy on average during "
            "the runs (CPU other): the timings are those of a shared machine, not of an idle one"
        )
    for r in ok:
        if r["depth"] == 0:
            stale = r.get("staleness_max")
            out.append(
                f"{r['label']}: largest staleness over the {r['steps']} steps = {_f(stale, 'd')}: "
                + ("synchronous" if stale == 0 else "NOT synchronous (some token was trained after a newer version)")
            )
    if peer and ok:
        best = min(ok, key=lambda r: r["s_step"])
        for r in {id(x): x for x in [ok[0], best]}.values():
            ratio = r["s_step"] / peer["s_step"]
            # Two runs' final rewards are equal when they differ by less than twice the noise of their difference.
            noise = 2 * (r["reward_se"] ** 2 + peer["reward_se"] ** 2) ** 0.5
            met = ratio <= 0.4 and r["reward"] >= peer["reward"] - noise
            out.append(
                f"runner ({r['label']}) / peer s/step = {ratio:.2f} (target <= 0.40), final reward {r['reward']:.3f} "
                f"vs peer {peer['reward']:.3f} (equal within +-{noise:.3f}, 2 standard errors of the difference): "
                f"{'met' if met else 'NOT met'}"
            )
    return out


def tiny_model(work: Path) -> Path:
    """The quickstart's model (`runner models prepare tiny`, deterministic) in `work`, prepared when missing."""
    model = work / "tiny"
    if not (model / "config.json").exists():
        say(f"preparing the tiny model in {model}")
        subprocess.run(
            [sys.executable, "-m", "runner.cli", "models", "prepare", "tiny", "--out", str(model)],
            check=True,
            stdout=subprocess.DEVNULL,
        )
    return model


def _interrupt(*_) -> None:
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--depths", type=int, nargs="+", default=[0, 1, 2], help="[learner] async_depth values")
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 2], help="[generation] workers values")
    ap.add_argument("--skip-peer", action="store_true", help="do not run mlx-lm-lora's train_grpo")
    ap.add_argument("--timeout", type=float, default=1200.0, help="seconds one runner launch may take")
    ap.add_argument("--keep", help="a directory to keep the runs in (default: a temp dir, removed at the end)")
    args = ap.parse_args(argv)
    if args.steps < 2:
        ap.error("--steps must be at least 2 (s/step is measured between the first and the last step)")
    if any(d < 0 for d in args.depths) or any(w < 1 for w in args.workers):
        ap.error("--depths must be >= 0 and --workers >= 1")
    # The peer runs in this process: give it the BLAS `runner launch` gives its MLX children ([coordinator] blas =
    # "auto"), so both sides do their matmuls with the same library. The preload only acts from process start.
    blas = blas_library("auto")
    if blas and blas not in os.environ.get("LD_PRELOAD", ""):
        env = child_environment(blas)
        if "OPENBLAS_NUM_THREADS" not in os.environ:  # the peer is one process: OpenBLAS' own default (every core),
            env.pop("OPENBLAS_NUM_THREADS")  # and `runner launch` splits the cores over its children itself
        os.execve(sys.executable, [sys.executable, __file__, *sys.argv[1:]], env)
    # SIGTERM ends the bench like Ctrl-C: the finally clauses stop what it started.
    signal.signal(signal.SIGTERM, _interrupt)

    with contextlib.ExitStack() as stack:
        if args.keep:
            work = Path(args.keep).resolve()
            work.mkdir(parents=True, exist_ok=True)
        else:
            work = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="bench-rl-")))
        say(f"BLAS of the runner children and the peer: {blas or 'MLX bundled'}")
        model = tiny_model(work)
        say(f"{os.cpu_count()} cores; load average at start {_f(os.getloadavg()[0], '.2f')}; runs in {work}")
        rows = []
        for workers in args.workers:
            for depth in sorted(set(args.depths)):
                rows.append(run_runner(model, work, args.steps, depth, workers, args.timeout))
        peer = None if args.skip_peer else run_peer(model, work, args.steps)
        say("")
        say(
            f"tiny model, target_tokens, group {GROUP} x {BATCH} prompts, {MAX_TOKENS} tokens, LoRA r{RANK} on all "
            f"linears, {args.steps} steps; load average at end {_f(os.getloadavg()[0], '.2f')} on "
            f"{os.cpu_count()} cores"
        )
        say("")
        say(report(rows, peer))
        say("")
        for line in verdicts(rows, peer):
            say(line)
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        print("interrupted: every process the bench started has been stopped", file=sys.stderr)
        sys.exit(130)
