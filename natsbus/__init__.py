"""The NATS side shared by gateway and worker: connecting, and the streams and buckets.

Subject and bucket *names* are wire facts and live in ``schemas.subjects``; this package
only knows how to reach a NATS cluster and how to create what those names refer to.
"""

from natsbus._connect import BusOptions, connect
from natsbus._provision import Layout, provision

__all__ = ["BusOptions", "Layout", "connect", "provision"]
