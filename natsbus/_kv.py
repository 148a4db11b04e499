"""Reading a whole KV bucket.

nats-py's ``KeyValue.keys()`` lists a bucket with a watcher, and that watcher can put its
"nothing more" marker before the entries the server has already delivered to it
(nats-io/nats.py#842): a bucket that holds keys is then reported as holding none. A list
that comes back empty is therefore asked again of the bucket's stream, which answers from
its own state in one request.
"""

from __future__ import annotations

import contextlib

from nats.js import JetStreamContext
from nats.js.errors import KeyDeletedError, KeyNotFoundError, NoKeysError
from nats.js.kv import KeyValue

from natsbus._connect import kv_subject


async def live_entries(js: JetStreamContext, bucket: str) -> list[tuple[str, bytes]]:
    """Every key of ``bucket`` that holds a value now, with that value.

    Keys deleted or purged, including those deleted while this reads, are left out.
    """
    kv = await js.key_value(bucket)
    entries = []
    for key in await _keys(js, bucket, kv):
        with contextlib.suppress(KeyNotFoundError, KeyDeletedError):
            entry = await kv.get(key)
            if entry.value:
                entries.append((key, entry.value))
    return entries


async def _keys(js: JetStreamContext, bucket: str, kv: KeyValue) -> list[str]:
    try:
        return await kv.keys()
    except NoKeysError:
        return await _subjects_of_stream(js, bucket)


async def _subjects_of_stream(js: JetStreamContext, bucket: str) -> list[str]:
    """The keys the bucket's stream holds a message for; a deleted key's marker counts.

    The server answers with up to 100,000 subjects in one reply (nats-py asks for no further
    pages): far more than a fleet's buckets hold, and this is only the fallback of a race.
    """
    prefix = kv_subject(bucket, "")
    info = await js.stream_info(f"KV_{bucket}", subjects_filter=f"{prefix}>")
    return [subject.removeprefix(prefix) for subject in info.state.subjects or {}]
