"""Entry point of the ``vmfleet`` command."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path

import anyio

from cli.settings import ConfigError, Settings, load_settings

__all__ = ["main"]


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=os.environ.get("VMFLEET_LOG_LEVEL", "INFO").upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    # One line per HTTP request is noise in a command's output; its errors are reported.
    logging.getLogger("httpx").setLevel(logging.WARNING)
    try:
        settings = load_settings()
        return int(args.run(settings, args) or 0)
    except ConfigError as exc:
        print(f"vmfleet: configuration error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vmfleet", description=__doc__)
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
        "--data-dir", type=Path, default=None, help="where `vmfleet dev` keeps its secret"
    )
    token.set_defaults(run=_token)
    host = sub.add_parser("host", help="fleet hosts (through the gateway)")
    host_sub = host.add_subparsers(dest="host_command", required=True, metavar="ACTION")
    drain = host_sub.add_parser("drain", help="no new placements on a host")
    drain.add_argument("host_id")
    drain.add_argument("--standby", action="store_true", help="also standby its running instances")
    drain.add_argument("--reason", default="", help="kept with the drain record")
    drain.set_defaults(run=_host_drain)
    undrain = host_sub.add_parser("undrain", help="take a drained host back into placement")
    undrain.add_argument("host_id")
    undrain.set_defaults(run=_host_undrain)

    kernel = sub.add_parser("kernel", help="guest kernel assets")
    kernel_sub = kernel.add_subparsers(dest="kernel_command", required=True, metavar="ACTION")
    fetch = kernel_sub.add_parser("fetch", help="fetch Debian's cloud kernel into the data dir")
    fetch.add_argument("--data-dir", type=Path, default=None, help="default: VMFLEET_DATA_DIR")
    fetch.set_defaults(run=_kernel_fetch)
    return parser


def _host_drain(settings: Settings, args: argparse.Namespace) -> int:
    from cli.client import ClientError, call, fail

    body = {"standby": args.standby, "reason": args.reason}
    try:
        result = call("POST", f"/hosts/{args.host_id}/drain", json=body)
    except ClientError as exc:
        return fail(str(exc))
    print(f"host {result['host']} drained")
    for instance_id in result["standby"]:
        print(f"  standby: {instance_id}")
    for instance_id, error in result["errors"].items():
        print(f"  not in standby: {instance_id}: {error}")
    return 1 if result["errors"] else 0


def _host_undrain(settings: Settings, args: argparse.Namespace) -> int:
    from cli.client import ClientError, call, fail

    try:
        call("DELETE", f"/hosts/{args.host_id}/drain")
    except ClientError as exc:
        return fail(str(exc))
    print(f"host {args.host_id} takes placements again")
    return 0


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
    from cli.dev import DevOptions, run_dev

    options = DevOptions(
        port=args.port if args.port is not None else settings.port,
        data_dir=(args.data_dir or settings.data_dir).resolve(),
        nats_port=args.nats_port,
    )
    try:
        anyio.run(run_dev, settings, options)
    except OSError as exc:
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
    from cli.daemons import run_worker_daemon

    anyio.run(run_worker_daemon, settings)
    return 0


def _token(settings: Settings, args: argparse.Namespace) -> int:
    from cli.token import mint_token, read_secret

    secret = read_secret(settings.jwt_secret, args.data_dir or settings.data_dir)
    if secret is None:
        raise ConfigError(
            "JWT_SECRET: not set, and no secret kept by `vmfleet dev` in the data dir "
            "(set JWT_SECRET or VMFLEET_DATA_DIR)"
        )
    print(mint_token(secret, subject=args.subject, ttl_s=args.ttl))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
