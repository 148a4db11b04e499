"""The host's images: registry access, the shared OCI layout, disk building, and the cache
that orchestrates them; plus the pulls the fleet asks for.

Modules: ``registry`` (skopeo, platform digests, registry errors), ``layout`` (the shared
OCI layout's index, tags and garbage collection), ``disk`` (unpack, ``mkfs.ext4``, the
metadata that marks a disk ready), ``cache`` (``ImageCache``: one pull per digest, delete),
``pulls`` (``ImagePuller``: a ``PullImage`` command and the image's record in NATS),
``base`` (what they share).
"""

from worker.images.base import Runner, Timeouts
from worker.images.cache import ImageCache, StatusCallback
from worker.images.disk import ImageInfo
from worker.images.pulls import ImagePuller
from worker.images.registry import RegistryUnavailable, host_arch, uses_plain_http
from worker.run import CommandFailed, run_command

__all__ = [
    "CommandFailed",
    "ImageCache",
    "ImageInfo",
    "ImagePuller",
    "RegistryUnavailable",
    "Runner",
    "StatusCallback",
    "Timeouts",
    "host_arch",
    "run_command",
    "uses_plain_http",
]
