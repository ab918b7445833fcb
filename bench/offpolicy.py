"""Off-policy training: does learning at `async_depth` 1, 2, 4 keep up with synchronous training, and what does the
correction for stale rollouts do? Depth 0, 1, 2, 4, each with and without the correction, in one run, one table.

    python bench/offpolicy.py [--steps 40] [--depths 0 1 2 4] [--seeds 1,2,3] [--marks 10,20] [--skip-quickstart]
                              [--smollm2] [--smollm2-steps 30] [--smollm2-marks ""] [--eval-limit 500] [--keep DIR]

Every row is one setting, `[learner] async_depth` = d with `max_staleness` = d (the least the config allows: a batch
started d steps ahead is trained d versions later; d = 0 is synchronous, the learner waiting for its own version
before each step), with the correction on (the config's `tis_cap`, the truncated importance weight pi_prox / mu) or
off (`tis_cap = 0`), run once per seed of `--seeds` (`[learner] seed`: prompts and sampling). Runs go seed by seed,
each seed through every setting, so a change in the machine's load spreads over the settings instead of landing on one.

- quickstart (`configs/quickstart.toml`, tiny random llama, `target_tokens` reward; launched by bench/rl.py's
  `run_runner`, one generation worker): the training reward of each step from metrics.jsonl. `final` = per run the
  mean reward of the last 10 steps (a fixed step range, the same for every row), then mean ± standard error over the
  seeds; `at steps` = the same for the 5 steps ending at each of `--marks`.
- `--smollm2` (`configs/smollm2_arithmetic.toml`; launched by bench/learn.py's `run_runner`, evaluated by its
  evaluator): greedy held-out accuracy on the first `--eval-limit` problems of `[eval] path` after
  `--smollm2-steps` steps (`final`), and at the checkpoints of `--smollm2-marks` (each costs one evaluation), mean ±
  standard error over the seeds. Long on a CPU: about 8 minutes a run there (30 steps and one evaluation of 500).

`d final vs sync`: the row's final minus that of depth 0 with the correction on, ± the standard error of that
difference (sqrt(se1^2 + se2^2)); "within noise" below the table = within two of them. `staleness`: the metrics'
token-weighted mean (versions between the sampling version and the learner's), mean over steps 2.. and seeds, and
the largest seen. `wall s`: launch to the last step (loading included), mean over seeds; `s/step`: first to last
step over steps - 1, mean over seeds. Every process the bench starts is stopped when it ends (bench/rl.py,
bench/learn.py).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import statistics
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench import learn, rl  # noqa: E402
from bench.rl import say  # noqa: E402
from runner.blas import blas_library, child_environment  # noqa: E402
from runner.config import load_config  # noqa: E402

QUICKSTART = ROOT / "configs" / "quickstart.toml"
SMOLLM2 = ROOT / "configs" / "smollm2_arithmetic.toml"
FINAL = 10  # quickstart: final reward = mean over the last 10 steps of a run
WINDOW = 5  # quickstart: the reward at step m = mean over steps m-4 .. m


@dataclass
class Setting:
    task: str
    depth: int
    correction: bool
    finals: list[float] = field(default_factory=list)  # one per seed that finished
    marks: dict[int, list[float]] = field(default_factory=dict)
    staleness: list[float] = field(default_factory=list)
    staleness_max: list[int] = field(default_factory=list)
    walls: list[float] = field(default_factory=list)
    s_steps: list[float] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)

    def sets(self, seed: int) -> tuple[str, ...]:
        off = () if self.correction else ("learner.tis_cap=0",)
        return (f"learner.seed={seed}", *off)

    @property
    def label(self) -> str:
        return f"d{self.depth}-{'tis' if self.correction else 'notis'}"


def parse_marks(text: str) -> list[int]:
    try:
        marks = sorted({int(x) for x in text.split(",") if x.strip()})
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected step numbers separated by commas") from None
    if marks and marks[0] < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: steps start at 1")
    return marks


def _window(rewards: dict[int, float], last: int, width: int) -> float | None:
    """Mean reward of steps last-width+1 .. last, None when a step of them is missing."""
    steps = range(last - width + 1, last + 1)
    return statistics.fmean(rewards[s] for s in steps) if all(s in rewards for s in steps) else None


def quickstart_run(setting: Setting, seed: int, model: Path, work: Path, args: argparse.Namespace) -> None:
    row = rl.run_runner(
        model, work, args.steps, setting.depth, 1, args.timeout, setting.sets(seed), f"{setting.label}-s{seed}"
    )
    if "error" in row:
        setting.failed.append(f"seed {seed}: {row['error']}")
        return
    metrics = [json.loads(x) for x in (Path(row["run_dir"]) / "metrics.jsonl").read_text().splitlines() if x.strip()]
    rewards = {m["step"]: m["reward_mean"] for m in metrics if isinstance(m.get("step"), int)}
    setting.finals.append(_window(rewards, args.steps, FINAL))
    for mark in args.marks:
        value = _window(rewards, mark, WINDOW)
        if value is not None:
            setting.marks.setdefault(mark, []).append(value)
    setting.staleness.append(row["staleness"])
    setting.staleness_max.append(row["staleness_max"])
    setting.walls.append(row["t1"] - row["launched"])
    setting.s_steps.append(row["s_step"])


@dataclass
class Smollm2:
    """What every SmolLM2 run shares: the config, the weights and the evaluator's environment."""

    config_path: Path
    model: Path
    weights: Path
    env: dict


def smollm2_run(setting: Setting, seed: int, s: Smollm2, work: Path, args: argparse.Namespace) -> None:
    run_dir = work / f"smollm2-{setting.label}-s{seed}"
    extra = (f"learner.async_depth={setting.depth}", f"learner.max_staleness={setting.depth}", *setting.sets(seed))
    try:
        r = learn.run_runner(
            s.config_path, str(s.model), run_dir, args.smollm2_steps, None, False, extra, f"{setting.label} s{seed}"
        )
    except RuntimeError as e:
        setting.failed.append(f"seed {seed}: {e}")
        return
    if r["steps"] < args.smollm2_steps:
        setting.failed.append(f"seed {seed}: {r['steps']} of {args.smollm2_steps} steps; see {run_dir.parent}")
        return

    def accuracy(step: int) -> float | None:
        found = [c for c in learn.checkpoints(run_dir) if c[0] == step]
        if not found:
            return None
        log = work / f"eval-{run_dir.name}-step{step}.log"
        what = f"{setting.label} seed {seed} step {step}"
        return learn.evaluate(s.config_path, s.weights, found[0][2], args.eval_limit, s.env, log, args.timeout, what)[
            "accuracy"
        ]

    final = accuracy(args.smollm2_steps)
    if final is None:
        setting.failed.append(f"seed {seed}: no checkpoint of step {args.smollm2_steps} in {run_dir}")
        return
    setting.finals.append(final)
    for mark in args.smollm2_marks:
        if mark < args.smollm2_steps:
            value = accuracy(mark)
            if value is not None:
                setting.marks.setdefault(mark, []).append(value)
    metrics = learn._metrics(run_dir)
    stale = [m["staleness_mean"] for m in metrics[1:] if isinstance(m.get("staleness_mean"), (int, float))]
    setting.staleness.append(statistics.fmean(stale) if stale else None)
    setting.staleness_max.append(max((m.get("staleness") or 0 for m in metrics), default=None))
    setting.walls.append(r["wall"])
    setting.s_steps.append(r["s_step"])


# ------------------------------------------------------------------------------------------------------------ report


def _value(values: list[float], percent: bool) -> str:
    if not values:
        return "-"
    return learn.pm(values, 100.0, ".1f") + "%" if percent else learn.pm(values, 1.0, ".3f")


def _difference(a: list[float], b: list[float], percent: bool) -> tuple[float, float] | None:
    """(mean(a) - mean(b), its standard error) in the unit of the table, None when either is empty."""
    if not a or not b:
        return None
    scale = 100.0 if percent else 1.0
    (ma, sa), (mb, sb) = learn.mean_se([x * scale for x in a]), learn.mean_se([x * scale for x in b])
    return ma - mb, (sa**2 + sb**2) ** 0.5


def _pm(diff: tuple[float, float] | None, fmt: str) -> str:
    if diff is None:
        return "-"
    return f"{diff[0]:+{fmt}}" + ("" if diff[1] != diff[1] else f" ± {diff[1]:{fmt}}")  # no SE from one seed


def _mean(values: list) -> float | None:
    values = [v for v in values if v is not None]
    return statistics.fmean(values) if values else None


def table(settings: list[Setting], seeds: list[int]) -> str:
    head = (
        "| task | async_depth | correction | runs | at steps (mean ± SE) | final (mean ± SE) | d final vs sync "
        "| staleness mean / max | wall s | s/step |"
    )
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    syncs = {x.task: x for x in settings if x.depth == 0 and x.correction}
    for st in settings:
        percent = st.task != "quickstart"
        sync = syncs.get(st.task)
        diff = _difference(st.finals, sync.finals, percent) if sync is not None and sync is not st else None
        fmt = ".1f" if percent else ".3f"
        marks = "; ".join(f"{m}: {_value(v, percent)}" for m, v in sorted(st.marks.items())) or "-"
        smax = max((x for x in st.staleness_max if x is not None), default=None)
        lines.append(
            f"| {st.task} | {st.depth} | {'on' if st.correction else 'off (tis_cap 0)'} | "
            f"{len(st.finals)}/{len(seeds)} | {marks} | {_value(st.finals, percent)} | "
            f"{_pm(diff, fmt)} | "
            f"{rl._f(_mean(st.staleness), '.2f')} / {rl._f(smax, 'd')} | {rl._f(_mean(st.walls), '.0f')} | "
            f"{rl._f(_mean(st.s_steps), '.3f')} |"
        )
    return "\n".join(lines)


def verdicts(settings: list[Setting]) -> list[str]:
    out = []
    for st in settings:
        if st.failed:
            out.append(f"{st.task} {st.label}: {len(st.failed)} run(s) failed: " + "; ".join(st.failed))
    for task in dict.fromkeys(s.task for s in settings):
        percent = task != "quickstart"
        unit, fmt = (" points", ".1f") if percent else ("", ".3f")
        rows = {(s.depth, s.correction): s for s in settings if s.task == task}
        sync = rows.get((0, True))
        for (depth, correction), st in sorted(rows.items(), key=lambda kv: (kv[0][0], not kv[0][1])):
            if depth == 0 or sync is None:
                continue
            diff = _difference(st.finals, sync.finals, percent)
            if correction and diff is not None:
                near = abs(diff[0]) <= 2 * diff[1]
                wall = _mean(st.walls) / _mean(sync.walls) if st.walls and sync.walls else None
                out.append(
                    f"{task}, depth {depth} with the correction vs synchronous: final {diff[0]:+{fmt}}{unit} ± "
                    f"{diff[1]:{fmt}}: "
                    + ("within noise (2 SE)" if near else "NOT within noise (2 SE)")
                    + ("" if wall is None else f"; wall time {wall:.2f} of synchronous")
                )
            on = rows.get((depth, True))
            if not correction and on is not None:
                off = _difference(st.finals, on.finals, percent)
                if off is not None:
                    worse = off[0] < -2 * off[1]
                    out.append(
                        f"{task}, depth {depth} without the correction vs with: final {off[0]:+{fmt}}{unit} ± "
                        f"{off[1]:{fmt}}: " + ("worse beyond 2 SE" if worse else "not worse beyond 2 SE")
                    )
    return out


def _interrupt(*_) -> None:
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=40, help="quickstart steps per run")
    ap.add_argument("--depths", type=int, nargs="+", default=[0, 1, 2, 4], help="[learner] async_depth values")
    ap.add_argument("--seeds", type=learn.parse_seeds, default=[1, 2, 3], help="[learner] seed of each run")
    ap.add_argument("--marks", type=parse_marks, default=[10, 20], help="quickstart: steps the reward is shown at")
    ap.add_argument("--skip-quickstart", action="store_true", help="only the SmolLM2 rows")
    ap.add_argument("--smollm2", action="store_true", help="also SmolLM2 arithmetic (held-out accuracy; long)")
    ap.add_argument("--smollm2-steps", type=int, default=30, help="SmolLM2 steps per run")
    ap.add_argument("--smollm2-marks", type=parse_marks, default=[], help="SmolLM2: also evaluate these steps")
    ap.add_argument("--eval-limit", type=int, default=500, help="SmolLM2 held-out problems evaluated")
    ap.add_argument("--timeout", type=float, default=3600.0, help="seconds one launch or evaluation may take")
    ap.add_argument("--keep", help="a directory to keep the runs in (default: a temp dir, removed at the end)")
    args = ap.parse_args(argv)
    if args.steps < FINAL or args.smollm2_steps < 1:
        ap.error(f"--steps must be at least {FINAL} (the final reward is the mean of the last {FINAL} steps)")
    if any(d < 0 for d in args.depths):
        ap.error("--depths must be >= 0")
    if args.skip_quickstart and not args.smollm2:
        ap.error("--skip-quickstart leaves nothing to run without --smollm2")
    args.marks = [m for m in args.marks if WINDOW <= m <= args.steps]
    signal.signal(signal.SIGTERM, _interrupt)
    depths = sorted(set(args.depths))
    tasks = ([] if args.skip_quickstart else ["quickstart"]) + (["smollm2"] if args.smollm2 else [])
    settings = [Setting(t, d, c) for t in tasks for d in depths for c in (True, False)]

    with contextlib.ExitStack() as stack:
        if args.keep:
            work = Path(args.keep).resolve()
            work.mkdir(parents=True, exist_ok=True)
        else:
            work = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="bench-offpolicy-")))
        say(f"{os.cpu_count()} cores; load average at start {os.getloadavg()[0]:.2f}; runs in {work}")
        model = rl.tiny_model(work) if "quickstart" in tasks else None
        smollm2 = None
        if args.smollm2:
            config = load_config(SMOLLM2)
            env = child_environment(blas_library(config.coordinator.blas))
            weights = learn.prepare_weights(config, work, env, args.timeout)
            smollm2 = Smollm2(SMOLLM2, *weights, env)
        for seed in args.seeds:
            for st in settings:
                if st.task == "quickstart":
                    quickstart_run(st, seed, model, work, args)
                else:
                    smollm2_run(st, seed, smollm2, work, args)

        tis = {t: load_config(p).learner.tis_cap for t, p in (("quickstart", QUICKSTART), ("smollm2", SMOLLM2))}
        say("")
        say(
            f"seeds {', '.join(map(str, args.seeds))}; max_staleness = async_depth; correction on = the config's "
            f"tis_cap ({', '.join(f'{t} {tis[t]}' for t in tasks)}), off = 0; load average at end "
            f"{os.getloadavg()[0]:.2f} on {os.cpu_count()} cores"
        )
        if "quickstart" in tasks:
            say(
                f"quickstart: training reward, {args.steps} steps; final = mean of steps {args.steps - FINAL + 1}-"
                f"{args.steps}, at step m = mean of steps m-{WINDOW - 1}..m"
            )
        if smollm2 is not None:
            say(
                f"smollm2: greedy held-out accuracy on {args.eval_limit} problems after {args.smollm2_steps} steps "
                "(final) and at the marked steps"
            )
        say("")
        say(table(settings, args.seeds))
        say("")
        for line in verdicts(settings):
            say(line)
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        print("interrupted: every process the bench started has been stopped", file=sys.stderr)
        sys.exit(130)
