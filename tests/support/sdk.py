"""hypeman's SDK against a test fleet: a client, and waiting for an instance to get somewhere."""

from __future__ import annotations

import time
from collections.abc import Callable

from hypeman import Hypeman
from hypeman.types import Instance

from tests.gateway.conftest import Fleet


def sdk_client(fleet: Fleet) -> Hypeman:
    return Hypeman(api_key=fleet.api.token, base_url=fleet.api.base_url, max_retries=0)


def wait_for_instance(
    client: Hypeman, instance_id: str, done: Callable[[Instance], bool], timeout_s: float = 300
) -> Instance:
    """The instance once ``done`` says so; AssertionError with its last reading after
    ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while True:
        instance = client.instances.get(instance_id)
        if done(instance):
            return instance
        if time.monotonic() > deadline:
            raise AssertionError(f"never reached: {instance}")
        time.sleep(0.5)
