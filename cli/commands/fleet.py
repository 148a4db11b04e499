"""``hosts``, ``events`` and ``host drain|undrain``: vmfleet's fleet extensions."""

from __future__ import annotations

import argparse
import json
from typing import Any, Final

from cli.client import EXIT_OK, EXIT_REFUSED, GatewayClient, segment
from cli.commands._common import add_json_flag, client_command, print_json
from cli.tables import human_bytes, parse_time, render_table, short_id

__all__ = ["register"]

#: ``events`` without ``-f`` reads the stored history, and stops after this much silence
#: (the stream itself never ends: it would go on with the next transition).
HISTORY_IDLE_S: Final = 2.0


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    hosts = sub.add_parser("hosts", help="live hosts and their capacity")
    add_json_flag(hosts)
    client_command(hosts, _hosts)

    events = sub.add_parser(
        "events",
        help="instance state transitions",
        description="Without -f: the transitions the fleet has kept (7 days), oldest first. "
        "With -f: new transitions as they happen, until interrupted.",
    )
    events.add_argument("-f", "--follow", action="store_true", help="wait for new events")
    events.add_argument("--instance", help="only this instance (id, name or prefix)")
    events.add_argument("--host", help="only instances of this host")
    events.add_argument(
        "--after", type=int, metavar="EVENT_ID", help="start after this event (the #N of a line)"
    )
    add_json_flag(events)
    client_command(events, _events)

    host = sub.add_parser("host", help="drain a host or take it back")
    actions = host.add_subparsers(dest="host_command", required=True, metavar="ACTION")
    drain = actions.add_parser("drain", help="no new placements on a host")
    drain.add_argument("host_id")
    drain.add_argument("--standby", action="store_true", help="also standby its running instances")
    drain.add_argument(
        "--move",
        action="store_true",
        help="move its Standby instances to other hosts (same id, name and memory state)",
    )
    drain.add_argument("--reason", default="", help="kept with the drain record")
    client_command(drain, _drain)
    undrain = actions.add_parser("undrain", help="take a drained host back into placement")
    undrain.add_argument("host_id")
    client_command(undrain, _undrain)


def _hosts(client: GatewayClient, args: argparse.Namespace) -> int:
    response = client.request("GET", "/hosts")
    if args.json:
        print_json(response)
        return EXIT_OK
    rows = [
        (
            h["id"],
            "drained" if h.get("drained") else "ready",
            h.get("accel", "-"),
            str(h.get("instances", 0)),
            f"{h.get('vcpus_allocated', 0)}/{h.get('vcpus_total', 0)}",
            f"{human_bytes(h.get('memory_allocated_bytes', 0))}/"
            f"{human_bytes(h.get('memory_total_bytes', 0))}",
            human_bytes(h.get("disk_free_bytes", 0)),
            ",".join(f"{k}={v}" for k, v in sorted((h.get("labels") or {}).items())) or "-",
        )
        for h in response.json()
    ]
    headers = ("ID", "STATUS", "ACCEL", "INSTANCES", "VCPUS", "MEMORY", "DISK FREE", "LABELS")
    print(render_table(headers, rows))
    return EXIT_OK


def _events(client: GatewayClient, args: argparse.Namespace) -> int:
    params = {key: value for key in ("instance", "host") if (value := getattr(args, key))}
    after = args.after if args.after is not None else (None if args.follow else 0)
    headers = {} if after is None else {"Last-Event-ID": str(after)}
    with client.events(
        "/events",
        params=params,
        headers=headers,
        idle_s=None if args.follow else HISTORY_IDLE_S,
    ) as stream:
        for event in stream:
            if args.json:
                print(event.data, flush=True)
            else:
                print(_event_line(event.id, json.loads(event.data)), flush=True)
    return EXIT_OK


def _event_line(event_id: str | None, event: dict[str, Any]) -> str:
    """``2026-12-01 17:59:46  #12  dev-host/hello  Running -> Standby``."""
    at = parse_time(event["at"]).astimezone().strftime("%Y-%m-%d %H:%M:%S")
    who = f"{event['host']}/{event.get('name') or short_id(event['instance_id'])}"
    what = f"{event.get('previous') or '-'} -> {event['state']}"
    if event.get("kind") in ("snapshot", "fork"):  # ``snapshot created S``, ``fork finished S``
        what = f"{event['kind']} {event.get('action')} {event.get('snapshot_id')}"
        if event["kind"] == "fork":
            what += f" of {short_id(event.get('source_instance_id') or '-')}"
    line = f"{at}  #{event_id or '-'}  {who}  {what}"
    if event.get("error"):
        line += f"  ({event['error']})"
    if event.get("deleted"):
        line += "  [deleted]"
    return line


def _drain(client: GatewayClient, args: argparse.Namespace) -> int:
    body = {"standby": args.standby, "move": args.move, "reason": args.reason}
    result = client.call("POST", f"/hosts/{segment(args.host_id)}/drain", json=body)
    print(f"host {result['host']} drained")
    for instance_id in result["standby"]:
        print(f"  standby: {instance_id}")
    for instance_id, host in result.get("moved", {}).items():
        print(f"  moved: {instance_id} -> host {host}")
    failed = "not moved" if args.move else "not in standby"
    for instance_id, error in result["errors"].items():
        print(f"  {failed}: {instance_id}: {error}")
    return EXIT_REFUSED if result["errors"] else EXIT_OK


def _undrain(client: GatewayClient, args: argparse.Namespace) -> int:
    client.call("DELETE", f"/hosts/{segment(args.host_id)}/drain")
    print(f"host {args.host_id} takes placements again")
    return EXIT_OK
