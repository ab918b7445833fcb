"""Secrets: the resolved config is the one copy of the API token a job keeps (mode 600); every other copy of the
config has it redacted; a token comes from the config file, a 0600 file or RUNNER_API_TOKEN, never from a command
line, and an error message never shows one.

A real launch with a token (no file of its run directory but the 0600 config holds it, no process's command line
did) is in tests/test_tracking.py, sharing its launch with the W&B and TensorBoard test; `runner serve` with a token
from a file and from the environment is in tests/test_generation.py; deploy files in tests/test_deploy.py; a
remote worker that brings no token in tests/test_security.py."""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import pytest

from runner import cli
from runner.config import (
    API_TOKEN_ENV,
    REDACTED,
    ConfigError,
    api_token_override,
    build_config,
    config_toml,
    load_config,
    parse_override,
    redact,
    write_resolved,
)

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised only on Python 3.10
    import tomli as tomllib

TOKEN = "s3cret-token-for-tests"


def token_file(path: Path, text: str = TOKEN + "\n", mode: int = 0o600) -> Path:
    path.write_text(text)
    path.chmod(mode)
    return path


def test_the_resolved_config_is_0600_and_the_only_copy_with_the_token(tmp_path):
    config = build_config({"security": {"api_token": TOKEN}, "learner": {"steps": 3}})
    path = tmp_path / "config.resolved.toml"
    path.write_text("an older, world-readable file\n")
    path.chmod(0o644)
    write_resolved(config, path)
    assert path.stat().st_mode & 0o777 == 0o600  # replaced by a file created 0600, not chmod-ed after
    assert load_config(path) == config  # the children start from it: whole, token included
    assert [p.name for p in tmp_path.iterdir()] == [path.name]  # no temp file left beside it

    copied = redact(config)
    assert copied["security"]["api_token"] == REDACTED and copied["learner"]["steps"] == 3
    assert config.security.api_token == TOKEN  # the config itself is left alone
    assert TOKEN not in config_toml(config)  # what the coordinator's get_config sends
    assert tomllib.loads(config_toml(config))["security"]["api_token"] == REDACTED
    assert redact(build_config({}))["security"]["api_token"] == ""  # no token: nothing to mark


def test_the_token_comes_from_a_0600_file_or_the_environment(tmp_path, monkeypatch, caplog):
    secret = token_file(tmp_path / "api-token", f"  {TOKEN}\n\n")
    job = tmp_path / "job.toml"
    job.write_text(f'[security]\napi_token_file = "{secret}"\n')
    config = load_config(job)
    # The built config carries the token itself (the resolved config is whole) and the file's path no more.
    assert config.security.api_token == TOKEN and config.security.api_token_file == ""
    assert "readable by other users" not in caplog.text

    monkeypatch.delenv(API_TOKEN_ENV, raising=False)
    assert api_token_override() is None
    monkeypatch.setenv(API_TOKEN_ENV, "from-the-environment")
    assert api_token_override() == "from-the-environment"
    assert api_token_override(str(secret)) == TOKEN  # --api-token-file before the environment

    loose = token_file(tmp_path / "loose-token", mode=0o644)
    with caplog.at_level(logging.WARNING, logger="runner.config"):
        assert api_token_override(str(loose)) == TOKEN
    assert f"API token file {loose} is readable by other users; run `chmod 600 {loose}`" in caplog.text

    inline = token_file(tmp_path / "inline.toml", f'[security]\napi_token = "{TOKEN}"\n')  # 0600: no warning
    caplog.clear()
    assert load_config(inline).security.api_token == TOKEN
    assert "other users can read it" not in caplog.text
    inline.chmod(0o644)
    assert load_config(inline).security.api_token == TOKEN
    assert f"{inline} holds [security] api_token and other users can read it" in caplog.text
    assert TOKEN not in caplog.text


@pytest.mark.parametrize(
    "security, message",
    [
        ({"api_token_file": "missing-token"}, "missing-token: cannot read the API token (No such file or directory)"),
        ({"api_token_file": "empty"}, "empty: expected the API token alone on one line"),
        ({"api_token_file": "two-lines"}, "two-lines: expected the API token alone on one line"),
        ({"api_token_file": "good", "api_token": TOKEN}, "set security.api_token or security.api_token_file, not both"),
        ({"api_token": 12345}, f"'security.api_token' = {REDACTED} is not valid; expected a string"),
    ],
)
def test_a_bad_token_setting_is_one_line_that_never_shows_a_token(tmp_path, monkeypatch, security, message):
    monkeypatch.chdir(tmp_path)
    token_file(tmp_path / "empty", "\n")
    token_file(tmp_path / "two-lines", f"{TOKEN}\n{TOKEN}-2\n")
    token_file(tmp_path / "good")
    with pytest.raises(ConfigError) as e:
        build_config({"security": security}, where="job.toml")
    assert message in str(e.value) and "\n" not in str(e.value)
    assert TOKEN not in str(e.value) and "12345" not in str(e.value)


def test_a_token_is_refused_on_any_command_line(tmp_path, capsys):
    """`--set security.api_token=T` (launch, check, deploy), `runner serve --api-token T` and `runner worker
    generate --api-token T` fail before anything starts, name the two alternatives and never echo the value."""
    job = tmp_path / "job.toml"
    job.write_text("[learner]\nsteps = 3\n")
    for command in (["launch", str(job)], ["check", str(job)]):
        assert cli.main([*command, "--set", f"security.api_token={TOKEN}"]) == 2
        err = capsys.readouterr().err
        assert "--set security.api_token=... is refused" in err and "api_token_file" in err and API_TOKEN_ENV in err
        assert TOKEN not in err
    assert not (tmp_path / "runs").exists()
    with pytest.raises(ConfigError, match="refused") as e:  # every --set, `python -m workers.learner.trainer`'s too
        parse_override(f"security.api_token={TOKEN}")
    assert TOKEN not in str(e.value)
    for command in (
        ["serve", "--model", str(tmp_path), "--api-token", TOKEN],
        ["serve", "--model", str(tmp_path), f"--api-token={TOKEN}"],
        ["worker", "generate", "--join", "tcp://127.0.0.1:5555", "--api-token", TOKEN],
    ):
        with pytest.raises(SystemExit) as refused:
            cli.main(command)
        assert refused.value.code == 2
        err = capsys.readouterr().err
        assert "--api-token is refused" in err and "--api-token-file PATH" in err and API_TOKEN_ENV in err
        assert TOKEN not in err


def test_a_launch_takes_the_token_from_the_environment_into_its_0600_config(tmp_path, tiny_model, monkeypatch):
    """RUNNER_API_TOKEN reaches the job through `runner launch`: the resolved config (0600) holds it for the
    children. The launch stops at once on a port that is taken, after the config was written."""
    import socket

    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    port = taken.getsockname()[1]
    job = tmp_path / "job.toml"
    job.write_text(
        f'[model]\npath = "{tiny_model}"\n[checkpoint]\ndir = "{tmp_path / "run"}"\n'
        f'[coordinator]\ncontrol = "tcp://127.0.0.1:{port}"\nweights = "tcp://127.0.0.1:0"\n'
    )
    monkeypatch.setenv(API_TOKEN_ENV, TOKEN)
    try:
        with pytest.raises(Exception, match="Address already in use"):
            cli.main(["launch", str(job)])
    finally:
        taken.close()
    resolved = tmp_path / "run" / "config.resolved.toml"
    assert resolved.stat().st_mode & 0o777 == 0o600
    assert load_config(resolved).security.api_token == TOKEN
