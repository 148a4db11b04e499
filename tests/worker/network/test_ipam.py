"""bridge mode addresses: allocation, exhaustion, persistence, release, own-lease reuse."""

from __future__ import annotations

from pathlib import Path

import pytest

from schemas.errors import NoCapacity
from worker.network import Ipam


def test_gateway_is_the_first_address_and_guests_follow(tmp_path: Path) -> None:
    ipam = Ipam(tmp_path / "leases.json", "10.100.0.0/16")
    assert (ipam.gateway, ipam.prefixlen) == ("10.100.0.1", 16)
    a, b = ipam.allocate("a"), ipam.allocate("b")
    assert (a.ip, b.ip) == ("10.100.0.2", "10.100.0.3")
    assert a.mac != b.mac and a.mac.startswith("02:")


def test_own_lease_is_returned_not_blocking(tmp_path: Path) -> None:
    ipam = Ipam(tmp_path / "leases.json", "10.100.0.0/16")
    first = ipam.allocate("a")
    assert ipam.allocate("a") == first
    # Also after a restart of the worker.
    assert Ipam(tmp_path / "leases.json", "10.100.0.0/16").allocate("a") == first


def test_exhaustion_is_a_clear_error(tmp_path: Path) -> None:
    ipam = Ipam(tmp_path / "leases.json", "10.9.0.0/29")  # 6 hosts: gateway + 5 guests
    ips = {ipam.allocate(f"i{n}").ip for n in range(5)}
    assert len(ips) == 5 and "10.9.0.1" not in ips
    with pytest.raises(NoCapacity, match=r"no free address left in 10\.9\.0\.0/29") as refused:
        ipam.allocate("one-too-many")
    assert refused.value.code == "no_free_address"


def test_release_frees_the_address_and_persists(tmp_path: Path) -> None:
    path = tmp_path / "net" / "leases.json"
    ipam = Ipam(path, "10.9.0.0/29")
    a = ipam.allocate("a")
    ipam.allocate("b")
    assert ipam.release("a") == a
    assert ipam.release("a") is None
    again = Ipam(path, "10.9.0.0/29")
    assert again.lease("a") is None and again.lease("b") is not None
    assert again.allocate("c").ip == a.ip  # the lowest free address is reused


def test_no_two_instances_share_a_mac(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(
        "worker.network.ipam.mac_for",
        lambda key: "02:00:00:00:00:01" if "#" not in key else "02:00:00:00:00:" + key[-2:],
    )
    ipam = Ipam(tmp_path / "leases.json", "10.9.0.0/24")
    assert ipam.allocate("a").mac != ipam.allocate("b").mac


def test_leases_outside_a_changed_subnet_are_dropped(tmp_path: Path) -> None:
    path = tmp_path / "leases.json"
    Ipam(path, "10.9.0.0/24").allocate("a")
    assert Ipam(path, "10.8.0.0/24").lease("a") is None
