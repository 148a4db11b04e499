"""Reading the logs and states streams: where to start, and an ordered consumer from there.

``tail=N`` means exactly the last N messages of one subject. Messages of one subject are
spread over the stream's sequence numbers, so the start is found by binary search on
"how many messages of this subject are at or after sequence x", which JetStream answers
exactly as the ``num_pending`` of a consumer created at x (one short-lived consumer per
step, about log2 of the subject's span, so ~20 steps for millions of messages). One
ordered consumer then delivers from that start: the backlog and every later line, in
order, with no gap and no repeat between them.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import anyio
from nats.js import JetStreamContext
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy
from nats.js.errors import NotFoundError

__all__ = [
    "PushSubscription",
    "StartPoint",
    "close_quietly",
    "find_tail_start",
    "open_ordered",
    "start_after",
]

_PROBE_INACTIVE_S = 10.0

PushSubscription = JetStreamContext.PushSubscription


@dataclass(frozen=True)
class StartPoint:
    """Where a reader starts, and how many messages were there from that point on."""

    policy: DeliverPolicy
    seq: int | None = None
    backlog: int = 0


async def find_tail_start(js: JetStreamContext, stream: str, subject: str, tail: int) -> StartPoint:
    """The start that delivers exactly the last ``tail`` messages of ``subject`` first."""
    if tail <= 0:
        return StartPoint(DeliverPolicy.NEW)
    info = await js.stream_info(stream, subjects_filter=subject)
    count = (info.state.subjects or {}).get(subject, 0)
    if count <= tail:
        return StartPoint(DeliverPolicy.ALL, backlog=count)
    try:
        first = await js.get_msg(
            stream, seq=max(info.state.first_seq, 1), subject=subject, next=True
        )
        last = await js.get_last_msg(stream, subject)
    except NotFoundError:  # aged out meanwhile: start over with what is there now
        return StartPoint(DeliverPolicy.ALL, backlog=count)
    low, high = first.seq or 1, last.seq or 1
    # The largest x with pending(x) >= tail is the sequence of the tail-th last message.
    while low < high:
        middle = (low + high + 1) // 2
        if await _pending_from(js, stream, subject, middle) >= tail:
            low = middle
        else:
            high = middle - 1
    return StartPoint(DeliverPolicy.BY_START_SEQUENCE, seq=low, backlog=tail)


def start_after(last_seen: int | None) -> StartPoint:
    """Resume after the stream sequence a client saw last (``Last-Event-ID``), or only
    new messages when it saw none."""
    if last_seen is None:
        return StartPoint(DeliverPolicy.NEW)
    return StartPoint(DeliverPolicy.BY_START_SEQUENCE, seq=last_seen + 1)


async def open_ordered(
    js: JetStreamContext, stream: str, subject: str, start: StartPoint
) -> PushSubscription:
    """An ordered push consumer on ``subject`` from ``start`` (unsubscribe when done)."""
    config = ConsumerConfig(deliver_policy=start.policy, opt_start_seq=start.seq)
    return await js.subscribe(
        subject, stream=stream, ordered_consumer=True, config=config, inactive_threshold=30
    )


async def close_quietly(subscription: PushSubscription) -> None:
    """Unsubscribe, shielded and ignoring a connection that is already gone."""
    with anyio.CancelScope(shield=True), contextlib.suppress(Exception):
        await subscription.unsubscribe()


async def _pending_from(js: JetStreamContext, stream: str, subject: str, seq: int) -> int:
    """How many messages of ``subject`` the stream holds at sequence ``seq`` or later."""
    info = await js.add_consumer(
        stream,
        ConsumerConfig(
            filter_subject=subject,
            deliver_policy=DeliverPolicy.BY_START_SEQUENCE,
            opt_start_seq=seq,
            ack_policy=AckPolicy.EXPLICIT,
            inactive_threshold=_PROBE_INACTIVE_S,
            mem_storage=True,
            num_replicas=1,
        ),
    )
    with anyio.CancelScope(shield=True), contextlib.suppress(Exception):
        await js.delete_consumer(stream, info.name)
    return info.num_pending or 0
