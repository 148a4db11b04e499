"""``run``, ``ps``, ``logs``, ``stop|start|standby|restore`` and ``rm``.

Instances are named by id, name or unique id prefix; the gateway resolves them (404
``not_found``, 409 ``ambiguous``), so the commands send what they were given.
"""

from __future__ import annotations

import argparse
import json
import re
import secrets
import sys
from typing import Any, Final

from cli.client import GatewayClient, GatewayError, segment
from cli.commands._common import (
    Handler,
    add_json_flag,
    client_command,
    each,
    key_value,
    port_mapping,
    print_json,
    volume_mount,
)
from cli.commands.autostandby import add_auto_standby_flag, auto_standby_body, with_standby
from cli.commands.images import wait_for_image
from cli.tables import age, parse_time, render_table, short_id

__all__ = ["default_name", "register"]

LOG_SOURCES: Final = ("app", "vmm", "hypeman")
#: States in which the instance's VM is alive: `rm` wants `-f` for those.
LIVE_STATES: Final = frozenset({"Created", "Initializing", "Running", "Paused", "Shutdown"})
_LIFECYCLE: Final = {
    "stop": "stop an instance (its overlay disk is kept)",
    "start": "start a stopped instance",
    "standby": "pause an instance and snapshot it to disk",
    "restore": "resume an instance from its standby snapshot",
}
_NOT_NAME: Final = re.compile(r"[^a-z0-9]+")


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    run = sub.add_parser(
        "run",
        help="create and start an instance (pulls its image first if needed)",
        description="Create and start an instance of IMAGE, running CMD instead of the "
        "image's command if given. Prints the instance id.",
    )
    run.add_argument("--name", help="instance name (default: the image's, a random suffix)")
    run.add_argument(
        "-e",
        "--env",
        type=key_value,
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="set an environment variable in the guest",
    )
    run.add_argument(
        "-v",
        "--volume",
        type=volume_mount,
        action="append",
        default=[],
        metavar="VOL:/PATH[:ro]",
        help="mount a volume (id or name), read-only with :ro",
    )
    run.add_argument(
        "-p",
        "--publish",
        type=port_mapping,
        action="append",
        default=[],
        metavar="HOST:GUEST[/udp]",
        help="forward a host port into the guest",
    )
    run.add_argument("--size", help='memory, e.g. "512MB" (default: the gateway\'s, 1GB)')
    run.add_argument("--vcpus", type=int, help="virtual CPUs (default: the gateway's, 2)")
    run.add_argument("--overlay-size", help='writable disk, e.g. "5GB" (default 10GB)')
    run.add_argument("--entrypoint", action="append", metavar="ARG", help="override the entrypoint")
    run.add_argument("--host", help="run on this host")
    run.add_argument(
        "--label",
        type=key_value,
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="run on a host advertising this label",
    )
    run.add_argument(
        "--tag",
        type=key_value,
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="label the instance (ps --filter tag=KEY=VALUE finds it)",
    )
    run.add_argument(
        "--ttl", metavar="DURATION", help='delete the instance after this long, e.g. "1h"'
    )
    _add_supervision_flags(run)
    add_auto_standby_flag(run)
    run.add_argument("image", metavar="IMAGE")
    run.add_argument("cmd", nargs=argparse.REMAINDER, metavar="CMD ...")
    client_command(run, _run)

    ps = sub.add_parser("ps", help="list instances (running ones unless -a)")
    ps.add_argument("-a", "--all", action="store_true", help="every instance, in any state")
    ps.add_argument("-q", "--quiet", action="store_true", help="only the ids")
    ps.add_argument(
        "--filter",
        type=_tag_filter,
        action="append",
        default=[],
        metavar="tag=KEY=VALUE",
        help="only instances with this tag (repeat: all must match)",
    )
    add_json_flag(ps)
    client_command(ps, _ps)

    logs = sub.add_parser("logs", help="print an instance's log")
    logs.add_argument("-f", "--follow", action="store_true", help="keep printing new lines")
    logs.add_argument("--source", choices=LOG_SOURCES, default="app", help="default: app")
    logs.add_argument("--tail", type=int, default=100, help="last N lines (default 100)")
    logs.add_argument("instance", metavar="INSTANCE")
    client_command(logs, _logs)

    for op, summary in _LIFECYCLE.items():
        parser = sub.add_parser(op, help=summary, description=f"{summary[0].upper()}{summary[1:]}.")
        parser.add_argument("instances", nargs="+", metavar="INSTANCE")
        client_command(parser, _lifecycle(op))

    update = sub.add_parser(
        "update",
        help="change an instance's expiry, restart policy or health check without restarting it",
        description="Change how an instance is supervised, while it runs: when it is deleted "
        'on its own (--ttl counts from now, "0s" clears the expiry), its restart policy, and '
        "its health check (replaced whole: the --health-* flags not given take their "
        "defaults). At least one change.",
    )
    expiry = update.add_mutually_exclusive_group()
    expiry.add_argument("--ttl", metavar="DURATION", help='e.g. "30m"; "0s": never expire')
    expiry.add_argument("--expires-at", metavar="TIME", help="RFC 3339, e.g. 2030-01-01T00:00:00Z")
    _add_supervision_flags(update)
    add_auto_standby_flag(update)
    update.add_argument("instance", metavar="INSTANCE")
    add_json_flag(update)
    client_command(update, _update)

    rm = sub.add_parser("rm", help="delete instances")
    rm.add_argument("-f", "--force", action="store_true", help="also running ones")
    rm.add_argument("instances", nargs="+", metavar="INSTANCE")
    client_command(rm, _rm)


def default_name(image: str) -> str:
    """``busybox-1a2b3c`` for ``registry:5000/library/busybox:latest``."""
    repository = image.partition("@")[0].rsplit("/", 1)[-1].partition(":")[0]
    base = _NOT_NAME.sub("-", repository.lower()).strip("-")[:48].rstrip("-") or "vm"
    return f"{base}-{secrets.token_hex(3)}"


def _health_tuning_alone(command: str, args: argparse.Namespace) -> bool:
    """--health-interval and the like without --health-cmd: said on stderr, True."""
    tuning = {
        "--health-interval": args.health_interval,
        "--health-timeout": args.health_timeout,
        "--health-start-period": args.health_start_period,
        "--health-retries": args.health_retries,
    }
    given = [flag for flag, value in tuning.items() if value is not None]
    if args.health_cmd is None and given:
        print(f"vmfleet {command}: {' and '.join(given)} need --health-cmd", file=sys.stderr)
        return True
    return False


def _run(client: GatewayClient, args: argparse.Namespace) -> int:
    if _health_tuning_alone("run", args):
        return 2
    image = wait_for_image(client, args.image, quiet_if_ready=True)
    body: dict[str, Any] = {"name": args.name or default_name(image["name"]), "image": args.image}
    optional = {
        "size": args.size,
        "vcpus": args.vcpus,
        "overlay_size": args.overlay_size,
        "entrypoint": args.entrypoint,
        "cmd": args.cmd or None,
        "env": dict(args.env) or None,
        "volumes": [_by_id(client, mount) for mount in args.volume] or None,
        "port_mappings": args.publish or None,
        "host": args.host,
        "host_labels": dict(args.label) or None,
        "tags": dict(args.tag) or None,
        "ttl": args.ttl,
        "restart_policy": args.restart,
        "health_check": _health_check(args),
        "auto_standby": auto_standby_body(args.auto_standby),
    }
    body.update({key: value for key, value in optional.items() if value is not None})
    instance = client.call("POST", "/instances", json=body)
    print(instance["id"])
    return 0


def _add_supervision_flags(run: argparse.ArgumentParser) -> None:
    run.add_argument(
        "--restart",
        type=restart_policy,
        metavar="POLICY",
        help="no (default), always, or on-failure[:MAX_ATTEMPTS]: restart the program when "
        "it ends (on-failure: when it fails, or its health check does)",
    )
    run.add_argument(
        "--health-cmd",
        metavar="CMD",
        help="health check: a shell command run in the guest; exit 0 is healthy",
    )
    run.add_argument("--health-interval", metavar="DURATION", help='between checks (default "10s")')
    run.add_argument(
        "--health-timeout",
        metavar="DURATION",
        help='per check, at most the interval (default "2s")',
    )
    run.add_argument(
        "--health-start-period",
        metavar="DURATION",
        help='failures this soon after a start do not count (default "30s")',
    )
    run.add_argument(
        "--health-retries",
        type=int,
        metavar="N",
        help="failures in a row that make it unhealthy (default 3)",
    )


def restart_policy(text: str) -> dict[str, Any]:
    """``--restart``: docker's names for hypeman's restart_policy."""
    name, _, count = text.partition(":")
    if name == "on-failure":
        if count and not count.isdigit():
            raise argparse.ArgumentTypeError(f"on-failure:N wants a number, got {count!r}")
        policy: dict[str, Any] = {"policy": "on_failure"}
        if count:
            policy["max_attempts"] = int(count)
        return policy
    if count or name not in ("no", "always"):
        raise argparse.ArgumentTypeError(f"expected no, always or on-failure[:N], got {text!r}")
    return {"policy": "never" if name == "no" else "always"}


def _health_check(args: argparse.Namespace) -> dict[str, Any] | None:
    if args.health_cmd is None:
        return None
    check: dict[str, Any] = {"exec": {"command": ["/bin/sh", "-c", args.health_cmd]}}
    optional = {
        "interval": args.health_interval,
        "timeout": args.health_timeout,
        "start_period": args.health_start_period,
        "failure_threshold": args.health_retries,
    }
    check.update({key: value for key, value in optional.items() if value is not None})
    return check


def _by_id(client: GatewayClient, mount: dict[str, Any]) -> dict[str, Any]:
    """A create names volumes by exact id only: look the name (or id) up first."""
    ref = mount["volume_id"]
    volume = client.call("GET", f"/volumes/{segment(ref)}", what=f"volume {ref}")
    return {**mount, "volume_id": volume["id"]}


def _tag_filter(text: str) -> tuple[str, str]:
    """``tag=KEY=VALUE`` of ``ps --filter``."""
    kind, _, pair = text.partition("=")
    if kind != "tag":
        raise argparse.ArgumentTypeError(f"expected tag=KEY=VALUE, got {text!r}")
    return key_value(pair)


def _ps(client: GatewayClient, args: argparse.Namespace) -> int:
    params = {f"tags[{key}]": value for key, value in args.filter}
    if not args.all:
        params["state"] = "Running"
    response = client.request("GET", "/instances", params=params or None)
    if args.json:
        print_json(response)
        return 0
    instances = sorted(response.json(), key=lambda i: parse_time(i["created_at"]), reverse=True)
    if args.quiet:
        for instance in instances:
            print(instance["id"])
        return 0
    rows = [
        (
            short_id(i["id"]),
            i["name"],
            i["image"],
            with_standby(client, i, _state_text(i)),
            i.get("host") or "-",
            age(i["created_at"]),
        )
        for i in instances
    ]
    print(render_table(("ID", "NAME", "IMAGE", "STATE", "HOST", "AGE"), rows))
    return 0


def _state_text(instance: dict[str, Any]) -> str:
    """``Running``, or ``Running (healthy)`` when the instance has a health check."""
    health = instance.get("health_status")
    if isinstance(health, dict) and health.get("status") not in (None, "", "disabled"):
        return f"{instance['state']} ({health['status']})"
    return str(instance["state"])


def _update(client: GatewayClient, args: argparse.Namespace) -> int:
    if _health_tuning_alone("update", args):
        return 2
    changes = {
        "ttl": args.ttl,
        "expires_at": args.expires_at,
        "restart_policy": args.restart,
        "health_check": _health_check(args),
        "auto_standby": auto_standby_body(args.auto_standby),
    }
    body = {key: value for key, value in changes.items() if value is not None}
    if not body:
        print(
            "vmfleet update: nothing to change (--ttl, --expires-at, --restart, --health-cmd, "
            "--auto-standby)",
            file=sys.stderr,
        )
        return 2
    response = client.request(
        "PATCH", f"/instances/{segment(args.instance)}", json=body, what=f"instance {args.instance}"
    )
    if args.json:
        print_json(response)
        return 0
    print(_update_summary(response.json()))
    return 0


def _update_summary(instance: dict[str, Any]) -> str:
    """``ID expires … restart … health …``: the supervision the instance has now."""
    policy = instance.get("restart_policy") or {}
    check = instance.get("health_check") or {}
    return (
        f"{instance['id']} expires {instance.get('expires_at') or 'never'}"
        f" restart {policy.get('policy') or 'never'}"
        f" health-check {check.get('type') or 'none'}"
    )


def _logs(client: GatewayClient, args: argparse.Namespace) -> int:
    params = {"source": args.source, "tail": str(args.tail)}
    if args.follow:
        params["follow"] = "true"
    path = f"/instances/{segment(args.instance)}/logs"
    with client.events(path, params=params, what=f"instance {args.instance}") as events:
        for event in events:
            line = json.loads(event.data)
            print(line if isinstance(line, str) else event.data, flush=args.follow)
    return 0


def _lifecycle(op: str) -> Handler:
    def handler(client: GatewayClient, args: argparse.Namespace) -> int:
        def act(ref: str) -> None:
            path = f"/instances/{segment(ref)}/{op}"
            instance = client.call("POST", path, what=f"instance {ref}")
            print(f"{instance['id']} {instance['state']}", flush=True)

        return each(args.instances, act)

    return handler


def _rm(client: GatewayClient, args: argparse.Namespace) -> int:
    def remove(ref: str) -> None:
        what = f"instance {ref}"
        instance = client.call("GET", f"/instances/{segment(ref)}", what=what)
        if not args.force and instance["state"] in LIVE_STATES:
            raise GatewayError(
                "invalid_state",
                f"instance {ref} is {instance['state']}: stop it first, or use rm -f",
            )
        client.request("DELETE", f"/instances/{instance['id']}", what=what)
        print(instance["id"], flush=True)

    return each(args.instances, remove)
