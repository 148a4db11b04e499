"""``cli.client`` against httpx's MockTransport: settings, the one error type and its
exit codes, and Server-Sent Events."""

from __future__ import annotations

import httpx
import pytest

from cli.client import (
    EXIT_REFUSED,
    EXIT_UNREACHABLE,
    ClientConfig,
    GatewayClient,
    GatewayError,
    SseEvent,
    iter_sse,
    segment,
)
from cli.settings import ConfigError

CONFIG = ClientConfig(base_url="http://gw.test", api_key="token-1")


def _client(handler: httpx.MockTransport) -> GatewayClient:
    return GatewayClient(CONFIG, transport=handler)


def test_config_from_env() -> None:
    config = ClientConfig.from_env(
        {"HYPEMAN_BASE_URL": "http://10.0.0.1:8080/", "HYPEMAN_API_KEY": "k"}
    )
    assert config == ClientConfig(base_url="http://10.0.0.1:8080", api_key="k")
    assert ClientConfig.from_env({"HYPEMAN_API_KEY": "k"}).base_url == "http://127.0.0.1:8080"


@pytest.mark.parametrize(
    ("env", "variable"),
    [
        ({}, "HYPEMAN_API_KEY"),
        ({"HYPEMAN_API_KEY": " "}, "HYPEMAN_API_KEY"),
        ({"HYPEMAN_API_KEY": "k", "HYPEMAN_BASE_URL": "127.0.0.1:8080"}, "HYPEMAN_BASE_URL"),
    ],
)
def test_unusable_settings_name_the_variable(env: dict[str, str], variable: str) -> None:
    with pytest.raises(ConfigError, match=variable):
        ClientConfig.from_env(env)


def test_calls_carry_the_token_and_decode_json() -> None:
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        if request.method == "DELETE":
            return httpx.Response(204)
        return httpx.Response(200, json=[{"id": "a"}])

    with _client(httpx.MockTransport(handler)) as client:
        assert client.call("GET", "/instances", params={"state": "Running"}) == [{"id": "a"}]
        assert client.call("DELETE", "/instances/a") is None
    assert seen[0].headers["authorization"] == "Bearer token-1"
    assert str(seen[0].url) == "http://gw.test/instances?state=Running"


def test_a_refusal_keeps_the_gateways_code_and_message() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(409, json={"code": "invalid_state", "message": "is Stopped"})

    with _client(httpx.MockTransport(handler)) as client, pytest.raises(GatewayError) as err:
        client.call("POST", "/instances/a/stop", what="instance a")
    assert (str(err.value), err.value.status, err.value.exit_code) == (
        "invalid_state: is Stopped",
        409,
        EXIT_REFUSED,
    )


def test_a_generic_not_found_names_what_was_asked_for() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(404, json={"code": "not_found", "message": "resource not found"})

    with _client(httpx.MockTransport(handler)) as client:
        with pytest.raises(GatewayError, match=r"^not_found: instance nope not found$"):
            client.call("GET", "/instances/nope", what="instance nope")
        with pytest.raises(GatewayError, match=r"^not_found: resource not found$"):
            client.call("GET", "/instances/nope")


def test_a_body_that_is_not_an_error_object_gives_the_status() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(502, text="<html>bad gateway</html>")

    with _client(httpx.MockTransport(handler)) as client, pytest.raises(GatewayError) as err:
        client.call("GET", "/hosts")
    assert (err.value.code, err.value.message, err.value.exit_code) == (
        "502",
        "Bad Gateway",
        EXIT_REFUSED,
    )


def test_refused_credentials_exit_3() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        body = {"code": "Unauthorized", "message": "security requirements failed: invalid token"}
        return httpx.Response(401, json=body)

    with _client(httpx.MockTransport(handler)) as client, pytest.raises(GatewayError) as err:
        client.call("GET", "/instances")
    assert err.value.exit_code == EXIT_UNREACHABLE
    assert str(err.value) == "Unauthorized: security requirements failed: invalid token"


def test_an_unreachable_gateway_exits_3() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("[Errno 111] Connection refused", request=request)

    with _client(httpx.MockTransport(handler)) as client, pytest.raises(GatewayError) as err:
        client.call("GET", "/instances")
    assert err.value.exit_code == EXIT_UNREACHABLE
    assert str(err.value) == (
        "unreachable: cannot reach the gateway at http://gw.test: [Errno 111] Connection refused"
    )


def test_sse_events_ids_comments_and_multiline_data() -> None:
    lines = ["id: 7", 'data: "one"', "", ": keep-alive", "", "data: a", "data:b", "", "data: c"]
    assert list(iter_sse(lines)) == [
        SseEvent('"one"', "7"),
        SseEvent("a\nb"),
        SseEvent("c"),
    ]


def test_a_stream_relays_events_and_its_errors() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        if request.url.path == "/instances/nope/logs":
            return httpx.Response(404, json={"code": "not_found", "message": "resource not found"})
        return httpx.Response(200, content=b'data: "hello"\n\n: keep-alive\n\ndata: "bye"\n\n')

    with _client(httpx.MockTransport(handler)) as client:
        with client.events("/instances/web/logs") as events:
            assert [e.data for e in events] == ['"hello"', '"bye"']
        with (
            pytest.raises(GatewayError, match="instance nope not found"),
            client.events("/instances/nope/logs", what="instance nope"),
        ):
            pass


def test_image_names_are_one_path_segment() -> None:
    assert segment("docker.io/library/busybox:latest") == "docker.io%2Flibrary%2Fbusybox%3Alatest"
