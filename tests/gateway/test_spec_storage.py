"""The served description lists every status the writes answer: 507 for a full disk too."""

from __future__ import annotations

from gateway.openapi import build_spec


def test_writes_that_store_on_a_host_describe_507() -> None:
    paths = build_spec()["paths"]
    for path, method in (
        ("/instances", "post"),
        ("/instances/{id}/start", "post"),
        ("/instances/{id}/standby", "post"),
        ("/volumes", "post"),
        ("/images", "post"),
    ):
        described = paths[path][method]["responses"]["507"]
        assert described["x-vmfleet-extension"] is True
        schema = described["content"]["application/json"]["schema"]
        assert schema == {"$ref": "#/components/schemas/Error"}
    assert "507" not in paths["/instances/{id}"]["delete"]["responses"]
