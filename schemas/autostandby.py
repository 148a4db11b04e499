"""Auto-standby's wire shapes: hypeman's ``AutoStandbyPolicy`` and ``AutoStandbyStatus``,
the checked policy and the idle clock an instance's record keeps, and the host query the
gateway asks the owning worker (status, hold).

The policy is checked and normalized by the gateway
(:func:`gateway.supervision.auto_standby_policy`): the record holds it in the shape
hypeman echoes (``idle_timeout`` as Go prints it, CIDRs canonical, sorted and unique,
ports sorted and unique), plus the timeout in seconds for the worker. This module
imports nothing of :mod:`schemas.api` (which imports it).
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Final, Literal

import msgspec
from msgspec import UNSET, UnsetType

from schemas.errors import ErrorInfo

__all__ = [
    "TRACKING_BRIDGE",
    "TRACKING_USER",
    "AutoStandbyPolicy",
    "AutoStandbyQuery",
    "AutoStandbyReply",
    "AutoStandbySpec",
    "AutoStandbyState",
    "AutoStandbyStatus",
    "StandbyCause",
    "StatusName",
    "StatusReason",
    "TransitionCause",
    "WakeCause",
]

Timestamp = Annotated[datetime, msgspec.Meta(tz=True)]

#: Why an instance went to Standby: a user's ``POST /standby`` or its idle policy.
StandbyCause = Literal["api", "idle"]
#: Why a Standby instance was restored: a user's ``POST /restore`` or a connection to one
#: of its mapped ports (the worker's wake listener).
WakeCause = Literal["api", "connection"]
#: The cause a standby or restore carries into the record and the state events.
TransitionCause = Literal["api", "idle", "connection"]

StatusName = Literal[
    "unsupported",
    "disabled",
    "ineligible",
    "active",
    "idle_countdown",
    "ready_for_standby",
    "standby_requested",
    "error",
]
StatusReason = Literal[
    "unsupported_platform",
    "policy_missing",
    "policy_disabled",
    "instance_not_running",
    "network_disabled",
    "missing_ip",
    "has_vgpu",
    "active_inbound_connections",
    "idle_timeout_not_elapsed",
    "observer_error",
    "ready_for_standby",
]

#: ``tracking_mode`` of a user-mode host: the TCP sockets of the mapped host ports, read
#: from the kernel's socket table (QEMU's hostfwd holds them).
TRACKING_USER: Final = "host_port_sockets_tcp"
#: ``tracking_mode`` of a bridge-mode host: conntrack flows to the guest's address, as
#: hypeman tracks them (it names its mode ``conntrack_events_v4_tcp``).
TRACKING_BRIDGE: Final = "conntrack_v4_tcp"


class AutoStandbyPolicy(msgspec.Struct, kw_only=True):
    """``auto_standby`` of an Instance, as hypeman echoes it (a disabled policy is
    ``{"enabled": false}`` alone)."""

    enabled: bool
    idle_timeout: str | UnsetType = UNSET
    ignore_destination_ports: list[int] | UnsetType = UNSET
    ignore_source_cidrs: list[str] | UnsetType = UNSET


class AutoStandbySpec(msgspec.Struct, frozen=True, kw_only=True):
    """A checked policy, normalized (the gateway made it; the worker applies it)."""

    enabled: bool
    #: Go's spelling of the timeout (``"10m0s"``), echoed as is; "" when disabled.
    idle_timeout: str = ""
    idle_timeout_s: float = 0.0
    ignore_destination_ports: tuple[int, ...] = ()
    ignore_source_cidrs: tuple[str, ...] = ()

    def to_api(self) -> AutoStandbyPolicy:
        if not self.enabled:
            return AutoStandbyPolicy(enabled=False)
        return AutoStandbyPolicy(
            enabled=True,
            idle_timeout=self.idle_timeout,
            ignore_destination_ports=list(self.ignore_destination_ports) or UNSET,
            ignore_source_cidrs=list(self.ignore_source_cidrs) or UNSET,
        )


class AutoStandbyState(msgspec.Struct, frozen=True, kw_only=True):
    """The idle clock, kept in the record so that a worker restart keeps the countdown."""

    #: When the instance last had no counted inbound connection (None: it has some, or
    #: it is not Running).
    idle_since: Timestamp | None = None
    #: When a counted inbound connection was last seen open.
    last_inbound_activity_at: Timestamp | None = None
    #: No idle standby before this (``POST .../auto-standby/hold``).
    hold_until: Timestamp | None = None


class AutoStandbyStatus(msgspec.Struct, kw_only=True):
    """hypeman's ``AutoStandbyStatus`` (fields in Go's alphabetical order)."""

    active_inbound_connections: int
    configured: bool
    countdown_remaining: str | UnsetType = UNSET
    eligible: bool
    enabled: bool
    hold_until: Timestamp | UnsetType = UNSET
    idle_since: Timestamp | UnsetType = UNSET
    idle_timeout: str | UnsetType = UNSET
    last_inbound_activity_at: Timestamp | UnsetType = UNSET
    next_standby_at: Timestamp | UnsetType = UNSET
    reason: StatusReason
    status: StatusName
    supported: bool
    tracking_mode: str


class AutoStandbyQuery(msgspec.Struct, kw_only=True):
    """A gateway's question to the owning worker (``Subjects.autostandby_query``)."""

    instance_id: str
    action: Literal["status", "hold"] = "status"


class AutoStandbyReply(msgspec.Struct, kw_only=True):
    """The worker's answer: the status after the action, or why there is none."""

    status: AutoStandbyStatus | None = None
    error: ErrorInfo | None = None
