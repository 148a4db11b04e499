"""The client subcommands of ``vmfleet``: everyday use of a fleet through its gateway.

Each module registers its subcommands on the top-level parser and marks them with
``client_command``; ``cli.main`` runs a marked command through ``run_client_command``,
which builds the client from ``HYPEMAN_BASE_URL``/``HYPEMAN_API_KEY`` and turns every
failure into one ``vmfleet: <code>: <message>`` line and an exit code (``docs/cli.md``).
"""

from __future__ import annotations

import argparse

from cli.commands import autostandby, fleet, guest, images, instances, snapshots, volumes
from cli.commands._common import Handler, run_client_command

__all__ = ["Handler", "register_client_commands", "run_client_command"]


def register_client_commands(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    instances.register(sub)
    guest.register(sub)
    images.register(sub)
    volumes.register(sub)
    fleet.register(sub)
    autostandby.register(sub)
    snapshots.register(sub)
