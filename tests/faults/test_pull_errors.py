"""How a failed pull is reported when the fault is this host's, not the registry's.

The disk-full test found a create on a full disk answered 404 "image not found": skopeo's
message held a temporary file name whose digits contained "404". These pin the cause down
without a VM.
"""

from __future__ import annotations

from schemas.references import normalize_reference
from worker.images.registry import registry_error
from worker.run import CommandFailed

REF = normalize_reference("127.0.0.1:5000/busybox:latest")


def skopeo_failed(message: str) -> CommandFailed:
    return CommandFailed(["skopeo", "copy"], 1, f'time="…" level=fatal msg="{message}"')


def test_a_full_disk_is_named_and_not_blamed_on_the_registry() -> None:
    error = registry_error(
        REF,
        skopeo_failed(
            "writing blob: write /d/images/tmp/ab-x/layout/oci-put-blob3404017: "
            "no space left on device"
        ),
    )
    assert (error.status, error.code) == (507, "insufficient_storage")
    assert "no space left on device" in error.message


def test_digits_in_names_are_no_404() -> None:
    error = registry_error(REF, skopeo_failed("reading blob sha256:a404b: connection reset"))
    assert error.code == "registry_unavailable"


def test_the_registrys_404_is_still_not_found() -> None:
    error = registry_error(
        REF, skopeo_failed("reading manifest latest: invalid status code from registry 404")
    )
    assert (error.status, error.code) == (404, "not_found")
