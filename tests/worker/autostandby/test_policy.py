"""hypeman's status table, row by row: the first matching row decides."""

from __future__ import annotations

from datetime import timedelta

import pytest

from schemas.api import InstanceState
from schemas.autostandby import AutoStandbySpec, AutoStandbyState
from schemas.clock import utc_now
from tests.worker.autostandby.double import record
from worker.autostandby.policy import Observation, idle_standby_refusal, status_of

ON = AutoStandbySpec(enabled=True, idle_timeout="1m0s", idle_timeout_s=60.0)
NOW = utc_now()
LONG_IDLE = AutoStandbyState(idle_since=NOW - timedelta(minutes=5))
SEEN = Observation(tracking_mode="host_port_sockets_tcp")


@pytest.mark.parametrize(
    ("fields", "seen", "expected"),
    [
        ({}, SEEN, ("disabled", "policy_missing", False)),
        (
            {"auto_standby": AutoStandbySpec(enabled=False)},
            SEEN,
            ("disabled", "policy_disabled", False),
        ),
        (
            {"auto_standby": ON, "state": InstanceState.STOPPED},
            SEEN,
            ("ineligible", "instance_not_running", False),
        ),
        (
            {"auto_standby": ON, "network_enabled": False, "ip": None},
            SEEN,
            ("ineligible", "network_disabled", False),
        ),
        ({"auto_standby": ON, "ip": None}, SEEN, ("ineligible", "missing_ip", False)),
        (
            {"auto_standby": ON, "idle": LONG_IDLE},
            Observation(standby_requested=True),
            ("standby_requested", "ready_for_standby", True),
        ),
        (
            {"auto_standby": ON},
            Observation(observer_error="no table"),
            ("error", "observer_error", True),
        ),
        (
            {"auto_standby": ON},
            Observation(connections=2),
            ("active", "active_inbound_connections", True),
        ),
        ({"auto_standby": ON}, SEEN, ("idle_countdown", "idle_timeout_not_elapsed", True)),
        (
            {"auto_standby": ON, "idle": LONG_IDLE},
            SEEN,
            ("ready_for_standby", "ready_for_standby", True),
        ),
    ],
)
def test_status_rows(
    fields: dict[str, object], seen: Observation, expected: tuple[str, str, bool]
) -> None:
    status = status_of(record("a", **fields), seen, NOW)
    assert (status.status, status.reason, status.eligible) == expected
    assert status.supported is True


def test_countdown_fields_and_a_hold() -> None:
    idle = AutoStandbyState(
        idle_since=NOW - timedelta(seconds=20), hold_until=NOW + timedelta(minutes=10)
    )
    status = status_of(record("a", auto_standby=ON, idle=idle), SEEN, NOW)
    assert status.idle_since == NOW - timedelta(seconds=20)
    assert status.next_standby_at == status.hold_until == NOW + timedelta(minutes=10)
    assert status.countdown_remaining == "10m0s"
    assert status.idle_timeout == "1m0s"
    assert idle_standby_refusal(record("a", auto_standby=ON, idle=idle), NOW) is not None
    assert idle_standby_refusal(record("a", auto_standby=ON, idle=LONG_IDLE), NOW) is None
    assert idle_standby_refusal(record("a", auto_standby=ON), NOW) is not None  # not idle
