"""Schemathesis against the served description: generated requests, valid and invalid,
never get a 5xx for what they send, and every error is hypeman's JSON shape.

The gateway here has a fleet with no host, so a request that passes every check ends in
503 ``no_capacity`` / ``host_unavailable``: those are the fleet's answers, not failures.
``/events`` is left out (a stream that, by design, does not end).
"""

from __future__ import annotations

from typing import Any

import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis import GenerationMode

from gateway.openapi import build_spec
from tests.support.gateway import GatewayHandle


@schemathesis.serializer("application/gzip")
def _gzip(ctx: Any, value: Any) -> dict[str, Any]:
    """Archives: whatever bytes the generator made (usually not gzip at all)."""
    return {"data": value if isinstance(value, bytes) else str(value).encode()}


SCHEMA = schemathesis.openapi.from_dict(build_spec())
SCHEMA.config.generation.update(modes=[GenerationMode.POSITIVE, GenerationMode.NEGATIVE])

#: 5xx answers that describe the fleet, not the request.
FLEET_ANSWERS = {(503, "no_capacity"), (503, "host_unavailable")}


@SCHEMA.exclude(path="/events").parametrize()
@settings(
    max_examples=25,
    deadline=None,
    suppress_health_check=list(HealthCheck),
    derandomize=True,
)
def test_no_server_errors_for_any_input(case: Any, shared_gw: GatewayHandle) -> None:
    response = case.call(base_url=shared_gw.base_url, headers=shared_gw.headers, timeout=15)
    if response.status_code >= 400 and not case.path.startswith(("/spec", "/metrics")):
        body = response.json()
        assert set(body) == {"code", "message"}, body
        assert (
            response.status_code < 500 or (response.status_code, body["code"]) in FLEET_ANSWERS
        ), (
            case.method,
            case.formatted_path,
            response.status_code,
            body,
        )
