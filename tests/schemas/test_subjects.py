"""Subject, stream and bucket names: one prefix, validated tokens."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from schemas.subjects import LOG_SOURCES, Subjects, is_valid_prefix, is_valid_token

S = Subjects()


def test_default_names() -> None:
    assert S.command("h1", "create") == "vmfleet.cmd.h1.create"
    assert S.command_filter("h1") == "vmfleet.cmd.h1.>"
    assert S.commands_all == "vmfleet.cmd.>"
    assert S.commands_stream == "VMFLEET_COMMANDS"
    assert S.command_consumer("h1") == "worker_h1"
    assert S.result("c1") == "vmfleet.result.c1"
    assert S.state("h1", "i1") == "vmfleet.state.h1.i1"
    assert S.state_filter() == "vmfleet.state.*.*"
    assert S.state_filter(host="h1") == "vmfleet.state.h1.*"
    assert S.state_filter(instance="i1") == "vmfleet.state.*.i1"
    assert S.states_all == "vmfleet.state.>"
    assert S.states_stream == "VMFLEET_STATES"
    assert S.logs("i1", "app") == "vmfleet.logs.i1.app"
    assert S.logs_filter("i1") == "vmfleet.logs.i1.*"
    assert S.logs_all == "vmfleet.logs.>"
    assert S.logs_stream == "VMFLEET_LOGS"
    assert S.host_query("h1", "stat") == "vmfleet.host.h1.stat"
    assert S.host_query_filter("h1") == "vmfleet.host.h1.*"
    assert S.instances_bucket == "vmfleet_instances"
    assert S.hosts_bucket == "vmfleet_hosts"
    assert S.volumes_bucket == "vmfleet_volumes"
    assert S.images_bucket == "vmfleet_images"


def test_prefix_changes_every_name() -> None:
    t = Subjects("t-42")
    assert t.command("h", "stop") == "t-42.cmd.h.stop"
    assert t.commands_stream == "T-42_COMMANDS"
    assert t.instances_bucket == "t-42_instances"


@pytest.mark.parametrize("prefix", ["", "a.b", "a b", "a*", "a>", "ä"])
def test_bad_prefix_rejected(prefix: str) -> None:
    assert not is_valid_prefix(prefix)
    with pytest.raises(ValueError, match="prefix"):
        Subjects(prefix)


@pytest.mark.parametrize("token", ["", "a.b", "a b", "*", ">", "a\tb", "a\x00"])
def test_bad_tokens_rejected(token: str) -> None:
    assert not is_valid_token(token)
    with pytest.raises(ValueError, match="host id"):
        S.command(token, "create")
    with pytest.raises(ValueError, match="instance id"):
        S.state("h1", token)
    with pytest.raises(ValueError, match="instance id"):
        S.logs(token, "app")


def test_good_tokens() -> None:
    for token in ["tz4a98xxat96iws9zmbrgj3a", "host-1", "a_b", "h:1"]:
        assert is_valid_token(token)


def test_log_source_checked() -> None:
    assert LOG_SOURCES == ("app", "vmm", "ops")
    with pytest.raises(ValueError, match="log source"):
        S.logs("i1", "hypeman")


def test_consumer_name_refuses_path_separators() -> None:
    with pytest.raises(ValueError):
        S.command_consumer("a/b")


def test_parse_round_trips() -> None:
    assert S.parse_command(S.command("h1", "create")) == ("h1", "create")
    assert S.parse_state(S.state("h1", "i1")) == ("h1", "i1")
    assert S.parse_logs(S.logs("i1", "vmm")) == ("i1", "vmm")
    for bad in ["vmfleet.cmd.h1", "other.cmd.h1.x", "vmfleet.state.h1.i1", "vmfleet.cmd.*.x"]:
        with pytest.raises(ValueError):
            S.parse_command(bad)


@given(st.text(), st.text())
def test_valid_tokens_make_four_token_subjects(host: str, instance: str) -> None:
    if is_valid_token(host) and is_valid_token(instance):
        assert S.parse_state(S.state(host, instance)) == (host, instance)
    else:
        with pytest.raises(ValueError):
            S.state(host, instance)


def test_image_keys_are_kv_safe_and_distinct() -> None:
    import base64
    import re

    from schemas.subjects import image_key

    names = ["docker.io/library/alpine:latest", "127.0.0.1:5000/x@sha256:" + "a" * 64, "a/b:c"]
    keys = [image_key(name) for name in names]
    assert all(re.fullmatch(r"[-_A-Za-z0-9]+", key) for key in keys)
    assert len(set(keys)) == len(keys)
    assert base64.urlsafe_b64decode(keys[0] + "=" * (-len(keys[0]) % 4)).decode() == names[0]
