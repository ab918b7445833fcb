"""`runner report RUN`: plots of a run's metrics.jsonl (PNG, matplotlib Agg) and a Markdown summary beside them.

Reads only files (no MLX, no running job). Robust to what a crashed or resumed run leaves: a malformed line is reported
with its line number and skipped, a step logged twice keeps its last record, a metric that never appears gets a note
instead of a plot. `summary.json` holds the same numbers as `report.md` at full precision, for scripts and tests.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from runner.files import write_atomic

log = logging.getLogger(__name__)

METRICS_FILE = "metrics.jsonl"


@dataclass(frozen=True)
class PlotSpec:
    name: str  # file stem
    key: str  # metrics.jsonl field
    title: str
    ylabel: str
    band: str | None = None  # field holding a ± spread drawn around `key`


PLOTS = (
    PlotSpec("reward", "reward_mean", "Reward", "mean reward per batch", band="reward_std"),
    PlotSpec("loss", "loss", "GRPO loss", "loss"),
    PlotSpec("kl", "kl", "KL divergence to the reference policy", "KL (per token)"),
    PlotSpec("tokens_per_s", "tokens_per_s", "Learner throughput", "tokens / s"),
    PlotSpec("staleness", "staleness", "Policy staleness (oldest token)", "versions behind"),
    PlotSpec("staleness_mean", "staleness_mean", "Token-weighted staleness", "mean versions behind"),
    PlotSpec("gen_busy", "gen_busy", "Generation workers busy", "fraction of the step's wall time"),
    PlotSpec("sampler_kl", "sampler_kl", "KL(sampler || trainer), k3 estimate", "KL (per token)"),
)
# "Where the time goes": the parts of each step's wall time (`step_s`) the learner logs, stacked; the rest is "other"
# (checkpoints, logging, metrics).
TIME_PARTS = (("wait_s", "waiting for rollouts"), ("train_s", "training"), ("publish_s", "publishing"))


# Evaluation rows (workers/learner/evaluation.py) share the step numbers of training rows; they are told apart by
# this key and kept apart, one per step.
EVAL_KEY = "eval_reward"
EVAL_PLOT = (("eval_reward", "mean reward"), ("eval_accuracy", "accuracy (pass@1)"), ("eval_pass_at_k", "pass@k"))


@dataclass
class Metrics:
    records: list[dict]  # one per step, sorted by step
    problems: list[str] = field(default_factory=list)  # "line N: why", for the report
    lines: int = 0
    evals: list[dict] = field(default_factory=list)  # evaluation rows, one per step, sorted by step


def number(v) -> float | None:
    """A finite float, or None for anything else (missing, null, NaN, strings, booleans)."""
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return None
    return float(v) if math.isfinite(v) else None


def read_metrics(path: Path) -> Metrics:
    """Parse metrics.jsonl; bad lines become `problems`, duplicate steps keep the last record."""
    path = Path(path)
    by_step: dict[int, dict] = {}
    evals: dict[int, dict] = {}
    problems = []
    text = path.read_text(errors="replace")
    lines = text.splitlines()
    for lineno, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            problems.append(f"line {lineno}: not valid JSON ({e.msg}, column {e.colno})")
            continue
        if not isinstance(rec, dict):
            problems.append(f"line {lineno}: a JSON {type(rec).__name__}, expected an object")
            continue
        step = rec.get("step")
        if isinstance(step, bool) or not isinstance(step, int):
            problems.append(f"line {lineno}: 'step' is {step!r}, expected an integer")
            continue
        rows = evals if EVAL_KEY in rec else by_step
        if step in rows:
            problems.append(f"line {lineno}: step {step} logged again; keeping this later record")
        rows[step] = rec
    return Metrics([by_step[s] for s in sorted(by_step)], problems, len(lines), [evals[s] for s in sorted(evals)])


def series(records: list[dict], key: str) -> tuple[list[int], list[float]]:
    """(steps, values) of the records where `key` is a finite number."""
    steps, values = [], []
    for r in records:
        v = number(r.get(key))
        if v is not None:
            steps.append(r["step"])
            values.append(v)
    return steps, values


def _mean(xs: list[float]) -> float | None:
    return sum(xs) / len(xs) if xs else None


def summarize(records: list[dict], window: int = 10) -> dict:
    """The report's numbers; every value is recomputable from the records (None when the metric is absent)."""
    s: dict = {"records": len(records)}
    s["first_step"] = records[0]["step"] if records else None
    s["last_step"] = records[-1]["step"] if records else None
    steps, reward = series(records, "reward_mean")
    s["reward_first"] = reward[0] if reward else None
    s["reward_last"] = reward[-1] if reward else None
    if reward:
        best = max(range(len(reward)), key=lambda i: reward[i])  # the first step reaching the maximum
        s["reward_best"], s["reward_best_step"] = reward[best], steps[best]
    else:
        s["reward_best"] = s["reward_best_step"] = None
    s["reward_window"] = min(window, len(reward))
    s["reward_mean_first"] = _mean(reward[:window])
    s["reward_mean_last"] = _mean(reward[-window:])
    s["loss_final"] = (series(records, "loss")[1] or [None])[-1]
    s["kl_final"] = (series(records, "kl")[1] or [None])[-1]
    s["tokens_per_s_mean"] = _mean(series(records, "tokens_per_s")[1])
    stale = series(records, "staleness")[1]
    s["staleness_max"] = max(stale) if stale else None
    secs = series(records, "seconds")[1]
    s["train_seconds"] = sum(secs) if secs else None
    times = series(records, "time")[1]
    s["wall_seconds"] = times[-1] - times[0] if len(times) >= 2 else None
    versions = series(records, "version")[1]
    s["last_version"] = int(versions[-1]) if versions else None
    for key in ("step_s", *(k for k, _ in TIME_PARTS)):
        s[f"{key}_total"] = sum(series(records, key)[1]) if series(records, key)[1] else None
    s["step_s_mean"] = _mean(series(records, "step_s")[1])
    s["gen_busy_mean"] = _mean(series(records, "gen_busy")[1])
    s["sampler_kl_mean"] = _mean(series(records, "sampler_kl")[1])
    hist: list[int] = []  # trained tokens by versions behind, over the whole run
    for r in records:
        h = r.get("staleness_hist")
        if isinstance(h, list) and all(isinstance(x, int) and not isinstance(x, bool) for x in h):
            hist += [0] * (len(h) - len(hist))
            for i, n in enumerate(h):
                hist[i] += n
    s["staleness_hist"] = hist or None
    s["staleness_mean"] = sum(i * n for i, n in enumerate(hist)) / sum(hist) if sum(hist) else None
    return s


# ----------------------------------------------------------------------------------------------------------
# plots
# ----------------------------------------------------------------------------------------------------------


def _moving_average(values: list[float], w: int) -> list[float]:
    out, acc = [], 0.0
    for i, v in enumerate(values):
        acc += v
        if i >= w:
            acc -= values[i - w]
        out.append(acc / min(i + 1, w))
    return out


def _draw(ax, records: list[dict], spec: PlotSpec) -> bool:
    steps, values = series(records, spec.key)
    if not steps:
        return False
    marker = "o" if len(steps) <= 30 else None  # dots help read short runs, clutter long ones
    discrete = spec.key == "staleness"  # whole versions: a step line reads better than slopes between them
    ax.plot(
        steps,
        values,
        marker=marker,
        markersize=3,
        linewidth=1.2,
        color="C0",
        label=spec.key,
        drawstyle="steps-mid" if discrete else "default",
    )
    if spec.band:
        band = [(r["step"], number(r.get(spec.key)), number(r.get(spec.band))) for r in records]
        band = [(st, v, sd) for st, v, sd in band if v is not None and sd is not None]
        if band:
            ax.fill_between(
                [b[0] for b in band],
                [b[1] - b[2] for b in band],
                [b[1] + b[2] for b in band],
                color="C0",
                alpha=0.2,
                linewidth=0,
                label=f"± {spec.band}",
            )
    if len(values) >= 10 and not discrete:
        w = max(3, len(values) // 10)
        ax.plot(steps, _moving_average(values, w), color="C1", linewidth=1.8, label=f"moving average ({w} steps)")
    if discrete:
        ax.yaxis.get_major_locator().set_params(integer=True)
        ax.set_ylim(min(-0.5, min(values) - 0.5), max(1.5, max(values) + 0.5))  # a flat 0 still gets whole ticks
    if min(values) == max(values):  # say it, or a flat line at an autoscaled axis reads as noise around 0
        ax.text(
            0.5,
            0.5,
            f"constant {fmt(values[0])} at all {len(values)} steps",
            transform=ax.transAxes,
            ha="center",
            va="bottom",
            color="0.35",
        )
    ax.set_title(spec.title)
    ax.set_xlabel("step")
    ax.set_ylabel(spec.ylabel)
    ax.grid(True, alpha=0.3)
    ax.legend(loc="best", fontsize="small")
    return True


def _draw_time(ax, records: list[dict]) -> bool:
    """Stacked bars per step: each part of the step's wall time; the remainder of `step_s` as "other"."""
    rows = [r for r in records if number(r.get("step_s")) is not None]
    if not rows:
        return False
    steps = [r["step"] for r in rows]
    bottom = [0.0] * len(rows)
    for i, (key, label) in enumerate(TIME_PARTS):
        part = [max(number(r.get(key)) or 0.0, 0.0) for r in rows]
        ax.bar(steps, part, bottom=bottom, width=0.85, color=f"C{i}", label=label)
        bottom = [b + p for b, p in zip(bottom, part)]
    other = [max(number(r["step_s"]) - b, 0.0) for r, b in zip(rows, bottom)]
    ax.bar(steps, other, bottom=bottom, width=0.85, color="0.75", label="other (checkpoints, logging)")
    ax.set_ylim(0, max(max(number(r["step_s"]) for r in rows), max(bottom)) * 1.08)
    ax.set_title("Where the time goes")
    ax.set_xlabel("step")
    ax.set_ylabel("seconds")
    ax.grid(True, axis="y", alpha=0.3)
    ax.legend(loc="best", fontsize="small")
    return True


def _draw_eval(ax, evals: list[dict]) -> bool:
    """The held-out evaluation by step: mean reward, accuracy and (when measured) pass@k."""
    drawn = False
    for i, (key, label) in enumerate(EVAL_PLOT):
        steps, values = series(evals, key)
        if steps:
            ax.plot(steps, values, marker="o", markersize=4, linewidth=1.4, color=f"C{i}", label=label)
            drawn = True
    if drawn:
        ax.set_title("Held-out evaluation")
        ax.set_xlabel("step")
        ax.set_ylabel("score")
        ax.grid(True, alpha=0.3)
        ax.legend(loc="best", fontsize="small")
    return drawn


def _save(fig, path: Path) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".png", dir=path.parent)
    os.close(fd)
    try:
        fig.savefig(tmp, format="png", dpi=110)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def make_plots(records: list[dict], out: Path, run_name: str, evals: list[dict] = ()) -> tuple[list[Path], list[str]]:
    """One PNG per metric plus overview.png; returns (written files, notes about skipped plots)."""
    from matplotlib.figure import Figure  # Figure without pyplot: Agg canvas, no global state, no display needed

    written, notes = [], []
    present = []
    for spec in PLOTS:
        fig = Figure(figsize=(7, 4), layout="constrained")
        if _draw(fig.add_subplot(), records, spec):
            fig.suptitle(run_name, fontsize="small", color="0.4")
            path = out / f"{spec.name}.png"
            _save(fig, path)
            written.append(path)
            present.append(spec)
            values = series(records, spec.key)[1]
            if min(values) == max(values):
                notes.append(f"`{spec.key}` is {fmt(values[0])} at every step")
        else:
            notes.append(f"`{spec.key}` has no numeric values in {METRICS_FILE}; {spec.name} plot skipped")
    fig = Figure(figsize=(7, 4), layout="constrained")
    if _draw_time(fig.add_subplot(), records):
        fig.suptitle(run_name, fontsize="small", color="0.4")
        _save(fig, out / "time.png")
        written.append(out / "time.png")
    else:
        notes.append(f"`step_s` has no numeric values in {METRICS_FILE}; time plot skipped")
    fig = Figure(figsize=(7, 4), layout="constrained")
    if evals and _draw_eval(fig.add_subplot(), evals):
        fig.suptitle(run_name, fontsize="small", color="0.4")
        _save(fig, out / "eval.png")
        written.append(out / "eval.png")
    if present:
        cols = 2 if len(present) > 1 else 1
        rows = math.ceil(len(present) / cols)
        fig = Figure(figsize=(6 * cols, 3.4 * rows), layout="constrained")
        for i, spec in enumerate(present, 1):
            _draw(fig.add_subplot(rows, cols, i), records, spec)
        fig.suptitle(f"{run_name}: training metrics by step")
        path = out / "overview.png"
        _save(fig, path)
        written.append(path)
    return written, notes


# ----------------------------------------------------------------------------------------------------------
# report.md
# ----------------------------------------------------------------------------------------------------------


def fmt(v, digits: int = 6) -> str:
    """How report.md prints a number: 6 significant digits, '-' when absent."""
    if v is None:
        return "-"
    if isinstance(v, int):
        return str(v)
    return f"{v:.{digits}g}"


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    h, rem = divmod(int(round(seconds)), 3600)
    return f"{fmt(seconds)} s ({h}:{rem // 60:02d}:{rem % 60:02d})"


def _shares(s: dict) -> str:
    """The time parts as shares of the summed step wall time."""
    total = s["step_s_total"]
    if not total:
        return "-"
    return " / ".join(f"{100 * (s[f'{k}_total'] or 0.0) / total:.0f}%" for k, _ in TIME_PARTS)


def render_markdown(run: Path, m: Metrics, s: dict, plots: list[Path], notes: list[str], checkpoints: list) -> str:
    w = s["reward_window"]
    best = "-" if s["reward_best"] is None else f"{fmt(s['reward_best'])} (step {s['reward_best_step']})"
    rows = [
        ("steps", f"{s['records']} (step {fmt(s['first_step'])} to {fmt(s['last_step'])})"),
        ("first reward", fmt(s["reward_first"])),
        ("last reward", fmt(s["reward_last"])),
        ("best reward", best),
        (f"mean reward, first {w} steps", fmt(s["reward_mean_first"])),
        (f"mean reward, last {w} steps", fmt(s["reward_mean_last"])),
        ("final loss", fmt(s["loss_final"])),
        ("final KL", fmt(s["kl_final"])),
        ("mean tokens/s", fmt(s["tokens_per_s_mean"])),
        ("max staleness", fmt(s["staleness_max"])),
        ("token-weighted staleness (mean)", fmt(s["staleness_mean"])),
        ("trained tokens by versions behind (0, 1, ...)", ", ".join(map(str, s["staleness_hist"] or [])) or "-"),
        ("mean step wall time", "-" if s["step_s_mean"] is None else f"{fmt(s['step_s_mean'])} s"),
        ("time waiting / training / publishing", _shares(s)),
        ("generation workers busy (mean)", fmt(s["gen_busy_mean"])),
        ("KL(sampler || trainer), mean", fmt(s["sampler_kl_mean"])),
        ("train time (sum of step seconds)", _duration(s["train_seconds"])),
        ("wall time (first to last step)", _duration(s["wall_seconds"])),
        ("last version", fmt(s["last_version"])),
    ]
    for e in m.evals[:1] + m.evals[1:][-1:]:  # the first and the last
        k = f", pass@k {fmt(number(e.get('eval_pass_at_k')))}" if "eval_pass_at_k" in e else ""
        rows.append(
            (
                f"eval at step {e['step']}",
                f"reward {fmt(number(e.get('eval_reward')))}, accuracy "
                f"{fmt(number(e.get('eval_accuracy')))}{k} ({fmt(e.get('eval_examples'))} examples)",
            )
        )
    out = [
        f"# Run report: {run.name}",
        "",
        f"Run directory `{run}`; {METRICS_FILE}: {m.lines} lines, {len(m.records)} steps used, "
        f"{len(m.problems)} problem line(s).",
        "",
        "## Summary",
        "",
        "| metric | value |",
        "|---|---|",
    ]
    out += [f"| {k} | {v} |" for k, v in rows]
    out += ["", "## Plots", ""]
    out += [f"![{p.stem}]({p.name})\n" for p in plots] or ["(no plots)", ""]
    out += [f"- {n}" for n in notes]
    out += ["", "## Checkpoints", ""]
    if checkpoints:
        out += ["| checkpoint | step | version | reward_mean | loss | kl | latest |", "|---|---|---|---|---|---|---|"]
        for ck in checkpoints:
            mm = ck.metrics
            flag = "yes" if ck.latest else (f"broken: {ck.problem}" if ck.problem else "")
            out.append(
                f"| {ck.path.name} | {fmt(ck.step)} | {fmt(ck.version)} | {fmt(number(mm.get('reward_mean')))} "
                f"| {fmt(number(mm.get('loss')))} | {fmt(number(mm.get('kl')))} | {flag} |"
            )
    else:
        out.append("(none)")
    if m.problems:
        out += ["", "## Skipped or replaced lines", ""] + [f"- {p}" for p in m.problems]
    return "\n".join(out) + "\n"


def write_report(run: Path, out: Path | None = None) -> Path:
    """Write plots, report.md and summary.json for the run into `out` (default RUN/report); returns report.md."""
    from runner.adapters import run_checkpoints

    run = Path(run)
    path = run / METRICS_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{run} has no {METRICS_FILE}; expected a run directory written by the learner")
    m = read_metrics(path)
    for p in m.problems:
        log.warning("%s %s", path, p)
    out = Path(out) if out else run / "report"
    out.mkdir(parents=True, exist_ok=True)
    s = summarize(m.records)
    try:
        plots, notes = make_plots(m.records, out, run.resolve().name, m.evals)
    except ImportError:
        plots, notes = [], ["matplotlib is not installed (pip install matplotlib); no plots were drawn"]
    checkpoints = run_checkpoints(run)
    write_atomic(out / "report.md", render_markdown(run, m, s, plots, notes, checkpoints))
    s["problems"] = m.problems
    s["evals"] = [{k: v for k, v in e.items() if k.startswith("eval_") or k in ("step", "version")} for e in m.evals]
    s["plots"] = [p.name for p in plots]
    s["checkpoints"] = [
        {"name": c.path.name, "step": c.step, "version": c.version, "latest": c.latest} for c in checkpoints
    ]
    write_atomic(out / "summary.json", json.dumps(s, indent=1) + "\n")
    return out / "report.md"


def cmd_report(args: argparse.Namespace) -> int:
    try:
        md = write_report(Path(args.run), Path(args.out) if args.out else None)
    except (FileNotFoundError, NotADirectoryError) as e:
        print(f"runner: error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {md} and plots in {md.parent}")
    return 0
