"""`vmfleet nats-config`: the nats-server accounts, users and permissions of a fleet.

Prints the server configuration for the given hosts (docs/security.md explains it; the
rendered example is docs/examples/nats-server.conf). ``--passwords FILE`` also creates
FILE, or adds the users it lacks, with a random password each: the configuration
includes it, and each component connects with its user and that password.
``--nsc`` prints the same permissions as ``nsc add user`` commands instead, for
operator (JWT) mode, where components connect with ``NATS_CREDS``.
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
from pathlib import Path

from cli.settings import Settings
from natsbus import (
    DEFAULT_PASSWORDS_FILE,
    ServerTls,
    account_name,
    complete_passwords,
    fleet_users,
    parse_passwords,
    render_passwords,
    render_server_config,
)
from schemas.subjects import Subjects

__all__ = ["register_nats_config", "render_nsc", "run_nats_config"]


def register_nats_config(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = sub.add_parser(
        "nats-config",
        help="print a nats-server config: the fleet's account, users and permissions",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--hosts", required=True, help="the fleet's host ids (VMFLEET_HOST_ID), comma-separated"
    )
    parser.add_argument("--prefix", default=None, help="default: VMFLEET_SUBJECT_PREFIX")
    parser.add_argument(
        "--passwords",
        type=Path,
        default=None,
        metavar="FILE",
        help="create or complete this passwords file (mode 0600) and include it; "
        f"nats-server reads a relative path next to the config (default: include "
        f"{DEFAULT_PASSWORDS_FILE}, write nothing)",
    )
    parser.add_argument("--tls-cert", default=None, help="server certificate (PEM): require TLS")
    parser.add_argument("--tls-key", default=None, help="the server certificate's key (PEM)")
    parser.add_argument(
        "--tls-ca", default=None, help="CA (PEM) whose client certificates the server requires"
    )
    parser.add_argument(
        "--nsc", action="store_true", help="print `nsc add user` commands (operator/JWT mode)"
    )
    parser.set_defaults(run=run_nats_config)


def run_nats_config(settings: Settings, args: argparse.Namespace) -> int:
    hosts = tuple(h.strip() for h in args.hosts.split(",") if h.strip())
    if not hosts:
        print("vmfleet nats-config: --hosts names no host", file=sys.stderr)
        return 2
    passwords_file = DEFAULT_PASSWORDS_FILE if args.passwords is None else str(args.passwords)
    try:
        subjects = Subjects(args.prefix or settings.subject_prefix)
        if args.nsc:
            print(render_nsc(subjects, hosts), end="")
            return 0
        command = shlex.join(["vmfleet", "nats-config", "--hosts", ",".join(hosts)])
        command += f" --prefix {shlex.quote(subjects.prefix)}"
        config = render_server_config(
            subjects, hosts, passwords_file=passwords_file, tls=_server_tls(args), command=command
        )
    except ValueError as exc:
        print(f"vmfleet nats-config: {exc}", file=sys.stderr)
        return 2
    if args.passwords is not None:
        _write_passwords(args.passwords, subjects, hosts)
    print(config, end="")
    return 0


def _server_tls(args: argparse.Namespace) -> ServerTls | None:
    if args.tls_cert is None and args.tls_key is None:
        if args.tls_ca is not None:
            raise ValueError("--tls-ca needs --tls-cert and --tls-key")
        return None
    if args.tls_cert is None or args.tls_key is None:
        raise ValueError("--tls-cert and --tls-key go together")
    return ServerTls(cert_file=args.tls_cert, key_file=args.tls_key, ca_file=args.tls_ca)


def _write_passwords(path: Path, subjects: Subjects, hosts: tuple[str, ...]) -> None:
    existing = parse_passwords(path.read_text()) if path.exists() else {}
    passwords, added = complete_passwords(subjects, hosts, existing)
    if not added:
        print(f"vmfleet nats-config: {path} has every user's password", file=sys.stderr)
        return
    # Created 0600 before the secrets go in, and replaced atomically.
    partial = path.with_name(path.name + ".new")
    descriptor = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(descriptor, "w") as out:
        out.write(render_passwords(passwords))
    partial.replace(path)
    print(
        f"vmfleet nats-config: wrote a new password to {path} for {', '.join(added)}; "
        "each component connects with NATS_USER=<its user> and NATS_PASSWORD=<the value of "
        "<USER>_PASSWORD there>",
        file=sys.stderr,
    )


def render_nsc(subjects: Subjects, hosts: tuple[str, ...]) -> str:
    """The users as ``nsc`` commands (operator mode: the account must exist, with
    JetStream enabled); ``nsc generate creds`` then makes each component's NATS_CREDS."""
    account = account_name(subjects)
    lines = [
        f"# vmfleet users of account {account} (subject prefix {subjects.prefix!r});",
        "# what each may do, and why: docs/security.md",
    ]
    for user in fleet_users(subjects, hosts):
        command = [
            "nsc",
            "add",
            "user",
            "--account",
            account,
            "--name",
            user.name,
            "--allow-pub",
            ",".join(user.permissions.publish),
            "--allow-sub",
            ",".join(user.permissions.subscribe),
        ]
        if user.permissions.allow_responses:
            command += ["--allow-pub-response", "1"]
        lines.append(shlex.join(command))
    lines.append(f"# then, per user: nsc generate creds --account {account} --name <user>")
    return "\n".join(lines) + "\n"
