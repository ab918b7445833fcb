"""The `runner` command line. Heavy imports (MLX, FastAPI) happen inside the subcommand that needs them, so
`runner --help`, `runner status` and config errors answer fast."""

from __future__ import annotations

import argparse
import json
import logging
import subprocess
import sys
from pathlib import Path

from runner import __version__
from runner.args import add_join_arguments
from runner.blas import mlx_build
from runner.config import ConfigError, load_config
from runner.rundir import RunDirInUse

log = logging.getLogger(__name__)


def _delegate(module: str, function: str):
    """A handler that imports its module only when the subcommand runs (keeps `runner --help` fast)."""

    def run(args: argparse.Namespace) -> int:
        import importlib

        return getattr(importlib.import_module(module), function)(args)

    return run


def cmd_models_prepare(args: argparse.Namespace) -> int:
    from workers.models import prepare_model

    out = prepare_model(args.name, Path(args.out), force=args.force, seed=args.seed)
    print(f"prepared {args.name} model in {out}")
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    from runner.config import API_TOKEN_ENV, api_token_override
    from runner.keys import require_api_token

    host = args.host.strip("[]")
    host = f"[{host}]" if ":" in host else host  # an IPv6 address
    args.api_token = api_token_override(args.api_token_file) or ""  # what serve_standalone serves with
    # Checked before MLX loads: a refused bind answers at once.
    how = f"pass --api-token-file PATH (a 0600 file holding a long random string) or set {API_TOKEN_ENV}"
    require_api_token([f"http://{host}:{args.port}"], args.api_token, how)
    from runner.hub import resolve_model

    resolve_model(args.model, "--model")  # a local directory or a hub id (fetched now); one line when neither
    if args.adapter and not Path(args.adapter).exists():
        raise FileNotFoundError(f"--adapter {args.adapter} not found; expected an adapter directory or .npz")
    from workers.generation.front import serve_standalone

    return serve_standalone(args)


def cmd_launch(args: argparse.Namespace) -> int:
    sets = list(args.set or [])
    if args.resume:
        sets.append(f"checkpoint.resume={json.dumps(str(Path(args.resume).resolve()))}")
    config = load_config(args.config, sets)
    from runner.config import api_token_override, with_api_token

    if token := api_token_override():  # RUNNER_API_TOKEN; the children get it from the 0600 resolved config
        config = with_api_token(config, token)
    # `runner check` in a child process: the tokenizer, dataset and environment libraries the check imports would
    # stay in the coordinator's memory for the whole job (75 MB and more).
    check = [sys.executable, "-m", "runner.cli", "check", args.config, *(a for s in sets for a in ("--set", s))]
    if code := subprocess.run(check, stdout=subprocess.DEVNULL).returncode:
        return code
    from runner.coordinator import launch

    return launch(config, config_path=Path(args.config))


def cmd_worker_generate(args: argparse.Namespace) -> int:
    from workers.generation.worker import join

    return join(args)


def cmd_status(args: argparse.Namespace) -> int:
    from runner.args import curve_from_args
    from runner.status import show_status

    return show_status(args.coordinator, as_json=args.json, curve=curve_from_args(args))


def cmd_keys_generate(args: argparse.Namespace) -> int:
    from runner.keys import generate_keypair, load_keypair

    public, secret = generate_keypair(Path(args.out), args.name, force=args.force)
    print(
        f"public key {load_keypair(secret)[0].decode()}\n  {public}  (give to the other side: on the coordinator, "
        f"`runner keys authorize {public.name} --dir AUTHORIZED_KEYS --role worker|learner|observer`)\n"
        f"  {secret}  (secret, mode 600)"
    )
    return 0


def cmd_keys_authorize(args: argparse.Namespace) -> int:
    from runner.keys import authorize_key

    target = authorize_key(Path(args.public_key), Path(args.dir), args.role, args.name)
    print(f"authorized in role {args.role}: {target} (takes effect at the client's next connection)")
    return 0


def cmd_deploy(args: argparse.Namespace) -> int:
    from runner.deploy import render, worker_arguments

    flags = [a for a in args.worker_actions if a.dest != "join"]  # render adds --join itself (checked, or defaulted)
    for path in render(
        args.target,
        Path(args.job_config),
        Path(args.out).expanduser(),
        role=args.role,
        join=args.join,
        log_dir=args.log_dir and Path(args.log_dir),
        workdir=args.workdir and Path(args.workdir),
        extra_args=worker_arguments(args, flags),
    ):
        print(path)
    return 0


def check_inputs(config) -> None:
    """A dataset task's files and reward functions, or a verifiers environment, checked before anything starts
    (ConfigError otherwise)."""
    if config.source.type == "dataset":
        from workers.learner.sources.dataset import check_dataset_config, check_prompts_fit  # no MLX

        check_dataset_config(config)
        check_prompts_fit(config)  # with the model's tokenizer, when the model is here
    if config.source.type == "verifiers":  # the environment loads (this imports verifiers and the learner's modules)
        from workers.learner.sources.verifiers import load_environment

        load_environment(config.source.environment)


def cmd_config_check(args: argparse.Namespace) -> int:
    check_inputs(load_config(args.config, args.set or []))
    print(f"{args.config}: ok")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="runner", description="GRPO/LoRA fine-tuning job runner on MLX.")
    parser.add_argument("--version", action="version", version=f"runner {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add_commands in (
        _add_job_commands,
        _add_serve_command,
        _add_worker_commands,
        _add_status_command,
        _add_models_commands,
        _add_adapters_commands,
        _add_deploy_commands,
        _add_keys_commands,
        _add_report_command,
    ):
        add_commands(sub)
    return parser


def _add_job_commands(sub) -> None:
    p = sub.add_parser("launch", help="run a job from a TOML config (coordinator + workers)")
    p.add_argument("config")
    p.add_argument("--set", action="append", metavar="SECTION.KEY=VALUE", help="override a config value")
    p.add_argument(
        "--resume",
        metavar="CHECKPOINT_DIR",
        help="resume from this checkpoint (default: the newest loadable one in the run directory)",
    )
    p.set_defaults(func=cmd_launch)

    p = sub.add_parser("check", help="validate a config file and exit")
    p.add_argument("config")
    p.add_argument("--set", action="append", metavar="SECTION.KEY=VALUE")
    p.set_defaults(func=cmd_config_check)


def _add_serve_command(sub) -> None:
    p = sub.add_parser("serve", help="run one standalone generation worker (OpenAI-compatible HTTP)")
    p.add_argument("--model", required=True)
    p.add_argument("--adapter", default=None)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--max-batch", type=int, default=32)
    p.add_argument("--max-queue", type=int, default=256)
    add_api_token_arguments(p, "needed to bind a non-loopback --host")
    p.set_defaults(func=cmd_serve)


class _RefuseTokenValue(argparse.Action):
    """`--api-token T` would show T to every user of the machine (ps): refused, pointing to the two alternatives.
    Declared (not just absent) so argparse does not take `--api-token` as an abbreviation of `--api-token-file`."""

    def __call__(self, parser, namespace, values, option_string=None):
        from runner.config import API_TOKEN_ENV

        parser.error(
            f"{option_string} is refused: every user of this machine sees a command line (ps); pass "
            f"--api-token-file PATH (a file of mode 600 holding the token) or set {API_TOKEN_ENV}"
        )


def add_api_token_arguments(parser, when: str) -> None:
    """`--api-token-file PATH`, and a `--api-token` that is refused (a token is never a command-line value)."""
    from runner.config import API_TOKEN_ENV

    parser.add_argument(
        "--api-token-file",
        default=None,
        metavar="PATH",
        help=f"a file (mode 600) holding the bearer token every HTTP request must carry (default: the {API_TOKEN_ENV} "
        f"environment variable); {when}",
    )
    parser.add_argument("--api-token", nargs="?", action=_RefuseTokenValue, help=argparse.SUPPRESS)


def _add_worker_commands(sub) -> None:
    p = sub.add_parser("worker", help="attach a worker to a running coordinator")
    wsub = p.add_subparsers(dest="role", required=True, metavar="ROLE")
    w = wsub.add_parser("generate", help="attach a generation worker")
    add_worker_generate_arguments(w)
    w.set_defaults(func=cmd_worker_generate)


class _Recorder:
    """Forwards `add_argument` to a parser (or group) and keeps the actions it creates."""

    def __init__(self, parser) -> None:
        self.parser, self.actions = parser, []

    def add_argument(self, *args, **kwargs) -> argparse.Action:
        action = self.parser.add_argument(*args, **kwargs)
        self.actions.append(action)
        return action


def add_worker_generate_arguments(parser) -> list[argparse.Action]:
    """Every flag of `runner worker generate`. `runner deploy --role worker` takes the same ones (from here) and
    writes them into the service file, so a flag added here reaches both and the two cannot drift."""
    recorder = _Recorder(parser)
    add_join_arguments(recorder)
    recorder.add_argument("--name", default=None, help="worker name (default gen-HOSTNAME-PID)")
    recorder.add_argument(
        "--model", default=None, help="model directory or Hugging Face id if it differs from the job's [model] path"
    )
    recorder.add_argument("--host", default="127.0.0.1", help="HTTP bind address")
    recorder.add_argument("--port", type=int, default=8000, help="HTTP port (0 = a free port)")
    recorder.add_argument("--config", default=None, help="the job's resolved config (default: ask the coordinator)")
    add_api_token_arguments(
        recorder, "the job's [security] api_token, needed when the job has one (the coordinator never sends it)"
    )
    recorder.add_argument(
        "--advertise-url",
        default=None,
        metavar="http://HOST:PORT",
        help="the URL the coordinator and learner reach this worker at (default: the bind address or, bound to "
        "0.0.0.0/::, the address of the interface that routes to the coordinator)",
    )
    return recorder.actions


def _add_status_command(sub) -> None:
    p = sub.add_parser("status", help="show the workers and progress of a running job")
    p.add_argument("--coordinator", default="tcp://127.0.0.1:5555")
    p.add_argument("--json", action="store_true")
    p.add_argument("--key", default=None, help="a CURVE secret key file (when the coordinator uses CURVE)")
    p.add_argument("--server-key", default=None, help="the coordinator's CURVE public key file")
    p.set_defaults(func=cmd_status)


def _add_models_commands(sub) -> None:
    p = sub.add_parser("models", help="prepare offline model directories")
    msub = p.add_subparsers(dest="action", required=True, metavar="ACTION")
    m = msub.add_parser("prepare", help="write an MLX model directory (no network needed for 'tiny')")
    m.add_argument("name", choices=["smollm2", "tiny"])
    m.add_argument("--out", required=True)
    m.add_argument("--force", action="store_true", help="replace an existing directory")
    m.add_argument("--seed", type=int, default=0, help="random seed for 'tiny'")
    m.set_defaults(func=cmd_models_prepare)


def _add_adapters_commands(sub) -> None:
    p = sub.add_parser("adapters", help="inspect, convert and merge LoRA adapters")
    asub = p.add_subparsers(dest="action", required=True, metavar="ACTION")
    a = asub.add_parser("show", help="an adapter's rank, targets, size and dtype, or a run's checkpoints")
    a.add_argument("path", metavar="DIR|RUN", help="adapter dir (mlx-lm or PEFT), .npz, checkpoint dir or run dir")
    a.set_defaults(func=_delegate("runner.adapters", "cmd_show"))
    a = asub.add_parser("convert", help="convert between mlx-lm, .npz and PEFT layouts (lossless)")
    a.add_argument("src", help="adapter dir (mlx-lm or PEFT) or .npz")
    a.add_argument("dst", help="output: a .npz file or a directory")
    a.add_argument(
        "--to",
        choices=["mlx", "npz", "peft"],
        default=None,
        help="output format (default: npz for *.npz, else mlx<->peft, npz->mlx)",
    )
    a.add_argument("--base-model", default=None, help="base_model_name_or_path for PEFT output")
    a.add_argument("--force", action="store_true", help="replace an existing DST")
    a.set_defaults(func=_delegate("runner.adapters", "cmd_convert"))
    a = asub.add_parser("merge", help="fuse an adapter into its base model and write a new model directory")
    a.add_argument("--model", required=True, help="base model directory")
    a.add_argument("--adapter", required=True, help="adapter dir (mlx-lm or PEFT) or .npz")
    a.add_argument("--out", required=True, help="output model directory")
    a.add_argument("--dequantize", action="store_true", help="write float weights for a quantized base")
    a.add_argument("--force", action="store_true", help="replace an existing --out directory")
    a.set_defaults(func=_delegate("workers.adapters", "cmd_merge"))  # MLX is loaded only for this subcommand


def _add_deploy_commands(sub) -> None:
    p = sub.add_parser("deploy", help="render launchd plists or systemd units for this install")
    dsub = p.add_subparsers(dest="target", required=True, metavar="TARGET")
    for target in ("launchd", "systemd"):
        d = dsub.add_parser(target, help=f"render {target} files with absolute paths for this install")
        d.add_argument("job_config", metavar="config", help="the job's config file")
        d.add_argument("--out", required=True, help="directory to write into (e.g. ~/Library/LaunchAgents)")
        d.add_argument("--role", choices=["coordinator", "worker"], default="coordinator")
        d.add_argument("--log-dir", default=None)
        d.add_argument("--workdir", default=None, help="working directory (default: the current one)")
        worker = d.add_argument_group(
            "--role worker",
            "the flags of `runner worker generate`, written into the service's command line (default --join: the "
            "config's [coordinator] control, when it names a host)",
        )
        worker_actions = add_worker_generate_arguments(worker)
        for action in worker_actions:
            action.required = False  # --join defaults to the config's [coordinator] control when it names a host
        d.set_defaults(func=cmd_deploy, worker_actions=worker_actions)


def _add_keys_commands(sub) -> None:
    p = sub.add_parser("keys", help="manage ZeroMQ CURVE keys")
    ksub = p.add_subparsers(dest="action", required=True, metavar="ACTION")
    k = ksub.add_parser("generate", help="generate a CURVE key pair")
    k.add_argument("--out", required=True, help="directory for NAME.key and NAME.key_secret")
    k.add_argument("--name", default="runner")
    k.add_argument("--force", action="store_true", help="replace existing keys")
    k.set_defaults(func=cmd_keys_generate)
    a = ksub.add_parser(
        "authorize",
        help="admit a client's public key in a role: copies it into DIR/workers/, DIR/learners/ or DIR/observers/",
    )
    a.add_argument("public_key", help="the client's NAME.key file (never its secret)")
    a.add_argument("--dir", required=True, help="the coordinator's [security] authorized_keys directory")
    a.add_argument("--role", required=True, choices=["worker", "learner", "observer"])
    a.add_argument("--name", default=None, help="file name in DIR (default: the key file's)")
    a.set_defaults(func=cmd_keys_authorize)


def _add_report_command(sub) -> None:
    p = sub.add_parser("report", help="plot a run's metrics and write a summary")
    p.add_argument("run", metavar="RUN", help="run directory (with metrics.jsonl)")
    p.add_argument("--out", default=None, help="output directory (default RUN/report)")
    p.set_defaults(func=_delegate("runner.report", "cmd_report"))


def require_mlx_build() -> None:
    """MLX on Linux ships its compiled library in a separate package per backend; without one, every MLX child would
    fail at import and be restarted forever. Say so once, before starting anything."""
    if mlx_build() is None:
        raise ConfigError(
            "MLX is installed without a backend: install the project with '.[cpu]' (CPU) or '.[cuda]' (an NVIDIA "
            'GPU with CUDA 13), e.g. pip install -e ".[cpu]"'
        )


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    try:
        if args.func in (cmd_launch, cmd_serve, cmd_worker_generate, cmd_models_prepare):
            require_mlx_build()
        return args.func(args)
    except (ConfigError, FileExistsError, FileNotFoundError, RunDirInUse) as e:
        print(f"runner: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
