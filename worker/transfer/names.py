"""Object names of a bundle in the transfers store (schemas.transfers describes the layout).

Object names are not subjects (nats-py base64-encodes them into the meta subject), so any
bundle id made of subject-token characters is safe; ``/`` separates the levels."""

from __future__ import annotations

from schemas.subjects import is_valid_token

__all__ = [
    "MOVING_MARK",
    "SHIPPED_DISKS",
    "check_bundle",
    "manifest_object",
    "part_object",
    "parts_prefix",
]

#: In a snapshot fetched from another host: the disks of that host its saved VM ran on
#: (``root.ext4``, the image's), which this host's copy of the image does not replace.
SHIPPED_DISKS = "host-disks"

#: A file in an instance's directory while it is being moved away (holds the bundle's
#: name): its host refuses every other command on it (worker.transfer.move).
MOVING_MARK = "moving"


def check_bundle(bundle: str) -> str:
    """``bundle`` if usable as a bundle id (and as a directory name), else ValueError."""
    if not is_valid_token(bundle) or "/" in bundle or bundle.startswith("."):
        raise ValueError(f"invalid bundle id {bundle!r}: one token, no '/', not hidden")
    return bundle


def manifest_object(bundle: str) -> str:
    return f"{check_bundle(bundle)}/manifest"


def parts_prefix(bundle: str) -> str:
    return f"{check_bundle(bundle)}/part/"


def part_object(bundle: str, file_index: int, part_index: int) -> str:
    return f"{parts_prefix(bundle)}{file_index}/{part_index}"
