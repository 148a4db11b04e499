"""``volume create|ls|rm|attach|detach``.

Volumes are named by id or name (the gateway resolves both; no prefixes, as hypeman).
"""

from __future__ import annotations

import argparse
from typing import Any

from cli.client import GatewayClient, segment
from cli.commands._common import add_json_flag, client_command, each, print_json, volume_mount
from cli.tables import age, render_table, short_id

__all__ = ["register"]


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    volume = sub.add_parser("volume", help="ext4 volumes that instances mount")
    actions = volume.add_subparsers(dest="volume_command", required=True, metavar="ACTION")

    create = actions.add_parser("create", help="create an empty volume; prints its id")
    create.add_argument("name")
    create.add_argument("--size", type=int, required=True, metavar="GB", help="size in GB")
    create.add_argument("--id", help="the volume's id (default: a new one)")
    client_command(create, _create)

    ls = actions.add_parser("ls", help="list volumes")
    add_json_flag(ls)
    client_command(ls, _ls)

    rm = actions.add_parser("rm", help="delete volumes (refused while attached)")
    rm.add_argument("volumes", nargs="+", metavar="VOLUME")
    client_command(rm, _rm)

    attach = actions.add_parser("attach", help="attach a volume to an instance")
    attach.add_argument("instance", metavar="INSTANCE")
    attach.add_argument("mount", type=volume_mount, metavar="VOLUME:/PATH[:ro]")
    client_command(attach, _attach)

    detach = actions.add_parser("detach", help="detach a volume from an instance")
    detach.add_argument("instance", metavar="INSTANCE")
    detach.add_argument("volume", metavar="VOLUME")
    client_command(detach, _detach)


def _create(client: GatewayClient, args: argparse.Namespace) -> int:
    body: dict[str, Any] = {"name": args.name, "size_gb": args.size}
    if args.id:
        body["id"] = args.id
    print(client.call("POST", "/volumes", json=body)["id"])
    return 0


def _ls(client: GatewayClient, args: argparse.Namespace) -> int:
    response = client.request("GET", "/volumes")
    if args.json:
        print_json(response)
        return 0
    rows = [
        (
            volume["id"],
            volume["name"],
            f"{volume['size_gb']}GB",
            ", ".join(
                f"{short_id(a['instance_id'])}:{a['mount_path']}{':ro' if a['readonly'] else ''}"
                for a in volume.get("attachments") or []
            )
            or "-",
            age(volume.get("created_at")),
        )
        for volume in response.json()
    ]
    print(render_table(("ID", "NAME", "SIZE", "ATTACHED", "AGE"), rows))
    return 0


def _rm(client: GatewayClient, args: argparse.Namespace) -> int:
    def remove(ref: str) -> None:
        what = f"volume {ref}"
        volume_id = client.call("GET", f"/volumes/{segment(ref)}", what=what)["id"]
        client.request("DELETE", f"/volumes/{segment(volume_id)}", what=what)
        print(volume_id)

    return each(args.volumes, remove)


def _attach(client: GatewayClient, args: argparse.Namespace) -> int:
    instance = _instance(client, args.instance)
    mount = args.mount
    client.call(
        "POST",
        f"/instances/{instance['id']}/volumes/{segment(mount['volume_id'])}",
        json={"mount_path": mount["mount_path"], "readonly": mount["readonly"]},
        what=f"volume {mount['volume_id']}",
    )
    mode = " (read-only)" if mount["readonly"] else ""
    print(f"{mount['volume_id']} attached to {instance['name']} at {mount['mount_path']}{mode}")
    return 0


def _detach(client: GatewayClient, args: argparse.Namespace) -> int:
    instance = _instance(client, args.instance)
    client.call(
        "DELETE",
        f"/instances/{instance['id']}/volumes/{segment(args.volume)}",
        what=f"volume {args.volume}",
    )
    print(f"{args.volume} detached from {instance['name']}")
    return 0


def _instance(client: GatewayClient, ref: str) -> Any:
    """The instance first, so that a 404 of the volume call can only mean the volume."""
    return client.call("GET", f"/instances/{segment(ref)}", what=f"instance {ref}")
