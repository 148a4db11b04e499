"""Errors of a transfer, in vmfleet's error tree so they reach a client as they are."""

from __future__ import annotations

from schemas.errors import NotFound, VmfleetError

__all__ = ["BundleNotFound", "CorruptTransfer"]


class BundleNotFound(NotFound):
    """No complete bundle of that name in the transfers store (never uploaded, still
    uploading, or aged out)."""

    def __init__(self, bundle: str) -> None:
        super().__init__(
            f"bundle {bundle} is not in the transfers store (not uploaded, or expired)",
            code="transfer_not_found",
        )


class CorruptTransfer(VmfleetError):
    """Bytes that do not hash to what the manifest says: the copy is thrown away, never
    used. A retry fetches again (and fails again while the stored copy is bad)."""

    code = "transfer_corrupt"
    retryable = True
