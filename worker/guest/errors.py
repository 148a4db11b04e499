"""Errors raised while preparing guest boot assets (kernel, initrd, config disk).

GuestAssetError          a command failed, or an asset is missing or malformed
"""

from __future__ import annotations

__all__ = ["GuestAssetError"]


class GuestAssetError(Exception):
    """Preparing a guest boot asset failed.

    ``stderr_tail`` holds the last lines of the failing command's stderr, when
    a command failed; it is also part of ``str(exc)``.
    """

    def __init__(self, message: str, *, stderr_tail: str = "") -> None:
        self.message = message
        self.stderr_tail = stderr_tail
        text = message if not stderr_tail else f"{message}\n--- stderr (tail) ---\n{stderr_tail}"
        super().__init__(text)
