"""Moving directories of files between hosts through the NATS JetStream object store.

A snapshot taken on one host and forked on another, or a Standby instance moved off a
drained host, travels as a *bundle*: its files cut into checksummed parts, a manifest
last (``schemas.transfers``). ``upload_bundle`` puts a directory in; ``HostCache`` fetches
it on another host (once per bundle per host, resumable, verified file by file before it
is renamed into place) and keeps it under a disk budget; ``delete_bundle`` removes it from
the store when nothing will fetch it again. docs/hosts.md has the operator's view.
"""

from worker.transfer.cache import HostCache
from worker.transfer.errors import BundleNotFound, CorruptTransfer
from worker.transfer.fetch import FetchStats, fetch_into
from worker.transfer.store import delete_bundle, open_store
from worker.transfer.upload import UploadStats, read_manifest, upload_bundle

__all__ = [
    "BundleNotFound",
    "CorruptTransfer",
    "FetchStats",
    "HostCache",
    "UploadStats",
    "delete_bundle",
    "fetch_into",
    "open_store",
    "read_manifest",
    "upload_bundle",
]
