"""One job per run directory: `runner launch` holds an flock on `RUN/.lock` (which holds its pid) for its life.

The lock goes with the process: the kernel releases it when `runner launch` exits, however it exits (kill -9
included), so a stale file never blocks the next launch. A second launch on the same directory fails at once with
`RunDirInUse`, naming the holder's pid.

Children check it: `runner launch` puts `JOB_ENV` = "PID:LOCKFILE" in their environment (never on a command line),
and `check_job` says whether that job still holds its lock: a child started by a launch that died, or whose run dir
another launch has since taken, exits instead of writing the same checkpoints and metrics as the new job.
"""

from __future__ import annotations

import fcntl
import logging
import os
from pathlib import Path

log = logging.getLogger(__name__)

LOCK_FILE = ".lock"
JOB_ENV = "RUNNER_JOB_LOCK"  # "PID:LOCKFILE" of the launch that started this process


class RunDirInUse(RuntimeError):
    """Another live `runner launch` holds the run directory."""


def lock_run_dir(run_dir: str | Path) -> int:
    """Take the run directory's lock for the life of this process and write our pid into it; returns the open file
    descriptor (keep it open: closing it releases the lock). RunDirInUse if another process holds it."""
    path = Path(run_dir) / LOCK_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        holder = _read_pid(path)
        raise RunDirInUse(
            f"run dir {Path(run_dir)} is in use by another `runner launch` (pid {holder if holder else 'unknown'}); "
            "stop it first or use another checkpoint.dir"
        ) from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return fd


def job_environment(run_dir: str | Path) -> dict[str, str]:
    """What the launch holding `run_dir`'s lock puts in its children's environment."""
    return {JOB_ENV: f"{os.getpid()}:{(Path(run_dir) / LOCK_FILE).resolve()}"}


def held(path: str | Path) -> bool:
    """True if some process holds an flock on `path` (we try to take it without blocking: that must fail)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)  # closing also drops the shared lock we may have taken
    return False


def check_job(environ: dict[str, str] | None = None) -> str | None:
    """None if this process's job (JOB_ENV) still holds its run dir's lock, or if it was not started by a launch;
    otherwise why not, in one sentence."""
    value = (os.environ if environ is None else environ).get(JOB_ENV)
    if not value:
        return None
    pid_text, _, path = value.partition(":")
    if not held(path):
        return f"the `runner launch` (pid {pid_text}) that started this process no longer holds {path}"
    holder = _read_pid(Path(path))
    if str(holder) != pid_text:
        return f"{path} is now held by another `runner launch` (pid {holder}), not pid {pid_text} that started us"
    return None


def _read_pid(path: Path) -> int | None:
    try:
        return int(path.read_text().strip())
    except (OSError, ValueError):
        return None
