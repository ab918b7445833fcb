"""Config parsing: defaults, overrides, and one clear error line for every kind of bad value."""

import subprocess
import sys
import time
from pathlib import Path

import pytest

from runner.config import Config, ConfigError, load_config, parse_override

CONFIGS = sorted((Path(__file__).parent.parent / "configs").glob("*.toml"))


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_shipped_configs_are_valid(path):
    assert isinstance(load_config(path), Config)


def test_defaults_and_overrides(tmp_path):
    p = tmp_path / "job.toml"
    p.write_text("[learner]\nsteps = 7\n")
    c = load_config(p, ["learner.learning_rate=3e-4", 'lora.keys=["self_attn.q_proj"]', "source.task=arithmetic"])
    assert c.learner.steps == 7
    assert c.learner.learning_rate == 3e-4
    assert c.lora.keys == ["self_attn.q_proj"]
    assert c.source.task == "arithmetic"
    assert c.generation.port == 8000  # untouched default
    with pytest.raises(AttributeError):
        c.learner.steps = 3  # frozen


def test_int_accepted_where_float_expected(tmp_path):
    p = tmp_path / "job.toml"
    p.write_text("[lora]\nscale = 10\n")
    assert load_config(p).lora.scale == 10.0


@pytest.mark.parametrize(
    "text, must_contain",
    [
        ("[learner]\nstesp = 3\n", ["learner.stesp", "unknown key"]),
        ('[learner]\nsteps = "ten"\n', ["learner.steps", "'ten'", "integer"]),
        ("[learner]\nsteps = 1.5\n", ["learner.steps", "integer"]),
        ("[learner]\nsteps = true\n", ["learner.steps", "integer"]),
        ("[learner]\nlearning_rate = -1.0\n", ["learner.learning_rate", "-1.0", "positive"]),
        ("[learner]\ngroup_size = 1\n", ["learner.group_size", ">= 2"]),
        ('[source]\ntype = "gym"\n', ["source.type", "'gym'", "builtin"]),
        ('[source]\ntype = "verifiers"\n', ["source.environment", "empty"]),
        (
            '[learner]\nasync_depth = 1\nmax_staleness = 1\n[source]\ntype = "verifiers"\nenvironment = "e"\n',
            ["async_depth = 0"],
        ),
        ("[lora]\nkeys = [1, 2]\n", ["lora.keys", "list of strings"]),
        ("[generation]\nport = 70000\n", ["generation.port", "70000"]),
        ('[coordinator]\ncontrol = "localhost:5555"\n', ["coordinator.control", "tcp://"]),
        (
            "[coordinator]\nheartbeat_interval = 6.0\nheartbeat_timeout = 10.0\n",
            ["coordinator.heartbeat_timeout", "at least twice"],
        ),
        ("[generation]\nstall_timeout = -1.0\n", ["generation.stall_timeout", "-1.0"]),
        ("[lerner]\nsteps = 3\n", ["[lerner]", "unknown section"]),
        ("learner = 3\n", ["learner", "table"]),
        ("[learner\nsteps = 3\n", ["not valid TOML"]),
    ],
)
def test_bad_values_name_file_key_and_expectation(tmp_path, text, must_contain):
    p = tmp_path / "bad.toml"
    p.write_text(text)
    with pytest.raises(ConfigError) as e:
        load_config(p)
    message = str(e.value)
    assert "\n" not in message
    assert str(p) in message
    for part in must_contain:
        assert part in message


def test_bad_override(tmp_path):
    p = tmp_path / "job.toml"
    p.write_text("")
    with pytest.raises(ConfigError, match="section.key=value"):
        load_config(p, ["steps=3"])
    with pytest.raises(ConfigError, match="learner.steps"):
        load_config(p, ["learner.steps=abc"])
    assert parse_override("model.path=models/x") == ("model", "path", "models/x")


def test_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.toml")


def test_cli_rejects_bad_config_fast(tmp_path):
    """A misspelled key fails before anything starts: one line on stderr, exit 2, well under a second of work."""
    p = tmp_path / "bad.toml"
    p.write_text("[learner]\nlearnig_rate = 0.1\n")
    t0 = time.perf_counter()
    r = subprocess.run(
        [sys.executable, "-m", "runner.cli", "launch", str(p)], capture_output=True, text=True, timeout=30
    )
    elapsed = time.perf_counter() - t0
    assert r.returncode == 2
    assert "learner.learnig_rate" in r.stderr and str(p) in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1
    assert elapsed < 1.0  # the bar, interpreter start-up included: the CLI imports neither MLX nor numpy
    r = subprocess.run(
        [sys.executable, "-m", "runner.cli", "launch", str(p), "--set", "learner.steps=x"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert r.returncode == 2


def test_control_plane_imports_no_mlx():
    code = (
        "import sys, runner.cli, runner.config, runner.wire, runner.coordinator, runner.status; "
        "assert 'mlx' not in sys.modules, 'mlx imported'"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)
