"""Entry point of the ``vmfleet`` command."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path

import anyio

from cli.commands import register_client_commands, run_client_command
from cli.nats_config import register_nats_config
from cli.settings import ConfigError, Settings, load_settings

__all__ = ["main"]

LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    level = os.environ.get("VMFLEET_LOG_LEVEL", "INFO").strip().upper()
    if level not in LOG_LEVELS:
        print(
            f"vmfleet: configuration error: VMFLEET_LOG_LEVEL: {level!r} must be one of "
            f"{', '.join(LOG_LEVELS)}",
            file=sys.stderr,
        )
        return 2
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # One line per HTTP request is noise in a command's output; its errors are reported.
    logging.getLogger("httpx").setLevel(logging.WARNING)
    if args.client is not None:
        # A client of the gateway: HYPEMAN_* settings only, none of the daemons'.
        return run_client_command(args.client, args)
    try:
        settings = load_settings()
        return int(args.run(settings, args) or 0)
    except ConfigError as exc:
        print(f"vmfleet: configuration error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="vmfleet",
        description="Run OCI images as micro-VMs on a fleet of hosts. The client commands "
        "talk to a gateway at HYPEMAN_BASE_URL with the token in HYPEMAN_API_KEY "
        "(docs/cli.md).",
    )
    parser.set_defaults(client=None)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    dev = sub.add_parser("dev", help="run NATS, one worker and the gateway locally")
    dev.add_argument("--port", type=int, default=None, help="gateway port (default: PORT or 8080)")
    dev.add_argument("--data-dir", type=Path, default=None, help="default: VMFLEET_DATA_DIR")
    dev.add_argument("--nats-port", type=int, default=None, help="default: a free port")
    dev.set_defaults(run=_dev)

    gateway = sub.add_parser("gateway", help="run an HTTP gateway against a NATS cluster")
    gateway.add_argument("--host", default="0.0.0.0", help="listen address (default 0.0.0.0)")
    gateway.add_argument("--port", type=int, default=None, help="default: PORT or 8080")
    gateway.set_defaults(run=_gateway)

    worker = sub.add_parser("worker", help="run this host's worker against a NATS cluster")
    worker.set_defaults(run=_worker)

    token = sub.add_parser("token", help="print an API token signed with JWT_SECRET")
    token.add_argument("--subject", default="vmfleet-user", help="the token's sub claim")
    token.add_argument("--ttl", type=int, default=24 * 3600, help="lifetime in seconds")
    token.add_argument(
        "--scopes",
        default=None,
        metavar="SCOPE,...",
        help="limit the token to some of read,write,exec (default: every right)",
    )
    token.add_argument(
        "--data-dir", type=Path, default=None, help="where `vmfleet dev` keeps its secret"
    )
    token.set_defaults(run=_token)

    kernel = sub.add_parser("kernel", help="guest kernel assets")
    kernel_sub = kernel.add_subparsers(dest="kernel_command", required=True, metavar="ACTION")
    fetch = kernel_sub.add_parser("fetch", help="fetch Debian's cloud kernel into the data dir")
    fetch.add_argument("--data-dir", type=Path, default=None, help="default: VMFLEET_DATA_DIR")
    fetch.set_defaults(run=_kernel_fetch)

    # nats-config: the nats-server accounts, users and permissions of a fleet
    register_nats_config(sub)

    # pull, run, ps, logs, stop|start|standby|restore, rm, volume, image, hosts, events, host
    register_client_commands(sub)
    return parser


def _kernel_fetch(settings: Settings, args: argparse.Namespace) -> int:
    from worker.guest.kernel import GuestAssetError, ensure_kernel

    data_dir = (args.data_dir or settings.data_dir).resolve()
    try:
        assets = anyio.run(ensure_kernel, data_dir)
    except GuestAssetError as exc:
        print(f"vmfleet kernel fetch: {exc}", file=sys.stderr)
        return 1
    print(f"kernel {assets.version}: {assets.bzimage}")
    return 0


def _dev(settings: Settings, args: argparse.Namespace) -> int:
    from cli.daemons import DaemonFailed
    from cli.dev import DevOptions, run_dev

    options = DevOptions(
        port=args.port if args.port is not None else settings.port,
        data_dir=(args.data_dir or settings.data_dir).resolve(),
        nats_port=args.nats_port,
    )
    try:
        anyio.run(run_dev, settings, options)
    except (OSError, DaemonFailed) as exc:
        print(f"vmfleet dev: {exc}", file=sys.stderr)
        return 1
    return 0


def _gateway(settings: Settings, args: argparse.Namespace) -> int:
    from cli.daemons import run_gateway_daemon

    if not settings.jwt_secret:
        raise ConfigError("JWT_SECRET: required for `vmfleet gateway` (at least 16 characters)")
    anyio.run(run_gateway_daemon, settings, args.host, args.port or settings.port)
    return 0


def _worker(settings: Settings, args: argparse.Namespace) -> int:
    from cli.daemons import DaemonFailed, run_worker_daemon

    try:
        anyio.run(run_worker_daemon, settings)
    except DaemonFailed as exc:
        print(f"vmfleet worker: {exc}", file=sys.stderr)
        return 1
    return 0


def _token(settings: Settings, args: argparse.Namespace) -> int:
    from cli.token import mint_token, read_secret
    from gateway.auth import parse_scopes

    try:
        scopes = None if args.scopes is None else parse_scopes(args.scopes)
    except ValueError as exc:
        raise ConfigError(f"--scopes: {exc}") from None
    secret = read_secret(settings.jwt_secret, args.data_dir or settings.data_dir)
    if secret is None:
        raise ConfigError(
            "JWT_SECRET: not set, and no secret kept by `vmfleet dev` in the data dir "
            "(set JWT_SECRET or VMFLEET_DATA_DIR)"
        )
    print(mint_token(secret, subject=args.subject, ttl_s=args.ttl, scopes=scopes))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
