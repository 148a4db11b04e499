"""vmfleet's error tree: every failure a client can see, with its HTTP status and code.

    VmfleetError (500 internal_error)
    ├── BadRequest (400 + code, e.g. invalid_size, image_not_ready, name_conflict)
    ├── Unauthorized (401 Unauthorized)
    ├── NotFound (404 not_found)
    ├── Conflict (409 + code, e.g. already_exists, ambiguous, conflict)
    │   └── InvalidState (409 invalid_state)
    ├── PayloadTooLarge (413 payload_too_large)
    ├── HostUnavailable (503 host_unavailable) / NoCapacity (503 no_capacity)
    ├── OpTimeout (504 host_unavailable: the command stays queued)
    ├── InsufficientStorage (507 insufficient_storage: the host's disk is full)
    └── HypervisorError (500 hypervisor_error)

Worker and gateway raise these; the gateway maps them to responses in one handler, and a
worker sends them back inside a command result as ``ErrorInfo`` so the gateway re-raises
the same class. Whether a retry can help is a property of the class (``retryable``), which
the gateway turns into hypeman's SDK hint header ``x-should-retry``.
"""

from __future__ import annotations

import msgspec

__all__ = [
    "BadRequest",
    "Conflict",
    "ErrorInfo",
    "HostUnavailable",
    "HypervisorError",
    "InsufficientStorage",
    "InvalidState",
    "NoCapacity",
    "NotFound",
    "OpTimeout",
    "PayloadTooLarge",
    "Unauthorized",
    "VmfleetError",
    "error_from_info",
]


class ErrorInfo(msgspec.Struct, frozen=True):
    """An error as it travels over NATS."""

    status: int
    code: str
    message: str


class VmfleetError(Exception):
    status: int = 500
    code: str = "internal_error"
    retryable: bool = False

    def __init__(self, message: str, *, code: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code

    def info(self) -> ErrorInfo:
        return ErrorInfo(status=self.status, code=self.code, message=self.message)


class BadRequest(VmfleetError):
    status = 400
    code = "bad_request"


class Unauthorized(VmfleetError):
    status = 401
    code = "Unauthorized"


class NotFound(VmfleetError):
    status = 404
    code = "not_found"


class Conflict(VmfleetError):
    status = 409
    code = "conflict"


class InvalidState(Conflict):
    code = "invalid_state"


class PayloadTooLarge(VmfleetError):
    status = 413
    code = "payload_too_large"


class HostUnavailable(VmfleetError):
    status = 503
    code = "host_unavailable"
    retryable = True


class NoCapacity(VmfleetError):
    status = 503
    code = "no_capacity"
    retryable = True


class OpTimeout(VmfleetError):
    status = 504
    code = "host_unavailable"
    retryable = True


class InsufficientStorage(VmfleetError):
    """The host ran out of disk doing it; what was half-made is removed. Not a bug of
    vmfleet's (500) nor of the request's (4xx): it says what an operator must fix."""

    status = 507
    code = "insufficient_storage"


class HypervisorError(VmfleetError):
    status = 500
    code = "hypervisor_error"


_BY_STATUS: dict[int, type[VmfleetError]] = {
    400: BadRequest,
    401: Unauthorized,
    404: NotFound,
    409: Conflict,
    413: PayloadTooLarge,
    503: HostUnavailable,
    504: OpTimeout,
    507: InsufficientStorage,
}


def error_from_info(info: ErrorInfo) -> VmfleetError:
    """Rebuild the exception a worker reported, keeping its status and code."""
    if info.code == InvalidState.code:
        return InvalidState(info.message)
    cls = _BY_STATUS.get(info.status, VmfleetError)
    err = cls(info.message, code=info.code)
    err.status = info.status
    return err
