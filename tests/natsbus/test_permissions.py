"""The permission lists and the rendered server config, checked against the subjects the
components really use (``schemas.subjects``) and against nats-server's own parser."""

from __future__ import annotations

import stat
import subprocess
from pathlib import Path

import anyio
import pytest

from cli.embedded_nats import nats_server_binary
from cli.main import main
from natsbus import (
    Layout,
    ServerTls,
    complete_passwords,
    gateway_permissions,
    inbox_prefix,
    parse_passwords,
    password_variable,
    provision,
    render_passwords,
    render_server_config,
    worker_permissions,
)
from schemas.subjects import Subjects
from tests.support.secure_nats import SecureNats

S = Subjects("vmfleet")
ROOT = Path(__file__).parents[2]


def matches(pattern: str, subject: str) -> bool:
    """NATS subject matching: ``*`` is one token, a final ``>`` one or more."""
    want, got = pattern.split("."), subject.split(".")
    for i, token in enumerate(want):
        if token == ">":
            return len(got) > i
        if i >= len(got) or (token != "*" and token != got[i]):
            return False
    return len(want) == len(got)


def allowed(patterns: tuple[str, ...], subject: str) -> bool:
    return any(matches(p, subject) for p in patterns)


def test_the_matcher() -> None:
    assert matches("a.*.c", "a.b.c") and not matches("a.*.c", "a.b.c.d")
    assert matches("a.>", "a.b.c") and not matches("a.>", "a")


def test_a_worker_publishes_what_it_must_for_its_own_host_only() -> None:
    mine, theirs = worker_permissions(S, "h1").publish, ("h2",)
    durable = S.command_consumer("h1")
    own = [
        f"$JS.API.CONSUMER.MSG.NEXT.{S.commands_stream}.{durable}",
        f"$JS.API.CONSUMER.INFO.{S.commands_stream}.{durable}",
        # nats-py's create subject for a durable with one filter (nats-server 2.9+)
        f"$JS.API.CONSUMER.CREATE.{S.commands_stream}.{durable}.{S.command_filter('h1')}",
        f"$JS.ACK.{S.commands_stream}.{durable}.1.7.7.1796149353222782984.0",
        S.state("h1", "i-1"),
        f"$KV.{S.hosts_bucket}.h1",
        f"$KV.{S.instances_bucket}.i-1",
        f"$KV.{S.volumes_bucket}.vol-1",
        f"$KV.{S.images_bucket}.ZG9ja2Vy",
        S.logs("i-1", "app"),
        S.result("cmd-1"),
        # worker.transfer: upload (chunks, meta), fetch (ordered consumer), delete
        f"$O.{S.transfers_bucket}.C.abc",
        f"$O.{S.transfers_bucket}.M.c25hcC1zMS9tYW5pZmVzdA==",
        f"$JS.API.CONSUMER.CREATE.OBJ_{S.transfers_bucket}",
        f"$JS.API.STREAM.MSG.GET.OBJ_{S.transfers_bucket}",
        f"$JS.API.STREAM.PURGE.OBJ_{S.transfers_bucket}",
    ]
    for subject in own:
        assert allowed(mine, subject), subject
    for host in theirs:
        durable = S.command_consumer(host)
        for subject in (
            f"$JS.API.CONSUMER.MSG.NEXT.{S.commands_stream}.{durable}",
            f"$JS.API.CONSUMER.INFO.{S.commands_stream}.{durable}",
            f"$JS.API.CONSUMER.DELETE.{S.commands_stream}.{durable}",
            f"$JS.API.CONSUMER.CREATE.{S.commands_stream}.{durable}.{S.command_filter(host)}",
            f"$JS.API.CONSUMER.CREATE.{S.commands_stream}.worker_h1.{S.command_filter(host)}",
            f"$JS.API.CONSUMER.CREATE.{S.commands_stream}",
            f"$JS.API.STREAM.MSG.GET.{S.commands_stream}",
            f"$JS.ACK.{S.commands_stream}.{durable}.1.7.7.1796149353222782984.0",
            S.command(host, "create"),
            S.command("h1", "create"),  # commands are a gateway's to send
            S.state(host, "i-1"),
            S.host_query(host, "result"),
            f"$KV.{S.hosts_bucket}.{host}",
            f"$KV.{S.drains_bucket}.{host}",
            f"$JS.API.STREAM.CREATE.{S.commands_stream}",
            f"$JS.API.STREAM.UPDATE.{S.commands_stream}",
            f"$JS.API.STREAM.DELETE.{S.commands_stream}",
            f"$JS.API.STREAM.CREATE.OBJ_{S.transfers_bucket}",  # a gateway provisions it
            f"$JS.API.STREAM.DELETE.OBJ_{S.transfers_bucket}",
        ):
            assert not allowed(mine, subject), subject


def test_a_worker_subscribes_to_its_own_queries_and_inbox_only() -> None:
    permissions = worker_permissions(S, "h1")
    assert allowed(permissions.subscribe, S.host_query("h1", "result"))
    assert allowed(permissions.subscribe, f"{inbox_prefix(S, 'h1')}.abc.1")
    for subject in (
        S.host_query("h2", "result"),
        S.command("h1", "create"),
        S.command("h2", "create"),
        S.result("cmd-1"),
        f"{inbox_prefix(S, 'h2')}.abc.1",
        f"{inbox_prefix(S)}.abc.1",
        "_INBOX.abc.1",
    ):
        assert not allowed(permissions.subscribe, subject), subject
    assert permissions.allow_responses


def test_inboxes_never_overlap() -> None:
    """A host named like a role still gets an inbox of its own."""
    prefixes = [inbox_prefix(S), *(inbox_prefix(S, h) for h in ("gateway", "h1", "h1x"))]
    for a in prefixes:
        for b in prefixes:
            assert a == b or not matches(f"{a}.>", f"{b}.x"), (a, b)


def test_the_gateway_reaches_every_host_but_reads_no_queue() -> None:
    permissions = gateway_permissions(S)
    for subject in (
        S.command("any-host", "create"),
        S.host_query("any-host", "result"),
        f"$KV.{S.drains_bucket}.h1",
        f"$KV.{S.images_bucket}.ZG9ja2Vy",
        f"$O.{S.archives_bucket}.C.abc",
        f"$JS.API.STREAM.CREATE.{S.commands_stream}",
        f"$JS.API.CONSUMER.CREATE.{S.logs_stream}.x.{S.logs('i-1', 'app')}",
        f"$JS.API.STREAM.MSG.GET.{S.logs_stream}",
        f"$JS.API.DIRECT.GET.KV_{S.instances_bucket}.$KV.{S.instances_bucket}.i-1",
    ):
        assert allowed(permissions.publish, subject), subject
    for subject in (
        f"$JS.API.CONSUMER.MSG.NEXT.{S.commands_stream}.{S.command_consumer('h1')}",
        f"$JS.API.CONSUMER.CREATE.{S.commands_stream}",
        f"$JS.API.STREAM.DELETE.{S.commands_stream}",
        f"$KV.{S.hosts_bucket}.h1",  # only a worker beats for its host
        f"$KV.{S.instances_bucket}.i-1",
        S.state("h1", "i-1"),
    ):
        assert not allowed(permissions.publish, subject), subject
    assert allowed(permissions.subscribe, S.result("cmd-1"))
    assert not allowed(permissions.subscribe, S.command("h1", "create"))


def test_the_rendered_config_is_valid_for_nats_server(tmp_path: Path) -> None:
    (tmp_path / "vmfleet-passwords.conf").write_text(
        render_passwords(complete_passwords(S, ("h1", "h2"), {})[0])
    )
    tls = ServerTls(cert_file="/etc/nats/server.pem", key_file="/etc/nats/server.key")
    for config in (
        render_server_config(S, ("h1", "h2")),
        render_server_config(S, ("h1",), tls=tls),
    ):
        path = tmp_path / "nats-server.conf"
        path.write_text(config)
        if "tls {" in config:
            continue  # the certificate files do not exist here; nats-server -t opens them
        done = subprocess.run(
            [str(nats_server_binary()), "-c", str(path), "-t"],
            capture_output=True,
            text=True,
            check=False,
        )
        assert done.returncode == 0, done.stdout + done.stderr


def test_the_shipped_example_is_what_the_generator_prints(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("VMFLEET_SUBJECT_PREFIX", raising=False)
    assert main(["nats-config", "--hosts", "host-1,host-2", "--prefix", "vmfleet"]) == 0
    example = (ROOT / "docs" / "examples" / "nats-server.conf").read_text()
    assert capsys.readouterr().out == example


def test_passwords_file_is_private_and_kept_when_hosts_are_added(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    passwords = tmp_path / "vmfleet-passwords.conf"
    assert main(["nats-config", "--hosts", "a,b", "--passwords", str(passwords)]) == 0
    assert f'include "{passwords}"' in capsys.readouterr().out
    assert stat.S_IMODE(passwords.stat().st_mode) == 0o600
    first = parse_passwords(passwords.read_text())
    assert set(first) == {
        password_variable(u)
        for u in ("vmfleet-admin", "vmfleet-gateway", "vmfleet-worker-a", "vmfleet-worker-b")
    }
    assert main(["nats-config", "--hosts", "a,b,c", "--passwords", str(passwords)]) == 0
    second = parse_passwords(passwords.read_text())
    assert second.items() >= first.items()
    assert password_variable("vmfleet-worker-c") in second


def test_passwords_survive_the_file_format() -> None:
    tricky = {"A_PASSWORD": 'quote " and \\ backslash', "B_PASSWORD": "12k"}
    assert parse_passwords(render_passwords(tricky)) == tricky


def test_bad_hosts_are_refused(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["nats-config", "--hosts", "a,b.c"]) == 2
    assert "invalid host id 'b.c'" in capsys.readouterr().err
    assert main(["nats-config", "--hosts", "a-b,a_b"]) == 2
    assert main(["nats-config", "--hosts", "a,a"]) == 2


def test_nsc_commands_carry_the_same_permissions(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["nats-config", "--hosts", "h1", "--nsc"]) == 0
    out = capsys.readouterr().out
    assert "nsc add user --account VMFLEET --name vmfleet-worker-h1" in out
    assert "--allow-pub-response 1" in out
    assert ",".join(worker_permissions(S, "h1").subscribe) in out


@pytest.mark.anyio
async def test_a_worker_waits_for_a_gateway_to_create_the_layout(
    tmp_path: Path, subject_prefix: str
) -> None:
    """A worker's user may not create streams: started first, it waits, and it carries
    on once a gateway has provisioned; looking the layout up sends nothing refused."""
    with SecureNats(tmp_path / "nats", subject_prefix, ("h1",)) as server:
        subjects = server.subjects
        worker = await server.connect("h1")
        gateway = await server.connect()
        try:
            done = anyio.Event()

            async def worker_provisions() -> None:
                await provision(worker.nc.jetstream(timeout=0.5), subjects, Layout())
                done.set()

            async with anyio.create_task_group() as tg:
                tg.start_soon(worker_provisions)
                await anyio.sleep(1.5)
                assert not done.is_set()
                assert worker.refused(f"$JS.API.STREAM.CREATE.{subjects.commands_stream}")
                await provision(gateway.nc.jetstream(), subjects, Layout())
                with anyio.fail_after(20):
                    await done.wait()
            before = len(worker.violations())
            await provision(worker.nc.jetstream(timeout=0.5), subjects, Layout())
            assert len(worker.violations()) == before  # an up-to-date layout: lookups only
            # A worker with other limits than the gateway's carries on with the layout as is.
            with anyio.fail_after(30):
                await provision(
                    worker.nc.jetstream(timeout=0.5),
                    subjects,
                    Layout(replicas=1, logs_max_msgs_per_subject=7),
                )
            logs = await gateway.nc.jetstream().stream_info(subjects.logs_stream)
            assert logs.config.max_msgs_per_subject == Layout().logs_max_msgs_per_subject
            assert gateway.violations() == []
        finally:
            await worker.close()
            await gateway.close()
