"""What every client command shares: how it is run (exit codes, error lines), how it
prints, and the argument types of its flags."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Iterable
from typing import Any

import httpx

from cli.client import (
    EXIT_CONFIG,
    EXIT_OK,
    EXIT_REFUSED,
    ClientConfig,
    GatewayClient,
    GatewayError,
)
from cli.settings import ConfigError

__all__ = [
    "Handler",
    "add_json_flag",
    "client_command",
    "each",
    "error",
    "key_value",
    "port_mapping",
    "print_json",
    "run_client_command",
    "volume_mount",
]

Handler = Callable[[GatewayClient, argparse.Namespace], int]


def client_command(parser: argparse.ArgumentParser, handler: Handler) -> None:
    """Mark ``parser``'s command as one that talks to the gateway (see ``cli.main``)."""
    parser.set_defaults(client=handler)


def run_client_command(handler: Handler, args: argparse.Namespace) -> int:
    """Run one command with a client from the environment; every failure becomes one
    ``vmfleet: ...`` line on stderr and the exit code of ``docs/cli.md``."""
    try:
        config = ClientConfig.from_env()
    except ConfigError as exc:
        print(f"vmfleet: configuration error: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    try:
        with GatewayClient(config) as client:
            return handler(client, args)
    except GatewayError as exc:
        error(exc)
        return exc.exit_code
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        # The reader went away (`| head`): nothing more to say, and nowhere to say it.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return EXIT_OK


def error(exc: GatewayError) -> None:
    print(f"vmfleet: {exc}", file=sys.stderr, flush=True)


def add_json_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="print the gateway's JSON unchanged")


def print_json(response: httpx.Response) -> None:
    """The body as the gateway sent it, with a final newline."""
    text = response.text
    sys.stdout.write(text if text.endswith("\n") else text + "\n")


def key_value(text: str) -> tuple[str, str]:
    """``KEY=VALUE`` (the value may be empty, and may hold ``=``)."""
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    return key, value


def volume_mount(text: str) -> dict[str, Any]:
    """``VOLUME:/PATH[:ro|:rw]`` as a mount of hypeman's API (the volume by id or name)."""
    volume, sep, rest = text.partition(":")
    path, _, mode = rest.partition(":")
    if not sep or not volume or not path.startswith("/") or mode not in ("", "ro", "rw"):
        raise argparse.ArgumentTypeError(f"expected VOLUME:/PATH[:ro], got {text!r}")
    return {"volume_id": volume, "mount_path": path, "readonly": mode == "ro"}


def port_mapping(text: str) -> dict[str, Any]:
    """``HOST_PORT:GUEST_PORT[/tcp|/udp]`` as a vmfleet port mapping."""
    ports, _, protocol = text.partition("/")
    host, sep, guest = ports.partition(":")
    if not sep or not host.isdigit() or not guest.isdigit() or protocol not in ("", "tcp", "udp"):
        raise argparse.ArgumentTypeError(f"expected HOST_PORT:GUEST_PORT[/udp], got {text!r}")
    return {"host_port": int(host), "guest_port": int(guest), "protocol": protocol or "tcp"}


def each(refs: Iterable[str], act: Callable[[str], None]) -> int:
    """``act`` on every ref; a refused one is reported and the rest still done (exit 1
    at the end). An unreachable gateway stops at once."""
    status = EXIT_OK
    for ref in refs:
        try:
            act(ref)
        except GatewayError as exc:
            if exc.exit_code != EXIT_REFUSED:
                raise
            error(exc)
            status = EXIT_REFUSED
    return status
