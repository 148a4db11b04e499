"""hypeman's own Python SDK drives the whole lifecycle against vmfleet, unchanged.

Everything runs on the real worker: the image pull (PullImage, its record moving to
ready in the images bucket), volumes from an archive, and the instance's whole life.
"""

from __future__ import annotations

import io
import tarfile
import time

import pytest
from hypeman import ConflictError, Hypeman, NotFoundError

from tests.gateway.conftest import Fleet

pytestmark = pytest.mark.vm


def _archive() -> bytes:
    """A tar.gz holding hello.txt."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        data = b"hello from an archive\n"
        info = tarfile.TarInfo("hello.txt")
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


def _until(check: object, timeout_s: float = 60) -> None:
    deadline = time.monotonic() + timeout_s
    while not check():  # type: ignore[operator]
        assert time.monotonic() < deadline, "condition never held"
        time.sleep(0.1)


def test_sdk_lifecycle(fleet: Fleet, busybox_image: str) -> None:
    client = Hypeman(api_key=fleet.api.token, base_url=fleet.api.base_url, max_retries=0)
    assert client.health.check().status == "ok"

    pulled = client.images.create(name=busybox_image)
    assert pulled.name == busybox_image and pulled.status in ("pending", "pulling", "ready")
    _until(lambda: client.images.get(busybox_image).status == "ready")
    ready = client.images.get(busybox_image)
    assert ready.digest.startswith("sha256:") and ready.cmd and ready.size_bytes
    assert busybox_image in [i.name for i in client.images.list()]

    volume = client.volumes.create_from_archive(_archive(), name="sdk-data", size_gb=1)
    assert volume.id in [v.id for v in client.volumes.list()]

    created = client.instances.create(
        name="sdk",
        image=busybox_image,
        size="256MB",
        vcpus=1,
        volumes=[{"volume_id": volume.id, "mount_path": "/data", "readonly": True}],
        cmd=["/bin/sh", "-c", "echo hello from busybox; cat /data/hello.txt; sleep 3600"],
    )
    assert created.state == "Running" and len(created.id) == 24
    assert created.volumes and created.volumes[0].mount_path == "/data"
    assert client.instances.get("sdk").id == created.id
    assert created.id in [i.id for i in client.instances.list()]
    attachments = client.volumes.get(volume.id).attachments or []
    assert [a.instance_id for a in attachments] == [created.id]

    with pytest.raises(ConflictError) as refused:
        client.instances.restore(created.id)
    assert refused.value.body == {  # type: ignore[comparison-overlap]
        "code": "invalid_state",
        "message": "invalid state transition: cannot restore from state Running",
    }

    assert client.instances.stop(created.id).state == "Stopped"
    assert client.instances.start(created.id).state == "Running"
    standby = client.instances.standby(created.id)
    assert (standby.state, standby.has_snapshot) == ("Standby", True)
    restored = client.instances.restore(created.id)
    assert (restored.state, restored.has_snapshot) == ("Running", False)

    def said_hello() -> bool:
        lines = list(client.instances.logs(created.id, tail=200))
        return "hello from busybox" in lines and "hello from an archive" in lines

    _until(said_hello)
    operations = list(client.instances.logs(created.id, source="hypeman", tail=500))
    assert any("Paused -> Standby" in line for line in operations), operations

    client.instances.delete(created.id)
    with pytest.raises(NotFoundError):
        client.instances.get(created.id)
    _until(lambda: not client.volumes.get(volume.id).attachments)
    client.volumes.delete(volume.id)
    assert volume.id not in [v.id for v in client.volumes.list()]
    client.images.delete(busybox_image)
    with pytest.raises(NotFoundError):
        client.images.get(busybox_image)
