"""Tests for runner.deploy: rendered launchd plists and systemd units name existing absolute paths and are valid."""

from __future__ import annotations

import configparser
import os
import plistlib
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from runner import deploy
from runner.config import ConfigError
from runner.deploy import DeployError, render

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def config(tmp_path: Path) -> Path:
    path = tmp_path / "job" / "job.toml"
    path.parent.mkdir()
    path.write_text('[model]\npath = "models/tiny"\n\n[learner]\nsteps = 3\n')
    return path


@pytest.fixture
def dirs(tmp_path: Path) -> dict[str, Path]:
    workdir = tmp_path / "work"
    workdir.mkdir()
    return {"out": tmp_path / "out", "logs": tmp_path / "logs" / "runner", "workdir": workdir}


def _render(target: str, config: Path, dirs: dict[str, Path], **kw) -> Path:
    (path,) = render(target, config, dirs["out"], workdir=dirs["workdir"], log_dir=dirs["logs"], **kw)
    return path


def _load_plist(path: Path) -> dict:
    with path.open("rb") as f:
        return plistlib.load(f)


def _assert_program_ok(argv: list[str]) -> None:
    program = Path(argv[0])
    assert program.is_absolute() and program.is_file() and os.access(program, os.X_OK), argv
    if argv[1:3] == ["-m", "runner.cli"]:
        assert program == Path(sys.executable).absolute()


def _parse_unit(path: Path) -> configparser.ConfigParser:
    parser = configparser.ConfigParser(interpolation=None, strict=False, comment_prefixes=("#", ";"))
    parser.optionxform = str  # systemd keys are case-sensitive
    parser.read_string(path.read_text())
    return parser


# --------------------------------------------------------------------------- launchd


def test_coordinator_plist_parses_and_names_existing_paths(config: Path, dirs):
    path = _render("launchd", config, dirs)
    assert path == dirs["out"] / "com.runner.coordinator.plist"
    plist = _load_plist(path)
    assert plist["Label"] == "com.runner.coordinator"
    argv = plist["ProgramArguments"]
    _assert_program_ok(argv)
    assert argv[-2:] == ["launch", str(config)]
    assert Path(argv[-1]).is_absolute() and Path(argv[-1]).is_file()
    assert Path(plist["WorkingDirectory"]) == dirs["workdir"] and dirs["workdir"].is_dir()
    assert plist["KeepAlive"] == {"SuccessfulExit": False}
    assert plist["RunAtLoad"] is True
    assert plist["ThrottleInterval"] > 0 and plist["ExitTimeOut"] >= 60
    for key in ("StandardOutPath", "StandardErrorPath"):
        log = Path(plist[key])
        assert log.is_absolute() and log.parent == dirs["logs"] and log.parent.is_dir()
    env = plist["EnvironmentVariables"]
    assert env["PATH"].split(":")[0] == str(Path(argv[0]).parent)
    assert "/usr/bin" in env["PATH"].split(":")


def test_worker_plist_joins_the_coordinator(config: Path, dirs):
    path = _render("launchd", config, dirs, role="worker", join="tcp://10.0.0.5:5555", extra_args=["--port", "8001"])
    assert path.name == "com.runner.worker.plist"
    plist = _load_plist(path)
    assert plist["Label"] == "com.runner.worker"
    argv = plist["ProgramArguments"]
    _assert_program_ok(argv)
    assert argv[-6:] == ["worker", "generate", "--join", "tcp://10.0.0.5:5555", "--port", "8001"]
    assert Path(plist["StandardOutPath"]).name == "runner-worker.log"


def test_rendered_program_runs_this_install(config: Path, dirs):
    argv = _load_plist(_render("launchd", config, dirs))["ProgramArguments"]
    prefix = argv[: argv.index("launch")]
    out = subprocess.run([*prefix, "--version"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and out.stdout.startswith("runner "), out


def test_paths_with_special_characters_stay_exact(tmp_path: Path, dirs):
    odd = tmp_path / "my jobs & <runs> 100%"
    odd.mkdir()
    config = odd / "job $HOME.toml"
    config.write_text("")
    plist = _load_plist(_render("launchd", config, dirs))
    assert plist["ProgramArguments"][-1] == str(config)
    unit = _parse_unit(_render("systemd", config, dirs))
    exec_start = unit["Service"]["ExecStart"]
    assert '"' in exec_start and "100%%" in exec_start and "$$HOME" in exec_start
    words = shlex.split(exec_start.replace("%%", "%").replace("$$", "$"))
    assert words[-1] == str(config)


def test_default_log_dir_follows_each_system(config: Path, tmp_path: Path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.delenv("XDG_STATE_HOME", raising=False)
    (plist_path,) = render("launchd", config, tmp_path / "agents")
    log = Path(_load_plist(plist_path)["StandardOutPath"])
    assert log == tmp_path / "home" / "Library" / "Logs" / "runner" / "runner-coordinator.log"
    assert log.parent.is_dir()
    (unit_path,) = render("systemd", config, tmp_path / "units")
    assert _parse_unit(unit_path)["Service"]["StandardOutput"] == (
        f"append:{tmp_path}/home/.local/state/runner/logs/runner-coordinator.log"
    )


def test_render_is_atomic_and_replaces(config: Path, dirs):
    first = _render("launchd", config, dirs)
    second = _render("launchd", config, dirs, extra_args=["--set", "learner.steps=5"])
    assert first == second
    assert _load_plist(second)["ProgramArguments"][-2:] == ["--set", "learner.steps=5"]
    assert sorted(p.name for p in dirs["out"].iterdir()) == ["com.runner.coordinator.plist"]  # no temp files left


# --------------------------------------------------------------------------- systemd


@pytest.mark.parametrize("role", ["coordinator", "worker"])
def test_unit_has_sections_and_existing_exec_paths(config: Path, dirs, role: str):
    join = "tcp://192.168.1.10:5555" if role == "worker" else None
    path = _render("systemd", config, dirs, role=role, join=join)
    assert path.name == f"runner-{role}.service"
    unit = _parse_unit(path)
    assert {"Unit", "Service", "Install"} <= set(unit.sections())
    service = unit["Service"]
    argv = shlex.split(service["ExecStart"])
    _assert_program_ok(argv)
    if role == "coordinator":
        assert argv[-2:] == ["launch", str(config)]
    else:
        assert argv[-4:] == ["worker", "generate", "--join", join]
    assert service["Type"] == "simple"
    assert service["Restart"] == "on-failure"
    assert int(service["RestartSec"]) > 0
    assert service["KillSignal"] == "SIGTERM"
    assert int(service["TimeoutStopSec"]) >= 60
    assert Path(service["WorkingDirectory"]).is_dir()
    log = Path(service["StandardOutput"].removeprefix("append:"))
    assert service["StandardOutput"].startswith("append:") and log.is_absolute() and log.parent.is_dir()
    assert unit["Install"]["WantedBy"] == "default.target"


@pytest.mark.parametrize("role", ["coordinator", "worker"])
def test_unit_passes_systemd_analyze_verify(config: Path, dirs, role: str):
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze is not installed here; the section/ExecStart checks above still ran")
    path = _render("systemd", config, dirs, role=role, join="tcp://192.168.1.10:5555" if role == "worker" else None)
    out = subprocess.run([analyze, "verify", str(path)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert path.name not in out.stderr, out.stderr  # no warnings about our unit


def test_systemd_analyze_catches_a_missing_program(config: Path, dirs, tmp_path: Path):
    """The verify test above is meaningful: the same tool rejects a unit whose program does not exist."""
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze is not installed here")
    good = _render("systemd", config, dirs).read_text()
    broken = tmp_path / "broken-runner.service"
    program = shlex.split(_parse_unit(dirs["out"] / "runner-coordinator.service")["Service"]["ExecStart"])[0]
    broken.write_text(good.replace(program, str(tmp_path / "no-such-runner"), 1))
    out = subprocess.run([analyze, "verify", str(broken)], capture_output=True, text=True, timeout=60)
    assert out.returncode != 0 and "no-such-runner" in out.stderr


# --------------------------------------------------------------------------- worker flags through the CLI


def _exec_start_argv(unit_path: Path) -> list[str]:
    """ExecStart as argv, undoing systemd's escaping of % and $ (quoting is shell-like for these words)."""
    return shlex.split(_parse_unit(unit_path)["Service"]["ExecStart"].replace("%%", "%").replace("$$", "$"))


def _worker_namespace(argv: list[str]):
    """Parse a rendered command line with the real `runner` parser, from the subcommand on."""
    from runner.cli import build_parser

    return build_parser().parse_args(argv[argv.index("worker") :])


def test_every_worker_flag_reaches_the_service_and_parses_back(config: Path, dirs, tmp_path: Path, monkeypatch):
    from runner.cli import build_parser, cmd_worker_generate, main

    keys = tmp_path / "my keys"  # a blank: the unit must quote it
    keys.mkdir()
    (keys / "worker.key_secret").write_text("")
    (keys / "coordinator.key").write_text("")
    (keys / "api-token").write_text("t0ken\n")
    (tmp_path / "models" / "tiny").mkdir(parents=True)
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "config.resolved.toml").write_text("")
    monkeypatch.chdir(tmp_path)  # relative paths are given: the service must get them absolute
    given = {
        "--join": "tcp://10.0.0.5:5555",
        "--key": "my keys/worker.key_secret",
        "--server-key": "my keys/coordinator.key",
        "--host": "0.0.0.0",
        "--port": "8001",
        "--model": "models/tiny",
        "--name": "mini-2",
        "--config": "run/config.resolved.toml",
        "--api-token-file": "my keys/api-token",
        "--advertise-url": "http://mini-2.local:8001",
    }
    expected = {
        "join": "tcp://10.0.0.5:5555",
        "key": str(keys / "worker.key_secret"),
        "server_key": str(keys / "coordinator.key"),
        "host": "0.0.0.0",
        "port": 8001,
        "model": str(tmp_path / "models" / "tiny"),
        "name": "mini-2",
        "config": str(tmp_path / "run" / "config.resolved.toml"),
        "api_token_file": str(keys / "api-token"),
        "advertise_url": "http://mini-2.local:8001",
    }
    # Every flag of `runner worker generate` is exercised here: a new flag must be given a value above, and it
    # reaches the service only if it is added where deploy gets its flags too (cli.add_worker_generate_arguments).
    defaults = vars(build_parser().parse_args(["worker", "generate", "--join", "tcp://h:1"]))
    refused = {"api_token"}  # `--api-token T`: a token is never a command-line value
    assert set(defaults) - {"command", "role", "func", "verbose", *refused} == set(expected)
    assert all(defaults[dest] != value for dest, value in expected.items() if dest != "join")

    common = ["--role", "worker", "--out", str(dirs["out"]), "--log-dir", str(dirs["logs"])]
    flags = [word for option, value in given.items() for word in (option, value)]
    for target in ("launchd", "systemd"):
        assert main(["deploy", target, str(config), *common, "--workdir", str(dirs["workdir"]), *flags]) == 0
    plist_argv = _load_plist(dirs["out"] / "com.runner.worker.plist")["ProgramArguments"]
    unit_argv = _exec_start_argv(dirs["out"] / "runner-worker.service")
    assert plist_argv == unit_argv
    args = _worker_namespace(plist_argv)
    assert args.func is cmd_worker_generate
    assert {dest: getattr(args, dest) for dest in expected} == expected


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--key", "k"], "--key and --server-key go together"),
        (["--key", "nope.key_secret", "--server-key", "k"], "--key nope.key_secret: "),
        (["--model", "no/such/model"], "not found; expected an existing path on this machine"),
    ],
)
def test_bad_worker_flags_are_refused_with_one_clear_line(
    config: Path, dirs, tmp_path: Path, monkeypatch, capsys, flags: list[str], message: str
):
    from runner.cli import main

    (tmp_path / "k").write_text("")
    monkeypatch.chdir(tmp_path)
    command = ["deploy", "launchd", str(config), "--out", str(dirs["out"]), "--role", "worker"]
    assert main([*command, "--join", "tcp://10.0.0.5:5555", *flags]) == 2
    err = capsys.readouterr().err
    assert err.startswith("runner: error: ") and message in err and err.count("\n") == 1, err
    assert not dirs["out"].exists()


def test_worker_flags_are_refused_for_the_coordinator(config: Path, dirs, capsys):
    from runner.cli import main

    assert main(["deploy", "systemd", str(config), "--out", str(dirs["out"]), "--port", "8001"]) == 2
    assert "--port applies only to the worker role" in capsys.readouterr().err
    assert not dirs["out"].exists()


# --------------------------------------------------------------------------- errors


def test_missing_config_is_refused(tmp_path: Path, dirs):
    with pytest.raises(DeployError, match=r"config file .*nope\.toml not found"):
        render("launchd", tmp_path / "nope.toml", dirs["out"])
    assert not dirs["out"].exists()


def test_invalid_config_is_refused(tmp_path: Path, dirs):
    bad = tmp_path / "bad.toml"
    bad.write_text("[learner]\nsteps = -1\n")
    with pytest.raises(ConfigError, match="learner.steps"):
        render("systemd", bad, dirs["out"])


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"target": "docker"}, "deploy target 'docker' is not valid"),
        ({"role": "learner"}, "role 'learner' is not valid"),
        ({"role": "worker", "join": "10.0.0.5:5555"}, "expected the coordinator's control address as tcp://HOST:PORT"),
        ({"role": "worker", "join": "tcp://0.0.0.0:5555"}, "names no host"),
        ({"role": "worker", "join": "tcp://host:99999"}, "tcp://HOST:PORT"),
        ({"role": "coordinator", "join": "tcp://10.0.0.5:5555"}, "applies only to the worker role"),
    ],
)
def test_bad_requests_are_refused_with_one_clear_line(config: Path, dirs, kwargs: dict, message: str):
    target = kwargs.pop("target", "launchd")
    with pytest.raises(DeployError) as e:
        render(target, config, dirs["out"], log_dir=dirs["logs"], **kwargs)
    assert message in str(e.value) and "\n" not in str(e.value)


def test_worker_without_join_uses_config_control_when_it_names_a_host(tmp_path: Path, dirs):
    config = tmp_path / "c.toml"
    config.write_text('[coordinator]\ncontrol = "tcp://studio.local:5555"\n')
    plist = _load_plist(_render("launchd", config, dirs, role="worker"))
    assert plist["ProgramArguments"][-2:] == ["--join", "tcp://studio.local:5555"]
    config.write_text('[coordinator]\ncontrol = "tcp://0.0.0.0:5555"\n')
    with pytest.raises(DeployError, match="a worker needs --join"):
        _render("launchd", config, dirs, role="worker")


def test_missing_workdir_is_refused(config: Path, tmp_path: Path):
    with pytest.raises(DeployError, match="working directory .* not found"):
        render("systemd", config, tmp_path / "out", workdir=tmp_path / "gone", log_dir=tmp_path / "logs")


def test_runner_command_falls_back_to_python_module(monkeypatch, tmp_path: Path):
    fake_python = tmp_path / "bin" / "python3"
    fake_python.parent.mkdir()
    fake_python.write_text("")
    monkeypatch.setattr(sys, "executable", str(fake_python))
    monkeypatch.setattr(deploy.sysconfig, "get_path", lambda *a, **k: str(tmp_path / "nowhere"))
    assert deploy.runner_command() == [str(fake_python), "-m", "runner.cli"]


# --------------------------------------------------------------------------- deploy/ examples


def test_deploy_examples_are_in_sync_with_the_code():
    expected = deploy.example_files()
    for name, data in expected.items():
        path = REPO / "deploy" / name
        assert path.is_file(), f"missing {path}: run `python -m runner.deploy --examples deploy`"
        assert path.read_bytes() == data, f"{path} is stale: run `python -m runner.deploy --examples deploy`"
    for name in expected:
        if name.endswith(".plist"):
            assert plistlib.loads(expected[name])["ProgramArguments"][0].startswith("/Users/you/")


def test_rendered_files_point_at_token_files_and_never_hold_a_token(tmp_path: Path, dirs, capsys):
    """The coordinator's token stays in its 0600 token file (the config names the file), a worker's in the file its
    --api-token-file names; `--api-token T` is refused before anything is written."""
    from runner.cli import main

    token = "deploy-s3cret-token"
    token_file = tmp_path / "api-token"
    token_file.write_text(token + "\n")
    token_file.chmod(0o600)
    config = tmp_path / "job.toml"
    config.write_text(f'[coordinator]\ncontrol = "tcp://10.0.0.5:5555"\n[security]\napi_token_file = "{token_file}"\n')
    common = ["--out", str(dirs["out"]), "--log-dir", str(dirs["logs"]), "--workdir", str(dirs["workdir"])]
    for target in ("launchd", "systemd"):
        assert main(["deploy", target, str(config), *common]) == 0
        assert (
            main(["deploy", target, str(config), "--role", "worker", "--api-token-file", str(token_file), *common]) == 0
        )
    written = sorted(dirs["out"].iterdir())
    assert len(written) == 4
    for path in written:
        assert token.encode() not in path.read_bytes(), path
    assert str(token_file) in (dirs["out"] / "runner-worker.service").read_text()
    assert str(token_file) in _load_plist(dirs["out"] / "com.runner.worker.plist")["ProgramArguments"]

    with pytest.raises(SystemExit) as refused:
        main(["deploy", "systemd", str(config), "--role", "worker", "--api-token", token, *common])
    assert refused.value.code == 2
    err = capsys.readouterr().err
    assert "--api-token is refused" in err and "--api-token-file" in err and "RUNNER_API_TOKEN" in err
    assert token not in err
    assert sorted(dirs["out"].iterdir()) == written
