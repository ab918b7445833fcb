"""Render launchd plists (macOS) and systemd units (Linux) that run this install of `runner` as a service.

`render("launchd", config, out)` writes `com.runner.coordinator.plist`; `role="worker"` writes
`com.runner.worker.plist`, which runs `runner worker generate --join tcp://HOST:PORT` on another machine, with the
worker flags given to `runner deploy` (`--key`, `--server-key`, `--host`, `--port`, ...: the CLI adds the same flags to
both commands, and `worker_arguments` turns the given ones back into words). The systemd equivalents are
`runner-coordinator.service` and `runner-worker.service` (user units: `systemctl --user`).

Every path in a rendered file is absolute: the `runner` console script of the Python running this code (or
`python -m runner.cli` when there is no script), the config file, the working directory (where relative paths in the
config, such as `models/tiny` and `runs/job`, resolve; default: the current directory) and the log file.

The files are built in code (plists as dicts written by `plistlib`, so they are valid by construction) and the
examples in `deploy/` are produced by the same functions with placeholder paths (`python -m runner.deploy --examples
deploy`); a test keeps them in sync.

Secrets: a rendered file names files, never a secret. The coordinator's API token is in the job config it names
(`[security] api_token`, or the 0600 file named by `api_token_file`); a worker's is in the file its
`--api-token-file` names (checked to exist, as every path option is); CURVE secret keys are files too.

Restart policy, in both systems: a crash (non-zero exit, signal) restarts after a pause, a clean exit (a finished
job) does not. Stop sends SIGTERM and waits `STOP_TIMEOUT` seconds, long enough for the learner to checkpoint.
"""

from __future__ import annotations

import argparse
import logging
import os
import plistlib
import re
import sys
import sysconfig
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from runner.args import curve_from_args
from runner.config import ConfigError, load_config
from runner.files import write_atomic
from runner.keys import endpoint_host

log = logging.getLogger(__name__)

TARGETS = ("launchd", "systemd")
ROLES = ("coordinator", "worker")
STOP_TIMEOUT = 120  # seconds between SIGTERM and SIGKILL: room for a checkpoint
RESTART_DELAY = 10  # seconds between a crash and the restart
LAUNCHD_PATH = ("/opt/homebrew/bin", "/usr/local/bin", "/usr/bin", "/bin", "/usr/sbin", "/sbin")
SYSTEMD_PATH = ("/usr/local/bin", "/usr/bin", "/bin")
_WILDCARD_HOSTS = {"", "*", "0.0.0.0", "::"}
# Options of `runner worker generate` that name a file or directory on the worker's machine.
PATH_OPTIONS = frozenset({"--key", "--server-key", "--model", "--config", "--api-token-file"})
_JOIN = re.compile(r"^tcp://(?P<host>\[[^\]]+\]|[^:/\s]+):(?P<port>\d{1,5})$")


class DeployError(ConfigError):
    """The deploy request cannot be rendered; the message is one line for the user."""


@dataclass(frozen=True)
class Service:
    """Everything a service file needs, with absolute paths."""

    role: str
    command: tuple[str, ...]  # argv, absolute program first
    workdir: Path
    log_file: Path
    path_dirs: tuple[str, ...]  # PATH for the service, in order

    @property
    def path_env(self) -> str:
        return ":".join(dict.fromkeys(self.path_dirs))  # de-duplicated, order kept


# --------------------------------------------------------------------------- names


def launchd_label(role: str) -> str:
    return f"com.runner.{role}"


def launchd_filename(role: str) -> str:
    return f"{launchd_label(role)}.plist"


def systemd_filename(role: str) -> str:
    return f"runner-{role}.service"


def log_filename(role: str) -> str:
    return f"runner-{role}.log"


def default_log_dir(target: str, home: Path | None = None) -> Path:
    """Where each system keeps per-user logs: ~/Library/Logs/runner (shown by Console.app) on macOS,
    $XDG_STATE_HOME/runner/logs (default ~/.local/state/runner/logs) on Linux."""
    home = home or Path.home()
    if target == "launchd":
        return home / "Library" / "Logs" / "runner"
    state = os.environ.get("XDG_STATE_HOME") if home == Path.home() else None
    return (Path(state) if state else home / ".local" / "state") / "runner" / "logs"


# --------------------------------------------------------------------------- this install


def _is_executable_file(path: Path) -> bool:
    return path.is_file() and os.access(path, os.X_OK)


def runner_command() -> list[str]:
    """The absolute argv prefix that runs this install's CLI.

    The `runner` script next to this interpreter (a venv's or pyenv version's bin/), else the install's scripts
    directories, else `python -m runner.cli`. `shutil.which` is not used: it may find another install or a pyenv shim
    that depends on the caller's shell environment."""
    python = Path(sys.executable).absolute()  # not resolved: a venv's python is a symlink that must stay one
    candidates = [
        python.parent / "runner",
        Path(sysconfig.get_path("scripts")) / "runner",
        Path(sysconfig.get_path("scripts", sysconfig.get_preferred_scheme("user"))) / "runner",  # pip --user
    ]
    for candidate in candidates:
        if _is_executable_file(candidate):
            return [str(candidate.absolute())]
    log.info("no `runner` console script next to %s; services will run `%s -m runner.cli`", python, python)
    return [str(python), "-m", "runner.cli"]


# --------------------------------------------------------------------------- validation


def _require_config(config_path: Path) -> Path:
    path = Path(config_path).expanduser().absolute()
    if not path.is_file():
        raise DeployError(f"config file {path} not found; expected an existing job config (.toml) to deploy")
    load_config(path)  # a config that cannot start the job should not become a service
    return path


def _check_join(join: str) -> str:
    match = _JOIN.match(join.strip())
    if not match or not 0 < int(match["port"]) < 65536:
        raise DeployError(
            f"--join {join!r} is not valid; expected the coordinator's control address as tcp://HOST:PORT"
        )
    if match["host"].strip("[]") in _WILDCARD_HOSTS:
        raise DeployError(
            f"--join {join!r} names no host; expected the coordinator machine's address, e.g. tcp://mac-studio.local:5555"
        )
    return join.strip()


def _default_join(config_path: Path) -> str:
    control = load_config(config_path).coordinator.control
    if endpoint_host(control) in _WILDCARD_HOSTS:
        raise DeployError(
            f"a worker needs --join tcp://HOST:PORT: {config_path} binds {control}, which names no host to join"
        )
    return control


def _check_choice(value: str, choices: Sequence[str], what: str) -> None:
    if value not in choices:
        raise DeployError(f"{what} {value!r} is not valid; expected one of: {', '.join(choices)}")


def _check_path_text(path: Path) -> Path:
    if any(ord(c) < 32 for c in str(path)):
        raise DeployError(f"path {str(path)!r} contains a control character; expected a plain file path")
    return path


# --------------------------------------------------------------------------- service description


def worker_arguments(args: argparse.Namespace, actions: Sequence[argparse.Action]) -> list[str]:
    """The `runner worker generate` flags among `actions` that `args` sets to other than their default, as
    command-line words for the service. A path option is made absolute (the service starts in its own working
    directory) and must exist; CURVE keys go in pairs; any flag with `--role coordinator` is refused."""
    words: list[str] = []
    for action in actions:
        value = getattr(args, action.dest)
        if value is None or value == action.default:
            continue
        option = action.option_strings[-1]
        if args.role != "worker":
            raise DeployError(
                f"{option} applies only to the worker role; the coordinator takes its settings from the config"
            )
        if action.nargs == 0:  # a switch
            words.append(option)
            continue
        if option in PATH_OPTIONS:
            path = _check_path_text(Path(value).expanduser().absolute())
            if not path.exists():
                raise DeployError(f"{option} {value}: {path} not found; expected an existing path on this machine")
            value = path
        words += [option, str(value)]
    try:
        curve_from_args(args)
    except ValueError as e:
        raise DeployError(str(e)) from None
    return words


def role_arguments(role: str, config_path: Path, join: str | None, extra_args: Sequence[str] = ()) -> list[str]:
    """The CLI arguments after the program: `launch CONFIG` or `worker generate --join ENDPOINT`."""
    if role == "coordinator":
        return ["launch", str(config_path), *extra_args]
    return ["worker", "generate", "--join", join or "", *extra_args]


def build_service(
    target: str,
    role: str,
    program: Sequence[str],
    config_path: Path,
    workdir: Path,
    log_dir: Path,
    *,
    join: str | None = None,
    extra_args: Sequence[str] = (),
) -> Service:
    """Assemble a Service from already-checked absolute paths (pure: touches no file)."""
    system_path = LAUNCHD_PATH if target == "launchd" else SYSTEMD_PATH
    return Service(
        role=role,
        command=(*program, *role_arguments(role, config_path, join, extra_args)),
        workdir=workdir,
        log_file=log_dir / log_filename(role),
        path_dirs=(str(Path(program[0]).parent), *system_path),
    )


def launchd_plist(service: Service) -> dict:
    """A per-user LaunchAgent: started at load, restarted after a crash (not after a clean exit), logs to a file."""
    return {
        "Label": launchd_label(service.role),
        "ProgramArguments": list(service.command),
        "WorkingDirectory": str(service.workdir),
        "RunAtLoad": True,
        "KeepAlive": {"SuccessfulExit": False},  # restart on non-zero exit or signal only
        "ThrottleInterval": RESTART_DELAY,  # minimum seconds between launches
        "ExitTimeOut": STOP_TIMEOUT,  # seconds between SIGTERM and SIGKILL on stop
        "ProcessType": "Interactive",  # no background CPU/IO throttling: this is the machine's main job
        "StandardOutPath": str(service.log_file),
        "StandardErrorPath": str(service.log_file),
        "EnvironmentVariables": {"PATH": service.path_env, "PYTHONUNBUFFERED": "1"},
    }


def _systemd_escape(text: str) -> str:
    """Escape systemd specifiers (%) for any setting value."""
    return text.replace("%", "%%")


def _systemd_arg(arg: str) -> str:
    """One ExecStart word: specifiers and $ escaped, quoted when it holds blanks, quotes or backslashes."""
    arg = _systemd_escape(arg).replace("$", "$$")
    if arg and not re.search(r"[\s\"'\\;]", arg):
        return arg
    return '"' + arg.replace("\\", "\\\\").replace('"', '\\"') + '"'


def systemd_unit(service: Service) -> str:
    """A systemd service unit (works as a user unit or, with User=, a system unit)."""
    what = "coordinator (runs the job)" if service.role == "coordinator" else "generation worker (joins a coordinator)"
    lines = [
        f"# runner {service.role}: rendered by `runner deploy systemd`; "
        "re-render after moving or upgrading the install.",
        "[Unit]",
        f"Description=runner {what}",
        "After=network-online.target",
        f"StartLimitIntervalSec={30 * RESTART_DELAY}",
        "StartLimitBurst=5",
        "",
        "[Service]",
        "Type=simple",
        f"WorkingDirectory={_systemd_escape(str(service.workdir))}",
        "ExecStart=" + " ".join(_systemd_arg(a) for a in service.command),
        f'Environment="PATH={_systemd_escape(service.path_env)}" "PYTHONUNBUFFERED=1"',
        "Restart=on-failure",
        f"RestartSec={RESTART_DELAY}",
        "KillSignal=SIGTERM",
        "KillMode=mixed",  # SIGTERM to runner only: it stops its own workers in order; SIGKILL to all at the timeout
        f"TimeoutStopSec={STOP_TIMEOUT}",
        f"StandardOutput=append:{_systemd_escape(str(service.log_file))}",
        "StandardError=inherit",
        "",
        "[Install]",
        "WantedBy=default.target",
        "",
    ]
    return "\n".join(lines)


def service_file(target: str, service: Service) -> tuple[str, bytes]:
    """(file name, file bytes) for a service."""
    if target == "launchd":
        return launchd_filename(service.role), plistlib.dumps(launchd_plist(service), sort_keys=False)
    return systemd_filename(service.role), systemd_unit(service).encode()


# --------------------------------------------------------------------------- writing


def render(
    target: str,
    config_path: Path,
    out_dir: Path,
    *,
    role: str = "coordinator",
    join: str | None = None,
    workdir: Path | None = None,
    log_dir: Path | None = None,
    extra_args: Sequence[str] = (),
) -> list[Path]:
    """Write the `target` ('launchd' or 'systemd') service file for `role` into `out_dir`; returns the written paths.

    `join` (worker only) is the coordinator's control address; without it the config's [coordinator] control is
    used when it names a host. `workdir` defaults to the current directory, `log_dir` to `default_log_dir(target)`
    (created). `out_dir` may be the system's own directory (~/Library/LaunchAgents, ~/.config/systemd/user).
    `extra_args` are appended to the command line (e.g. a worker's `--port 8001`)."""
    _check_choice(target, TARGETS, "deploy target")
    _check_choice(role, ROLES, "role")
    config = _check_path_text(_require_config(config_path))
    if role == "coordinator" and join:
        raise DeployError(
            f"--join {join!r} applies only to the worker role; the coordinator binds [coordinator] control"
        )
    if role == "worker":
        join = _check_join(join) if join else _default_join(config)
    out_dir = _check_path_text(Path(out_dir).expanduser().absolute())
    workdir = _check_path_text(Path(workdir).expanduser().absolute() if workdir else Path.cwd())
    if not workdir.is_dir():
        raise DeployError(f"working directory {workdir} not found; expected an existing directory")
    log_dir = _check_path_text(Path(log_dir).expanduser().absolute() if log_dir else default_log_dir(target))
    out_dir.mkdir(parents=True, exist_ok=True)
    log_dir.mkdir(parents=True, exist_ok=True)
    service = build_service(target, role, runner_command(), config, workdir, log_dir, join=join, extra_args=extra_args)
    name, data = service_file(target, service)
    path = out_dir / name
    write_atomic(path, data)
    log.info("wrote %s (logs: %s)", path, service.log_file)
    return [path]


# --------------------------------------------------------------------------- examples in deploy/

EXAMPLE_HOMES = {"launchd": Path("/Users/you"), "systemd": Path("/home/you")}
EXAMPLE_JOIN = "tcp://coordinator.local:5555"


def example_worker_arguments(project: Path) -> list[str]:
    """A remote worker as the README starts one: CURVE keys, the job's API token from a 0600 file, and HTTP on every
    interface."""
    keys = project / "keys"
    return [
        "--key",
        str(keys / "worker.key_secret"),
        "--server-key",
        str(keys / "coordinator.key"),
        "--api-token-file",
        str(keys / "api-token"),
        "--host",
        "0.0.0.0",
    ]


def example_files() -> dict[str, bytes]:
    """The files in `deploy/`: every target and role rendered for a placeholder install in ~/runner/.venv."""
    files = {}
    for target in TARGETS:
        home = EXAMPLE_HOMES[target]
        project = home / "runner"
        for role in ROLES:
            service = build_service(
                target,
                role,
                [str(project / ".venv" / "bin" / "runner")],
                project / "configs" / "quickstart.toml",
                project,
                default_log_dir(target, home),
                join=EXAMPLE_JOIN,
                extra_args=example_worker_arguments(project) if role == "worker" else (),
            )
            name, data = service_file(target, service)
            files[name] = data
    return files


def write_examples(out_dir: Path) -> list[Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for name, data in example_files().items():
        write_atomic(out_dir / name, data)
        written.append(out_dir / name)
    return written


def _main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m runner.deploy", description="regenerate the examples in deploy/")
    parser.add_argument("--examples", type=Path, required=True, metavar="DIR")
    args = parser.parse_args(argv)
    for path in write_examples(args.examples):
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(_main())
