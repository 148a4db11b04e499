"""``pull``, ``image ls`` and ``image rm``.

A pull is asynchronous in hypeman's API: ``POST /images`` answers at once with the
record (``pending``), and a host moves it through ``pulling`` and ``converting`` to
``ready`` or ``failed``. There is no event stream for images, so the command polls the
record and prints each status it has not printed yet.
"""

from __future__ import annotations

import argparse
import sys
import time
from typing import Any, Final

from cli.client import GatewayClient, GatewayError, segment
from cli.commands._common import add_json_flag, client_command, each, print_json
from cli.tables import age, human_bytes, render_table

__all__ = ["register", "wait_for_image"]

POLL_S: Final = 0.3


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    pull = sub.add_parser(
        "pull",
        help="pull an image onto the fleet, showing its status until it is ready",
        description="Pull IMAGE (e.g. busybox, docker.io/library/alpine:3.20). Statuses go "
        "to stderr; the normalised name is printed on stdout once it is ready.",
    )
    pull.add_argument("image")
    client_command(pull, _pull)

    image = sub.add_parser("image", help="images the fleet has pulled")
    actions = image.add_subparsers(dest="image_command", required=True, metavar="ACTION")
    ls = actions.add_parser("ls", help="list ready images")
    add_json_flag(ls)
    client_command(ls, _ls)
    rm = actions.add_parser("rm", help="forget images (hosts keep their disks)")
    rm.add_argument("images", nargs="+", metavar="IMAGE")
    client_command(rm, _rm)


def wait_for_image(client: GatewayClient, image: str, *, quiet_if_ready: bool = False) -> Any:
    """Ask for ``image`` (its record, or a new pull) and wait until it is ready; print
    each status on stderr. A failed pull is a GatewayError (exit 1)."""
    record = client.call("POST", "/images", json={"name": image}, what=f"image {image}")
    name = record["name"]
    shown = "ready" if quiet_if_ready else None
    while True:
        status = record["status"]
        if status != shown:
            print(f"{name}: {status}", file=sys.stderr, flush=True)
            shown = status
        if status == "ready":
            return record
        if status == "failed":
            raise GatewayError(
                "pull_failed",
                f"{name}: {record.get('error') or 'the pull failed'} "
                f"(`vmfleet image rm {name}` forgets it, so that it can be pulled again)",
            )
        time.sleep(POLL_S)
        record = client.call("GET", f"/images/{segment(name)}", what=f"image {name}")


def _pull(client: GatewayClient, args: argparse.Namespace) -> int:
    print(wait_for_image(client, args.image)["name"])
    return 0


def _ls(client: GatewayClient, args: argparse.Namespace) -> int:
    response = client.request("GET", "/images")
    if args.json:
        print_json(response)
        return 0
    rows = [
        (
            image["name"],
            _short_digest(image.get("digest") or ""),
            human_bytes(image.get("size_bytes")),
            age(image.get("created_at")),
        )
        for image in response.json()
    ]
    print(render_table(("NAME", "DIGEST", "SIZE", "AGE"), rows))
    return 0


def _rm(client: GatewayClient, args: argparse.Namespace) -> int:
    def remove(ref: str) -> None:
        what = f"image {ref}"
        name = client.call("GET", f"/images/{segment(ref)}", what=what)["name"]
        client.request("DELETE", f"/images/{segment(name)}", what=what)
        print(name)

    return each(args.images, remove)


def _short_digest(digest: str) -> str:
    algorithm, _, hexdigest = digest.partition(":")
    return f"{algorithm}:{hexdigest[:12]}" if hexdigest else (digest or "-")
