"""Auto-standby in the CLI: ``--auto-standby DURATION`` for ``run`` and ``update``, the
status in ``ps`` and ``inspect``, and ``vmfleet inspect`` itself (the instance as the API
shows it, with its auto-standby status beside it).
"""

from __future__ import annotations

import argparse
import json
from typing import Any

from cli.client import GatewayClient, GatewayError, segment
from cli.commands._common import client_command

__all__ = [
    "add_auto_standby_flag",
    "auto_standby_body",
    "register",
    "status_summary",
    "with_standby",
]


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    inspect = sub.add_parser(
        "inspect",
        help="print an instance as JSON, with its auto-standby status",
        description="Print an instance as the API shows it, plus `auto_standby_status` "
        "(read on its host) when it has an auto-standby policy.",
    )
    inspect.add_argument("instance", metavar="INSTANCE")
    client_command(inspect, _inspect)


def add_auto_standby_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--auto-standby",
        metavar="DURATION",
        help='put the instance in standby after this long without inbound connections, e.g. "30s"; '
        '"off" disables it',
    )


def auto_standby_body(value: str | None) -> dict[str, Any] | None:
    """The API's ``auto_standby`` for ``--auto-standby`` (None: the flag was not given)."""
    if value is None:
        return None
    if value.lower() in ("off", "no", "false", "0"):
        return {"enabled": False}
    return {"enabled": True, "idle_timeout": value}


def with_standby(client: GatewayClient, instance: dict[str, Any], state: str) -> str:
    """``ps``'s state text with the auto-standby note: ``Running (standby in 25s)``,
    ``Running (healthy, 2 conn)``."""
    note = _status_note(client, instance)
    if note is None:
        return state
    if state.endswith(")"):
        return f"{state[:-1]}, {note})"
    return f"{state} ({note})"


def _status_note(client: GatewayClient, instance: dict[str, Any]) -> str | None:
    """A few words on a running instance's auto-standby for ``ps`` (None: no policy)."""
    policy = instance.get("auto_standby")
    if not isinstance(policy, dict) or not policy.get("enabled"):
        return None
    if instance.get("state") != "Running":
        return None
    try:
        status = client.call("GET", f"/instances/{segment(instance['id'])}/auto-standby/status")
    except GatewayError:
        return "standby ?"
    return status_summary(status)


def status_summary(status: dict[str, Any]) -> str:
    name = status.get("status")
    if name == "active":
        return f"{status.get('active_inbound_connections', 0)} conn"
    if name == "idle_countdown":
        return f"standby in {status.get('countdown_remaining') or '?'}"
    if name in ("ready_for_standby", "standby_requested"):
        return "standby now"
    return str(name)


def _inspect(client: GatewayClient, args: argparse.Namespace) -> int:
    path = f"/instances/{segment(args.instance)}"
    instance = client.call("GET", path, what=f"instance {args.instance}")
    if isinstance(instance.get("auto_standby"), dict):
        instance["auto_standby_status"] = client.call("GET", f"{path}/auto-standby/status")
    print(json.dumps(instance, indent=2))
    return 0
