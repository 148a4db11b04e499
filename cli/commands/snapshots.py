"""``snapshot create|ls|rm`` and ``fork NAME --count N``.

A fork of a Running instance takes a snapshot of it once (the instance is paused only for
the copy) and makes every fork from that snapshot, so ``--count 10`` pauses it once; the
snapshot is deleted again at the end (the forks keep what they use).
"""

from __future__ import annotations

import argparse
from typing import Any

from cli.client import GatewayClient, GatewayError, segment
from cli.commands._common import add_json_flag, client_command, each, key_value, print_json
from cli.tables import age, human_bytes, render_table, short_id

__all__ = ["register"]


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    snapshot = sub.add_parser("snapshot", help="snapshots of instances (memory and disks)")
    actions = snapshot.add_subparsers(dest="snapshot_command", required=True, metavar="ACTION")

    create = actions.add_parser(
        "create",
        help="snapshot an instance; prints the snapshot's id",
        description="Snapshot an instance. Standby (the default for a Running or Standby "
        "instance): memory and disks, a Running instance paused only for the copy. Stopped: "
        "disks only (a Stopped instance's default).",
    )
    create.add_argument("instance", metavar="INSTANCE")
    create.add_argument("--name", help="the snapshot's name (unique per instance)")
    create.add_argument("--kind", choices=("Standby", "Stopped"), help="default: by state")
    create.add_argument("--tag", action="append", type=key_value, default=[], metavar="KEY=VALUE")
    client_command(create, _create)

    ls = actions.add_parser("ls", help="list snapshots")
    ls.add_argument("--instance", metavar="INSTANCE", help="only snapshots of this instance")
    ls.add_argument("--kind", choices=("Standby", "Stopped"))
    add_json_flag(ls)
    client_command(ls, _ls)

    rm = actions.add_parser("rm", help="delete snapshots (forks made from them keep running)")
    rm.add_argument("snapshots", nargs="+", metavar="SNAPSHOT")
    client_command(rm, _rm)

    fork = sub.add_parser(
        "fork",
        help="new instances from an instance's current state",
        description="Make COUNT new instances from INSTANCE's memory and disks, named "
        "NAME-1..NAME-COUNT (NAME alone for one). Each has its own id, address, MAC and "
        "hostname. A Running instance keeps running.",
    )
    fork.add_argument("instance", metavar="INSTANCE")
    fork.add_argument("--count", type=int, default=1, metavar="N")
    fork.add_argument("--name", help="the forks' name, or their prefix (default: INSTANCE-fork)")
    fork.add_argument("--state", choices=("Running", "Standby", "Stopped"), dest="target_state")
    client_command(fork, _fork)


def _instance(client: GatewayClient, ref: str) -> dict[str, Any]:
    result: dict[str, Any] = client.call(
        "GET", f"/instances/{segment(ref)}", what=f"instance {ref}"
    )
    return result


def _kind_for(instance: dict[str, Any]) -> str:
    return "Stopped" if instance.get("state") == "Stopped" else "Standby"


def _create(client: GatewayClient, args: argparse.Namespace) -> int:
    instance = _instance(client, args.instance)
    body: dict[str, Any] = {"kind": args.kind or _kind_for(instance)}
    if args.name:
        body["name"] = args.name
    if args.tag:
        body["tags"] = dict(args.tag)
    snapshot = client.call("POST", f"/instances/{instance['id']}/snapshots", json=body)
    print(snapshot["id"])
    return 0


def _ls(client: GatewayClient, args: argparse.Namespace) -> int:
    params: dict[str, str] = {}
    if args.instance:
        params["source_instance_id"] = _instance(client, args.instance)["id"]
    if args.kind:
        params["kind"] = args.kind
    response = client.request("GET", "/snapshots", params=params)
    if args.json:
        print_json(response)
        return 0
    rows = [
        (
            snapshot["id"],
            snapshot.get("name") or "-",
            snapshot["kind"],
            f"{snapshot['source_instance_name']} ({short_id(snapshot['source_instance_id'])})",
            human_bytes(snapshot.get("size_bytes")),
            ",".join(snapshot.get("hosts") or []) or "-",
            age(snapshot.get("created_at")),
        )
        for snapshot in response.json()
    ]
    print(render_table(("ID", "NAME", "KIND", "SOURCE", "SIZE", "HOSTS", "AGE"), rows))
    return 0


def _rm(client: GatewayClient, args: argparse.Namespace) -> int:
    def remove(ref: str) -> None:
        client.request("DELETE", f"/snapshots/{segment(ref)}", what=f"snapshot {ref}")
        print(ref)

    return each(args.snapshots, remove)


def _fork(client: GatewayClient, args: argparse.Namespace) -> int:
    if args.count < 1:
        raise GatewayError("bad_request", "--count must be at least 1")
    instance = _instance(client, args.instance)
    base = args.name or f"{instance['name']}-fork"
    names = [base] if args.count == 1 else [f"{base}-{n}" for n in range(1, args.count + 1)]
    snapshot = client.call(
        "POST",
        f"/instances/{instance['id']}/snapshots",
        json={"kind": _kind_for(instance), "tags": {"vmfleet.fork-of": instance["id"]}},
    )
    body: dict[str, Any] = {}
    if args.target_state:
        body["target_state"] = args.target_state
    elif instance.get("state") != "Running":
        body["target_state"] = instance.get("state")
    try:

        def fork_one(name: str) -> None:
            made = client.call(
                "POST", f"/snapshots/{segment(snapshot['id'])}/fork", json={**body, "name": name}
            )
            print(f"{made['id']} {made['name']} {made['state']}")

        return each(names, fork_one)
    finally:
        client.request("DELETE", f"/snapshots/{segment(snapshot['id'])}")
