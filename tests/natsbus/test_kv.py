"""A bucket's listing holds every key that has a value, and only those."""

from __future__ import annotations

from collections.abc import AsyncIterator

import nats
import pytest
from nats.js import JetStreamContext
from nats.js.errors import NoKeysError
from nats.js.kv import KeyValue

from natsbus import live_entries

pytestmark = pytest.mark.anyio


@pytest.fixture
async def js(nats_url: str) -> AsyncIterator[JetStreamContext]:
    nc = await nats.connect(nats_url)
    try:
        yield nc.jetstream()
    finally:
        await nc.close()


async def _bucket(js: JetStreamContext, name: str) -> KeyValue:
    kv = await js.create_key_value(bucket=name)
    await kv.put("kept", b"1")
    await kv.put("changed", b"old")
    await kv.put("changed", b"new")
    await kv.put("deleted", b"x")
    await kv.delete("deleted")
    await kv.put("purged", b"x")
    await kv.purge("purged")
    return kv


async def test_live_keys_come_with_their_current_values(js: JetStreamContext) -> None:
    await _bucket(js, "kvlist_live")
    entries = await live_entries(js, "kvlist_live")
    assert sorted(entries) == [("changed", b"new"), ("kept", b"1")]


async def test_a_bucket_never_written_lists_nothing(js: JetStreamContext) -> None:
    await js.create_key_value(bucket="kvlist_empty")
    assert await live_entries(js, "kvlist_empty") == []


async def test_a_bucket_of_deleted_keys_lists_nothing(js: JetStreamContext) -> None:
    kv = await js.create_key_value(bucket="kvlist_gone")
    await kv.put("a", b"1")
    await kv.delete("a")
    assert await live_entries(js, "kvlist_gone") == []


async def test_a_listing_that_wrongly_says_no_keys_is_checked_against_the_stream(
    js: JetStreamContext, monkeypatch: pytest.MonkeyPatch
) -> None:
    """nats-py's keys() can end before the entries already delivered to it (its watcher's
    marker races them) and report an empty bucket; that answer stands in for the race here."""
    await _bucket(js, "kvlist_race")

    async def no_keys(self: KeyValue, *args: object, **kwargs: object) -> list[str]:
        raise NoKeysError

    monkeypatch.setattr(KeyValue, "keys", no_keys)
    entries = await live_entries(js, "kvlist_race")
    assert sorted(entries) == [("changed", b"new"), ("kept", b"1")]
