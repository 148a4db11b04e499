"""A create's image against the fleet's image records (gateway/plan.py): what hypeman
refuses, and the digest a ready image's create carries to its host."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import cast

import pytest

from gateway.plan import plan_create
from gateway.view import FleetView
from schemas.api import CreateInstanceRequest, Hypervisor, ImageStatus
from schemas.errors import BadRequest
from schemas.messages import ImageRecord
from schemas.subjects import image_key

NAME = "registry.lan:5000/app:v1"
DIGEST = "sha256:" + "ab" * 32


class Images:
    """The part of FleetView a create's image check reads."""

    def __init__(self, *records: ImageRecord) -> None:
        self.images = {image_key(r.name): r for r in records}


def record(status: ImageStatus) -> ImageRecord:
    return ImageRecord(name=NAME, digest=DIGEST, status=status, created_at=datetime.now(UTC))


def plan(image: str, view: Images) -> str:
    """The digest the planned create carries, checked to reach the instance's first record
    (the worker's pull_image boots a digest its host has without asking the registry)."""
    request = CreateInstanceRequest(name="web", image=image)
    planned = plan_create(
        request,
        cast(FleetView, view),
        command_id="c1",
        instance_id="i1",
        issued_at=datetime.now(UTC),
    )
    first = planned.command.new_record(
        host="h1", hypervisor=Hypervisor.QEMU, created_at=datetime.now(UTC)
    )
    assert first.image_digest == planned.command.image_digest
    return planned.command.image_digest


def test_a_ready_image_is_booted_as_it_was_pulled() -> None:
    """The host that has this digest boots it without asking the registry again."""
    assert plan(NAME, Images(record(ImageStatus.READY))) == DIGEST


def test_an_image_the_fleet_has_no_record_of_is_resolved_by_its_host() -> None:
    assert plan(NAME, Images()) == ""


def test_a_digest_reference_is_its_own_digest() -> None:
    other = "sha256:" + "cd" * 32
    assert plan(f"registry.lan:5000/app@{other}", Images()) == other


@pytest.mark.parametrize("status", [ImageStatus.PULLING, ImageStatus.FAILED])
def test_an_image_not_ready_is_refused_as_hypeman_does(status: ImageStatus) -> None:
    with pytest.raises(BadRequest) as refused:
        plan(NAME, Images(record(status)))
    assert refused.value.code == "image_not_ready"
    assert str(refused.value.message) == f"image not ready: image status is {status.value}"
