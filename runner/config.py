"""Job configuration: one TOML file, parsed into frozen dataclasses and validated before anything starts.

Every section and key has a default, so a config file names only what differs. Unknown keys, wrong types and
out-of-range values raise `ConfigError` with one line naming the file, the key, the bad value and what is expected.
`--set section.key=value` overrides are parsed as TOML values (so `--set learner.steps=5` is an int and
`--set lora.keys=["self_attn.q_proj"]` a list) and validated the same way.

Secrets (`[security] api_token`, the keys marked `secret` below) live only in 0600 files or the environment: the
token comes from the config file, `[security] api_token_file` or `RUNNER_API_TOKEN`, never from a command line (`ps`
shows those to every user), so `--set` refuses it. `write_resolved` writes the one copy a job keeps (mode 600);
everywhere else the config is copied (checkpoints, trackers, the coordinator's `get_config`) goes through `redact`.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import os
import sys
import typing
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised only on Python 3.10
    import tomli as tomllib


log = logging.getLogger(__name__)

API_TOKEN_ENV = "RUNNER_API_TOKEN"  # the HTTP API's bearer token, for those who keep it in the environment
REDACTED = "<redacted>"  # what a secret's value becomes wherever the config is copied


class ConfigError(ValueError):
    """A config file or override is invalid; the message is one line meant for the user."""


def _check(predicate: Callable[[Any], bool], expected: str) -> dict:
    return {"check": predicate, "expected": expected}


def _positive(kind: str = "number") -> dict:
    return _check(lambda v: v > 0, f"a positive {kind}")


def _non_negative(kind: str = "number") -> dict:
    return _check(lambda v: v >= 0, f"a {kind} >= 0")


def _unit_interval() -> dict:
    return _check(lambda v: 0.0 <= v <= 1.0, "a number between 0 and 1")


def _one_of(*choices: str) -> dict:
    return _check(lambda v: v in choices, "one of " + ", ".join(repr(c) for c in choices))


def _port() -> dict:
    return _check(lambda v: 0 <= v <= 65535, "a TCP port between 0 and 65535 (0 picks a free one)")


def _zmq_endpoint() -> dict:
    return _check(
        lambda v: v.startswith("tcp://") and v.rsplit(":", 1)[-1].isdigit(), "an address like tcp://HOST:PORT"
    )


@dataclass(frozen=True)
class ModelConfig:
    path: str = "models/tiny"  # a local model directory or a Hugging Face repo id (as mlx-lm takes them)
    # Which model `runner models prepare` builds at `path` when it is missing ("" = never prepare, fail instead).
    prepare: str = field(default="", metadata=_one_of("", "tiny", "smollm2"))
    adapter: str = ""  # an mlx-lm adapter directory to start from
    # "" / "auto": load the weights as stored; a float dtype: dequantize quantized weights and cast at load (both the
    # generation workers and the learner). float32 runs fastest on a Linux CPU with an optimized BLAS.
    dtype: str = field(default="", metadata=_one_of("", "auto", "float16", "bfloat16", "float32"))


@dataclass(frozen=True)
class LoraConfig:
    rank: int = field(default=8, metadata=_positive("integer"))
    scale: float = field(default=20.0, metadata=_positive())
    dropout: float = field(default=0.0, metadata=_check(lambda v: 0.0 <= v < 1.0, "a number in [0, 1)"))
    keys: list[str] = field(default_factory=lambda: ["self_attn.q_proj", "self_attn.v_proj"])
    # Number of transformer blocks, counted from the last, that get LoRA; -1 = all of them.
    num_layers: int = field(
        default=-1, metadata=_check(lambda v: v == -1 or v > 0, "-1 (all layers) or a positive integer")
    )


@dataclass(frozen=True)
class GenerationConfig:
    workers: int = field(default=1, metadata=_check(lambda v: 0 <= v <= 64, "an integer between 0 and 64"))
    host: str = "127.0.0.1"
    port: int = field(default=8000, metadata=_port())  # worker i listens on port + i (0 = free ports)
    front_port: int = field(default=0, metadata=_port())  # 0 = no routing front end
    max_batch: int = field(default=32, metadata=_positive("integer"))
    prefill_batch: int = field(default=8, metadata=_positive("integer"))
    max_queue: int = field(default=256, metadata=_positive("integer"))
    max_tokens: int = field(default=64, metadata=_positive("integer"))  # default when a request gives none
    max_tokens_limit: int = field(default=4096, metadata=_positive("integer"))  # hard cap per request
    # Seconds a worker's engine may have requests without finishing a batch step before the worker reports itself
    # failed and is restarted (a hung step); 0 = never. Keep it above the longest prefill of a full batch.
    stall_timeout: float = field(default=60.0, metadata=_non_negative())
    # true: the learner's process runs gen-0's engine (and starts its HTTP front) over the learner's own copy of the
    # base weights, so one Mac holds them once (a crash of either restarts both); for a model that would not fit
    # twice. false: gen-0 is a process of its own, which generates at full speed beside training (in one process the
    # training thread slows the engine down several times over, on MLX's CPU backend). Only for a single learner
    # process (no [learner] hosts).
    colocate: bool = False


@dataclass(frozen=True)
class LearnerConfig:
    learning_rate: float = field(default=1e-4, metadata=_positive())
    steps: int = field(default=50, metadata=_positive("integer"))
    group_size: int = field(
        default=8, metadata=_check(lambda v: v >= 2, "an integer >= 2 (GRPO compares completions within a group)")
    )
    batch_size: int = field(default=4, metadata=_positive("integer"))  # prompts (groups) per step
    micro_batch_size: int = field(default=0, metadata=_non_negative("integer"))  # sequences per micro-batch, 0 = all
    max_tokens: int = field(default=16, metadata=_positive("integer"))  # completion length for the built-in task
    temperature: float = field(default=1.0, metadata=_positive())
    clip_low: float = field(default=0.2, metadata=_unit_interval())
    clip_high: float = field(default=0.28, metadata=_non_negative())
    kl_coef: float = field(default=0.0, metadata=_non_negative())
    kl_estimator: str = field(default="k3", metadata=_one_of("k3", "mse", "abs"))
    entropy_coef: float = field(default=0.0, metadata=_non_negative())
    # Policy loss (workers/learner/grpo.py): "grpo" (token-level ratio to the proximal policy, clipped), "gspo"
    # (sequence-level ratio, clipped per sequence), "cispo" (the IS weight pi / mu against the sampling policy,
    # clipped, times log-prob: no token loses its gradient).
    loss: str = field(default="grpo", metadata=_one_of("grpo", "gspo", "cispo"))
    # "" = the loss's own, as in its paper: "token" for grpo and cispo, "sequence" for gspo. "constant" = Dr.GRPO:
    # sum over tokens / (max_tokens * sequences), no per-length normalisation.
    loss_agg: str = field(default="", metadata=_one_of("", "token", "sequence", "constant"))
    # Optimizer updates per batch = ppo_epochs * minibatches (the batch is split into `minibatches` runs of whole
    # groups, gone through `ppo_epochs` times); one version is published per batch. The proximal policy is the one
    # before the batch's first update, so grpo's and gspo's clip acts from the 2nd update on (cispo's, against the
    # sampling policy, on every update).
    ppo_epochs: int = field(default=1, metadata=_positive("integer"))
    minibatches: int = field(default=1, metadata=_positive("integer"))
    scale_rewards: bool = True  # False = Dr.GRPO (no std scaling of advantages)
    # The off-policy correction for the gap between the sampling policy mu (the workers' log-probs: an older
    # adapter, another engine, top_p) and the learner's proximal policy: grpo and gspo weigh each token (gspo: each
    # sequence) by min(pi_prox / mu, tis_cap), cispo clips pi / mu. 0 switches the correction off (mu is ignored).
    tis_cap: float = field(default=2.0, metadata=_non_negative())
    ref_ema: float = field(default=1.0, metadata=_unit_interval())  # 1 = reference is the base model
    max_grad_norm: float = field(default=1.0, metadata=_non_negative())  # 0 = no clipping
    max_staleness: int = field(default=1, metadata=_non_negative("integer"))
    # Batches whose rollouts run on the generation workers while the learner trains (0 = synchronous: collect a
    # batch, train, publish, repeat). The batch trained d steps from now starts once the workers serve a version
    # within max_staleness of the one it will be trained at, so async_depth must be <= max_staleness.
    async_depth: int = field(default=0, metadata=_non_negative("integer"))
    seed: int = 0
    # Data-parallel learner ranks (mx.distributed ring, started with mlx.launch): one rank per entry, rank 0 first
    # and on this machine. An entry is an ssh host, optionally `host=ip` for the ring's interface; "localhost"
    # starts a rank here without ssh (["localhost", "localhost"] = two local ranks). Empty = one learner process.
    hosts: list[str] = field(default_factory=list)
    # Rank i of the ring listens on ring_port + i (open these between the Macs).
    ring_port: int = field(default=32323, metadata=_check(lambda v: 1024 <= v <= 65000, "a TCP port in 1024..65000"))


@dataclass(frozen=True)
class SourceConfig:
    type: str = field(default="builtin", metadata=_one_of("builtin", "atropos", "dataset", "verifiers"))
    task: str = field(default="target_tokens", metadata=_one_of("target_tokens", "arithmetic"))
    url: str = ""  # Atropos API server, e.g. http://127.0.0.1:8000
    # type = "dataset" (workers/learner/sources/dataset.py): a JSONL file, a local dataset directory or a `datasets` id.
    path: str = ""
    split: str = "train"  # for a `datasets` id or directory
    chat_template: bool = True  # apply the tokenizer's chat template to each prompt; false = the raw text
    shuffle: bool = True  # a new order each epoch, drawn from [learner] seed
    # Reward functions: built-in names or "module:function" / "path/to/file.py:function"; summed with the weights.
    rewards: list[str] = field(default_factory=lambda: ["exact_answer"])
    reward_weights: list[float] = field(default_factory=list)  # [] = 1.0 each
    reward_timeout: float = field(default=5.0, metadata=_positive())  # seconds per call; a raise or timeout scores 0
    format_pattern: str = ""  # the regular expression of the built-in `regex_format` reward
    length_limit: int = field(default=200, metadata=_positive("integer"))  # characters, for `length_penalty`
    # type = "verifiers" (workers/learner/sources/verifiers.py): the environment's module, loaded the verifiers way.
    environment: str = ""


@dataclass(frozen=True)
class EvalConfig:
    path: str = ""  # held-out set, same forms as [source] path; "" = no evaluation
    split: str = "test"
    every: int = field(default=0, metadata=_non_negative("integer"))  # every N steps (0 = only at the end)
    at_start: bool = False  # also before the first step (the base model, or the checkpoint resumed from)
    limit: int = field(default=200, metadata=_positive("integer"))  # at most this many examples (the first ones)
    pass_k: int = field(default=1, metadata=_positive("integer"))  # completions per example
    temperature: float = field(default=0.0, metadata=_non_negative())  # 0 = greedy
    # An example's completion is correct when the first reward function's score is >= threshold (accuracy, pass@k).
    threshold: float = 1.0


@dataclass(frozen=True)
class CheckpointConfig:
    dir: str = "runs/job"  # the run directory: checkpoints/, logs/, metrics.jsonl
    interval: int = field(default=10, metadata=_positive("integer"))
    keep_last: int = field(default=3, metadata=_positive("integer"))
    resume: str = ""  # a checkpoint directory to resume from; "" = the newest loadable one in `dir`, if any


@dataclass(frozen=True)
class CoordinatorConfig:
    control: str = field(default="tcp://127.0.0.1:5555", metadata=_zmq_endpoint())
    weights: str = field(default="tcp://127.0.0.1:5556", metadata=_zmq_endpoint())
    status_port: int = field(default=0, metadata=_port())
    heartbeat_interval: float = field(default=1.0, metadata=_positive())
    heartbeat_timeout: float = field(default=10.0, metadata=_positive())
    # Same-host processes exchange weight versions through shared memory (runner/control.py) rather than sockets, and
    # the coordinator's children join its control socket over a Unix socket in the same directory rather than TCP.
    shared_memory: bool = True
    # Flapping policy (as circus): more than `restart_attempts` restarts within `restart_window` seconds stops the job.
    restart_attempts: int = field(default=5, metadata=_non_negative("integer"))
    restart_window: float = field(default=60.0, metadata=_positive())
    retry_in: float = field(default=0.5, metadata=_non_negative())  # first backoff, doubled per restart
    max_retry_in: float = field(default=10.0, metadata=_non_negative())
    # SIGTERM/SIGINT to `runner launch`: every child gets SIGTERM at once, and whatever still runs `stop_grace` seconds
    # later is SIGKILLed with its whole process group. One bound for the whole shutdown, not one per child.
    stop_grace: float = field(default=20.0, metadata=_positive())
    # The BLAS of the MLX children on Linux (runner/blas.py): "auto" preloads an optimized one when installed
    # (Debian's libopenblas0-pthread), "bundled" keeps MLX's reference BLAS, or the path of a library. Never on macOS.
    blas: str = field(
        default="auto",
        metadata=_check(
            lambda v: v in ("auto", "bundled") or Path(v).is_absolute(), "'auto', 'bundled' or an absolute path"
        ),
    )


@dataclass(frozen=True)
class SecurityConfig:
    curve_secret_key: str = ""  # path to the coordinator's CURVE secret key file (mode 600)
    curve_public_key: str = ""
    authorized_keys: str = ""  # directory of client public keys allowed to connect
    # Bearer token required on the HTTP API when set. A secret: only RUN/config.resolved.toml (mode 600) holds it;
    # every other copy of the config has it redacted. RUNNER_API_TOKEN in `runner launch`'s environment overrides it.
    api_token: str = field(default="", metadata={"secret": True})
    # A file (mode 600) holding the token, read when the config is loaded: the config then names no secret.
    api_token_file: str = ""


@dataclass(frozen=True)
class LoggingConfig:
    """Where the learner's metrics go besides RUN/metrics.jsonl (rank 0 only; workers/learner/tracking.py)."""

    wandb_project: str = ""  # Weights & Biases project ("" = no W&B); needs `pip install 'runner[tracking]'`
    # "" = wandb's own default (the WANDB_MODE environment variable, else online); "offline" needs no network.
    wandb_mode: str = field(default="", metadata=_one_of("", "online", "offline"))
    tensorboard: bool = False  # TensorBoard event files under RUN/tensorboard (tensorboardX)

    def require_packages(self) -> None:
        """Raise ConfigError if a tracker is asked for but its package is not installed (found without importing
        it, so the coordinator checks at start and stays light)."""
        import importlib.util

        wanted = {"wandb_project": "wandb"} if self.wandb_project else {}
        wanted.update({"tensorboard": "tensorboardX"} if self.tensorboard else {})
        for key, package in wanted.items():
            if importlib.util.find_spec(package) is None:
                raise ConfigError(
                    f"logging.{key} is set but the {package} package is not installed; "
                    f"pip install {package} (or the runner[tracking] extra), or unset logging.{key}"
                )


@dataclass(frozen=True)
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    generation: GenerationConfig = field(default_factory=GenerationConfig)
    learner: LearnerConfig = field(default_factory=LearnerConfig)
    source: SourceConfig = field(default_factory=SourceConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    coordinator: CoordinatorConfig = field(default_factory=CoordinatorConfig)
    security: SecurityConfig = field(default_factory=SecurityConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _type_matches(value: Any, annotation: Any) -> bool:
    origin = typing.get_origin(annotation)
    if origin is list:
        (item,) = typing.get_args(annotation)
        return isinstance(value, list) and all(_type_matches(v, item) for v in value)
    if annotation is bool:
        return isinstance(value, bool)
    if annotation is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if annotation is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    return isinstance(value, annotation)


def _type_name(annotation: Any) -> str:
    names = {bool: "true or false", int: "an integer", float: "a number", str: "a string"}
    if typing.get_origin(annotation) is list:
        return f"a list of {_type_name(typing.get_args(annotation)[0]).removeprefix('a ').removeprefix('an ')}s"
    return names.get(annotation, str(annotation))


def _secret_keys() -> tuple[tuple[str, str], ...]:
    hints = typing.get_type_hints(Config)
    return tuple(
        (section.name, f.name)
        for section in dataclasses.fields(Config)
        for f in dataclasses.fields(hints[section.name])
        if f.metadata.get("secret")
    )


SECRET_KEYS = _secret_keys()  # (section, key) of every secret-valued key


def redact(config: Config | dict) -> dict:
    """The config as a dict (a copy) with the value of every secret key that is set replaced by REDACTED: what goes
    wherever the config is copied (checkpoints' state.json, the W&B run config, a remote worker's `get_config`)."""
    data = copy.deepcopy(config.to_dict() if isinstance(config, Config) else config)
    for section, key in SECRET_KEYS:
        values = data.get(section)
        if isinstance(values, dict) and values.get(key):
            values[key] = REDACTED
    return data


def read_token_file(path: str | Path, what: str = "--api-token-file") -> str:
    """The API token kept in the file `path`: its one line, surrounding whitespace stripped. A missing, unreadable,
    empty or multi-word file is a ConfigError (whose message never shows the file's content); one that other users
    can read gets a warning, as a CURVE secret key does."""
    path = Path(path).expanduser()
    try:
        token = path.read_text().strip()
        mode = path.stat().st_mode
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"{what} {path}: cannot read the API token ({getattr(e, 'strerror', None) or e})") from None
    if not token or any(c.isspace() or not c.isprintable() for c in token):
        raise ConfigError(f"{what} {path}: expected the API token alone on one line (printable, no spaces)")
    if mode & 0o077:
        log.warning("API token file %s is readable by other users; run `chmod 600 %s`", path, path)
    return token


def api_token_override(token_file: str | None = None, environ: Mapping[str, str] | None = None) -> str | None:
    """The API token given outside any config: the file `token_file` (`--api-token-file`), else the RUNNER_API_TOKEN
    environment variable; None when neither is set. There is no command-line value: `ps` shows those to everyone."""
    if token_file:
        return read_token_file(token_file)
    token = (os.environ if environ is None else environ).get(API_TOKEN_ENV, "").strip()
    return token or None


def with_api_token(config: Config, token: str) -> Config:
    """`config` with `token` as its [security] api_token."""
    security = dataclasses.replace(config.security, api_token=token, api_token_file="")
    return dataclasses.replace(config, security=security)


def _shown(field_: dataclasses.Field, value: Any) -> str:
    """A value as an error message may show it: never a secret."""
    return REDACTED if field_.metadata.get("secret") else repr(value)


def _build_section(cls: type, values: dict, where: str, section: str) -> Any:
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in values.items():
        if key not in fields:
            raise ConfigError(f"{where}: unknown key '{section}.{key}'; expected one of: {', '.join(fields)}")
        annotation = hints[key]
        if not _type_matches(value, annotation):
            shown = _shown(fields[key], value)
            raise ConfigError(f"{where}: '{section}.{key}' = {shown} is not valid; expected {_type_name(annotation)}")
        if annotation is float:
            value = float(value)
        meta = fields[key].metadata
        if "check" in meta and not meta["check"](value):
            raise ConfigError(f"{where}: '{section}.{key}' = {value!r} is out of range; expected {meta['expected']}")
        kwargs[key] = value
    return cls(**kwargs)


def parse_override(text: str) -> tuple[str, str, Any]:
    """Split 'section.key=value' and parse the value as TOML (bare words are taken as strings). A secret key is
    refused: a command line is no place for a secret."""
    name, sep, raw = text.partition("=")
    section, dot, key = name.strip().partition(".")
    if not sep or not dot or not section or not key:
        raise ConfigError(f"--set {text!r} is not valid; expected section.key=value")
    if (section, key) in SECRET_KEYS:  # the value is never shown
        raise ConfigError(
            f"--set {section}.{key}=... is refused: every user sees a command line (ps); put the token in the config "
            f"file, in a 0600 file named by security.api_token_file, or in the {API_TOKEN_ENV} environment variable"
        )
    try:
        value = tomllib.loads(f"v = {raw.strip()}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw.strip()
    return section, key, value


def build_config(data: dict, where: str = "config") -> Config:
    """Validate a parsed TOML document (a dict of sections) into a Config."""
    sections = {f.name: typing.get_type_hints(Config)[f.name] for f in dataclasses.fields(Config)}
    built = {}
    for section, values in data.items():
        if section not in sections:
            raise ConfigError(f"{where}: unknown section [{section}]; expected one of: {', '.join(sections)}")
        if not isinstance(values, dict):
            raise ConfigError(f"{where}: '{section}' = {values!r} is not valid; expected a [{section}] table")
        built[section] = _build_section(sections[section], values, where, section)
    learner = built.get("learner")
    if learner is not None and learner.async_depth > learner.max_staleness:
        raise ConfigError(
            f"{where}: 'learner.async_depth' = {learner.async_depth} needs learner.max_staleness >= "
            f"{learner.async_depth} (is {learner.max_staleness}): a batch started d steps ahead is trained d versions "
            "later"
        )
    coordinator = built.get("coordinator")
    if coordinator is not None and coordinator.heartbeat_timeout < 2 * coordinator.heartbeat_interval:
        raise ConfigError(
            f"{where}: 'coordinator.heartbeat_timeout' = {coordinator.heartbeat_timeout} must be at least twice "
            f"coordinator.heartbeat_interval ({coordinator.heartbeat_interval}): a process is declared gone only "
            "after missing more than one beat"
        )
    config = _read_api_token_file(Config(**built), where)
    _check_dataset_keys(config, where)
    return config


def _read_api_token_file(config: Config, where: str) -> Config:
    """Read `[security] api_token_file` into api_token: the built config carries the token itself (so the resolved
    config a job's children start from is whole), and the file's path no more."""
    sec = config.security
    if not sec.api_token_file:
        return config
    if sec.api_token:
        raise ConfigError(f"{where}: set security.api_token or security.api_token_file, not both")
    return with_api_token(config, read_token_file(sec.api_token_file, f"{where}: security.api_token_file"))


def _check_dataset_keys(config: Config, where: str) -> None:
    """Cross-key checks of the dataset task and evaluation (the files and reward functions are checked at launch)."""
    sc, ec = config.source, config.eval
    if sc.type == "dataset" and not sc.path:
        raise ConfigError(f"{where}: 'source.path' is empty; the dataset source needs a JSONL file or a dataset id")
    if sc.reward_weights and len(sc.reward_weights) != len(sc.rewards):
        raise ConfigError(
            f"{where}: 'source.reward_weights' has {len(sc.reward_weights)} entries for {len(sc.rewards)} rewards "
            f"{sc.rewards}; give one weight per reward (or none: 1.0 each)"
        )
    if sc.type == "verifiers" and not sc.environment:
        raise ConfigError(f"{where}: 'source.environment' is empty; name the verifiers environment's module")
    if sc.type == "verifiers" and config.learner.async_depth:
        raise ConfigError(
            f"{where}: the verifiers source runs each step's rollouts in turn; set learner.async_depth = 0"
        )
    if ec.path and sc.type != "dataset":
        raise ConfigError(f'{where}: [eval] needs source.type = "dataset" (its reward functions score the eval)')
    if ec.pass_k > 1 and ec.temperature == 0:
        raise ConfigError(f"{where}: 'eval.pass_k' = {ec.pass_k} needs eval.temperature > 0 (greedy repeats itself)")


def load_config(path: str | Path, overrides: list[str] = ()) -> Config:
    """Read, merge overrides into, and validate a job config file."""
    path = Path(path)
    try:
        data = tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"{path}: config file not found") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path}: not valid TOML ({e})") from None
    for text in overrides:
        section, key, value = parse_override(text)
        data.setdefault(section, {})
        if not isinstance(data[section], dict):
            raise ConfigError(f"{path}: '{section}' is not a table, so --set {text!r} cannot apply")
        data[section][key] = value
    security = data.get("security")
    if isinstance(security, dict) and security.get("api_token") and path.stat().st_mode & 0o077:
        log.warning(
            "%s holds [security] api_token and other users can read it; run `chmod 600 %s` or move the token to "
            "a 0600 file named by api_token_file",
            path,
            path,
        )
    return build_config(data, where=str(path))


def config_toml(config: Config, secrets: bool = False) -> str:
    """`config` as a complete TOML document (every key, defaults included); its secrets redacted unless `secrets`."""
    import tomli_w

    return tomli_w.dumps(config.to_dict() if secrets else redact(config))


def write_resolved(config: Config, path: str | Path) -> Path:
    """Write `config` as a complete TOML file (every key, defaults included): what `runner launch` gives its
    children, so any of them can also be started by hand from the same file. It holds the job's secrets, so it is
    created with mode 600 (never readable by others, not even for an instant)."""
    from runner.files import write_atomic

    path = Path(path)
    write_atomic(path, config_toml(config, secrets=True), mode=0o600)
    return path
