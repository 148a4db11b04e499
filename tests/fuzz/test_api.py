"""Schemathesis against the description the gateway serves (``GET /spec.json``).

Every generated request, valid (positive) or not (negative), alone or in a sequence:

* gets no 5xx but the fleet's own answers (503 ``no_capacity`` / ``host_unavailable``
  when no host can take it, and, on the fleet whose one host never answers a create, its
  504 ``host_unavailable``);
* when refused (4xx), gets hypeman's error body ``{"code", "message"}`` as JSON with the
  SDK's ``x-should-retry`` hint;
* creates nothing it was not answered for: after each call the fleet's instances,
  volumes, images and drains buckets and its archives store are read
  (``conftest.FleetRecords``). No host here makes instances or volumes, so those stay
  empty; every image record is a name a ``POST /images`` was answered 2xx for, every
  drain a host a ``POST /hosts/{id}/drain`` was, and an upload stays in the store only
  after a 504 (the queued command still needs it).

``/events`` is left out: a stream that, by design, does not end.

Stateful sequences follow the links schemathesis infers from the description (about
180: an image's ``name`` feeding ``/images/{name}``, a host's ``id`` feeding
``/hosts/{id}/drain``, a volume's ``id`` feeding ``volumes[].volume_id`` of a create...);
declaring them in ``gateway/openapi.py`` would add nothing. On the hostless fleet no
create succeeds, so there is nothing to chain: sequences run on the fleet with one fake
host, where ``POST /images`` makes records (its generated names are turned into
references the host pulls, see ``pullable``) and drains stick, and each sequence starts
from an empty fleet again.
"""

from __future__ import annotations

import re
from typing import Any, Final

import anyio
import httpx
import schemathesis
from hypothesis import HealthCheck, Phase, settings
from schemathesis import GenerationMode

from gateway import GatewayConfig, create_app
from natsbus import BusOptions
from tests.fuzz.conftest import FuzzFleet
from tests.support.gateway import SECRET

#: 5xx answers that describe the fleet, not the request.
FLEET_ANSWERS: Final = frozenset({(503, "no_capacity"), (503, "host_unavailable")})
#: The fake host leaves every command but a pull unanswered: the gateway's 504.
SILENT_HOST_ANSWERS: Final = FLEET_ANSWERS | {(504, "host_unavailable")}
#: Routes whose bodies are not the API's JSON (the description itself, Prometheus text,
#: and the readiness, whose 503 carries the same body as its 200 for load balancers).
_META: Final = ("/spec", "/metrics", "/ready")
#: Routes that put an upload in the archives store (a JSON ``POST /volumes`` puts none,
#: but nothing tells the two apart after the answer).
_UPLOADS: Final = frozenset({"/volumes", "/volumes/from-archive"})


@schemathesis.serializer("application/gzip")
def _gzip(ctx: Any, value: Any) -> dict[str, Any]:
    """Archives: whatever bytes the generator made (usually not gzip at all)."""
    return {"data": value if isinstance(value, bytes) else str(value).encode()}


def check_answer(
    fleet: FuzzFleet, case: Any, response: Any, allowed_5xx: frozenset[tuple[int, str]]
) -> None:
    label = (case.method, case.formatted_path, response.status_code)
    if response.status_code >= 400 and not case.path.startswith(_META):
        body = response.json()
        assert set(body) == {"code", "message"}, (label, body)
        assert isinstance(body["code"], str) and isinstance(body["message"], str), (label, body)
        assert response.headers.get("x-should-retry") in (["true"], ["false"]), label
        if response.status_code >= 500:
            assert (response.status_code, body["code"]) in allowed_5xx, (label, body)
    if 200 <= response.status_code < 300 and case.method == "POST":
        if case.path == "/images":
            fleet.accepted_images.add(response.json()["name"])
        elif case.path == "/hosts/{id}/drain":
            fleet.accepted_drains.add(response.json()["host"])
    if response.status_code == 504 and case.path in _UPLOADS:
        fleet.queued_uploads += 1
    check_records(fleet, label)


def check_records(fleet: FuzzFleet, after: object) -> None:
    """Nothing in the buckets that an accepted request did not ask for."""
    records = fleet.records.read()
    assert not records.instances, (after, records.instances)
    assert not records.volumes, (after, records.volumes)
    images = {record.name for record in records.images.values()}
    assert images <= fleet.accepted_images, (after, images - fleet.accepted_images)
    assert set(records.drains) <= fleet.accepted_drains, (after, records.drains)
    assert len(records.archives) <= fleet.queued_uploads, (after, records.archives)


def _served_description() -> dict[str, Any]:
    """``GET /spec.json`` of a gateway app (the route needs no NATS, so no lifespan)."""
    app = create_app(GatewayConfig(bus=BusOptions(urls=("nats://127.0.0.1:1",)), jwt_secret=SECRET))

    async def get() -> httpx.Response:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://gw") as client:
            return await client.get("/spec.json")

    response = anyio.run(get)
    assert response.status_code == 200
    description: dict[str, Any] = response.json()
    return description


DESCRIPTION: Final = _served_description()


def _schema() -> Any:
    schema = schemathesis.openapi.from_dict(DESCRIPTION)
    schema.config.generation.update(modes=[GenerationMode.POSITIVE, GenerationMode.NEGATIVE])
    return schema.exclude(path="/events")


SERVED: Final = _schema()


def test_the_fuzzed_description_is_the_one_served(hostless: FuzzFleet) -> None:
    with hostless.api.client() as client:
        assert client.get("/spec.json").json() == DESCRIPTION


@SERVED.parametrize()
@settings(
    max_examples=30,
    deadline=None,
    suppress_health_check=list(HealthCheck),
    derandomize=True,
)
def test_any_request_is_answered_cleanly_and_creates_nothing(
    case: Any, hostless: FuzzFleet
) -> None:
    response = case.call(base_url=hostless.api.base_url, headers=hostless.api.headers, timeout=15)
    check_answer(hostless, case, response, FLEET_ANSWERS)


def pullable(name: str) -> str:
    """A reference the fake host pulls, made from a generated name (letters and digits of
    it, under ``fuzz/``): random text is almost never a valid reference, and a sequence
    needs records to work on."""
    return "fuzz/" + (re.sub(r"[^a-z0-9]+", "", name.lower())[:24] or "x")


def test_sequences_on_a_fleet_with_one_host(one_fake_host: FuzzFleet) -> None:
    fleet = one_fake_host
    base = _schema().as_state_machine()

    class Sequences(base):  # type: ignore[misc, valid-type]
        def before_call(self, case: Any) -> None:
            body = case.body
            if (
                case.path == "/images"
                and isinstance(body, dict)
                and isinstance(body.get("name"), str)
            ):
                body["name"] = pullable(body["name"])

        def get_call_kwargs(self, case: Any) -> dict[str, Any]:
            return {"base_url": fleet.api.base_url, "headers": fleet.api.headers, "timeout": 15}

        def validate_response(self, response: Any, case: Any, *args: Any, **kwargs: Any) -> None:
            check_answer(fleet, case, response, SILENT_HOST_ANSWERS)

        def teardown(self) -> None:
            check_records(fleet, "at the end of a sequence")
            fleet.reset()

    Sequences.run(
        settings=settings(
            max_examples=30,
            stateful_step_count=10,
            deadline=None,
            derandomize=True,
            phases=[Phase.generate],
            suppress_health_check=list(HealthCheck),
        )
    )
