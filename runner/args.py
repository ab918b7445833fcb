"""Command-line options shared by `runner` and the worker entry points (`python -m workers...`), which must not
import each other."""

from __future__ import annotations

import argparse


def add_join_arguments(parser: argparse.ArgumentParser) -> None:
    """The options a worker process needs to reach a coordinator (shared by every worker entry point)."""
    parser.add_argument("--join", required=True, metavar="tcp://HOST:PORT", help="the coordinator's control address")
    parser.add_argument(
        "--key", default=None, help="this worker's CURVE secret key file (when the coordinator uses CURVE)"
    )
    parser.add_argument("--server-key", default=None, help="the coordinator's CURVE public key file")


def curve_from_args(args: argparse.Namespace) -> dict | None:
    if bool(args.key) != bool(args.server_key):
        raise ValueError("--key and --server-key go together: both are needed to join a CURVE-secured coordinator")
    return {"secret": args.key, "server_public": args.server_key} if args.key else None
