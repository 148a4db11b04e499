"""The served API description matches what the app serves and what ``schemas/`` encodes."""

from __future__ import annotations

import enum
import re

import msgspec
import pytest
import yaml
from starlette.routing import Route, WebSocketRoute

import schemas.api as api
from gateway import GatewayConfig, create_app
from gateway.openapi import EXTENSION, HYPEMAN_OPERATIONS, build_spec
from natsbus import BusOptions
from tests.support.gateway import GatewayHandle

#: Declared by hypeman, never sent by hypeman or vmfleet (reference §1.2).
NEVER_SENT = {"Error": {"details", "inner_error"}}


@pytest.fixture
def gw(shared_gw: GatewayHandle) -> GatewayHandle:
    return shared_gw


def _served_operations() -> set[tuple[str, str]]:
    app = create_app(
        GatewayConfig(bus=BusOptions(urls=("nats://127.0.0.1:1",)), jwt_secret="x" * 16)
    )
    operations = set()
    for route in app.routes:
        if isinstance(route, WebSocketRoute):
            continue  # exec and cp: described by the plain GET route at the same path
        assert isinstance(route, Route)
        path = re.sub(r"\{(\w+):\w+\}", r"{\1}", route.path)
        operations |= {(path, m.lower()) for m in route.methods or () if m != "HEAD"}
    return operations


def test_every_served_route_is_described_and_every_described_one_served() -> None:
    spec = build_spec()
    described = {
        (path, method)
        for path, operations in spec["paths"].items()
        for method in operations
        if method != "parameters"
    }
    assert described == _served_operations()


def test_vmfleet_additions_are_marked() -> None:
    spec = build_spec()
    for path, operations in spec["paths"].items():
        for method, operation in operations.items():
            if method == "parameters":
                continue
            hypeman = method in HYPEMAN_OPERATIONS.get(path, frozenset())
            assert bool(operation.get(EXTENSION)) is not hypeman, (path, method)
    instance = spec["components"]["schemas"]["Instance"]["properties"]
    assert instance["host"][EXTENSION] and instance["port_mappings"][EXTENSION]
    assert "multipart/form-data" in spec["paths"]["/volumes"]["post"]["requestBody"]["content"]
    assert spec["paths"]["/instances"]["post"]["responses"]["503"][EXTENSION]


def test_component_schemas_agree_with_the_structs() -> None:
    schemas = build_spec()["components"]["schemas"]
    checked = 0
    for name, schema in schemas.items():
        struct = getattr(api, name, None)
        if isinstance(struct, type) and issubclass(struct, enum.Enum):
            assert schema["enum"] == [member.value for member in struct], name
        elif isinstance(struct, type) and issubclass(struct, msgspec.Struct):
            fields = set(struct.__struct_fields__)
            assert set(schema.get("properties", {})) - NEVER_SENT.get(name, set()) == fields, name
            spec_required = set(schema.get("required", []))
            if name.endswith("Request"):  # decoded: the same fields must be required
                required = {f.name for f in msgspec.structs.fields(struct) if f.required}
                assert spec_required == required, name
            else:  # encoded: what the spec requires is always sent
                sent = {
                    f.name for f in msgspec.structs.fields(struct) if f.default is not msgspec.UNSET
                }
                assert spec_required <= sent, name
        else:
            continue
        checked += 1
    assert checked >= 15


def test_spec_is_public_in_both_forms(gw: GatewayHandle) -> None:
    import httpx

    as_yaml = httpx.get(f"{gw.base_url}/spec.yaml")
    as_json = httpx.get(f"{gw.base_url}/spec.json")
    assert as_yaml.headers["content-type"] == "application/vnd.oai.openapi"
    assert as_json.headers["content-type"] == "application/json"
    assert yaml.safe_load(as_yaml.text) == as_json.json() == build_spec()


def test_metrics_count_requests_by_route_template(gw: GatewayHandle) -> None:
    import httpx

    with gw.client() as client:
        client.get("/instances/some-id")
        client.get("/instances/other-id")
    text = httpx.get(f"{gw.base_url}/metrics").text
    assert (
        'vmfleet_gateway_requests_total{method="GET",route="/instances/{id}",status="404"}' in text
    )
    assert 'vmfleet_gateway_request_seconds_count{method="GET",route="/instances/{id}"}' in text
