"""Follow a vmfleet fleet's state transitions and one instance's app log from NATS."""

import asyncio
import sys

import nats
from nats.js.api import DeliverPolicy

from schemas.codec import decode_log_line, decode_state_event
from schemas.subjects import Subjects


async def main(url: str, instance: str, count: int, prefix: str) -> None:
    nc = await nats.connect(url)
    js, s = nc.jetstream(), Subjects(prefix)
    states = await js.subscribe(
        s.state_filter(), deliver_policy=DeliverPolicy.ALL, ordered_consumer=True
    )
    logs = await js.subscribe(
        s.logs(instance, "app"), deliver_policy=DeliverPolicy.ALL, ordered_consumer=True
    )
    for _ in range(count):
        e = decode_state_event((await states.next_msg(timeout=30)).data)
        print(f"{e.at:%H:%M:%S} {e.host}/{e.instance_id}: {e.previous} -> {e.state}")
    print("app:", decode_log_line((await logs.next_msg(timeout=30)).data).line)
    await nc.close()


asyncio.run(main(sys.argv[1], sys.argv[2], int(sys.argv[3]), (sys.argv[4:] or ["vmfleet"])[0]))
