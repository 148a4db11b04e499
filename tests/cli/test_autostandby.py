"""`--auto-standby` as the API's policy, and the few words `ps` shows of a status."""

from __future__ import annotations

import pytest

from cli.commands.autostandby import auto_standby_body, status_summary
from cli.main import _parser as build_parser


def test_the_flag_becomes_hypemans_policy() -> None:
    assert auto_standby_body("30s") == {"enabled": True, "idle_timeout": "30s"}
    assert auto_standby_body("off") == {"enabled": False}
    assert auto_standby_body(None) is None
    args = build_parser().parse_args(["run", "--auto-standby", "30s", "busybox"])
    assert args.auto_standby == "30s"
    args = build_parser().parse_args(["update", "--auto-standby", "off", "web"])
    assert args.auto_standby == "off"


@pytest.mark.parametrize(
    ("status", "shown"),
    [
        ({"status": "active", "active_inbound_connections": 2}, "2 conn"),
        ({"status": "idle_countdown", "countdown_remaining": "25s"}, "standby in 25s"),
        ({"status": "ready_for_standby"}, "standby now"),
        ({"status": "error"}, "error"),
    ],
)
def test_ps_summary(status: dict[str, object], shown: str) -> None:
    assert status_summary(status) == shown
