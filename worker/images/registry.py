"""Registry access: ``skopeo`` asks a registry for a manifest and copies an image's blobs.

A reference resolves to the digest of the manifest for this host's platform (an index or
Docker manifest list is resolved to its ``os``/``architecture`` entry). Loopback registries
and those the operator lists as insecure are spoken to without TLS verification.

skopeo's failures become the errors a client sees: ``not_found`` for an unknown repository
or tag (or a registry that denies access), ``insufficient_storage`` for a full disk here,
``registry_unavailable`` (retryable) for everything else.
"""

from __future__ import annotations

import hashlib
import ipaddress
import platform
import re
from pathlib import Path
from typing import Any, Final

import msgspec

from schemas.errors import BadRequest, InsufficientStorage, NotFound, VmfleetError
from schemas.references import ImageRef
from worker.images.base import DIGEST, Runner, Timeouts, digest_hex
from worker.run import CommandFailed, tail
from worker.storage import disk_full

__all__ = ["Registry", "RegistryUnavailable", "host_arch", "registry_error", "uses_plain_http"]

_INDEX_TYPES: Final = frozenset(
    {
        "application/vnd.oci.image.index.v1+json",
        "application/vnd.docker.distribution.manifest.list.v2+json",
    }
)
# What skopeo prints when the registry answered but has no such repository or tag (a
# status code "404" only as a word of its own: skopeo's messages hold paths and temp names).
_NOT_FOUND_MARKERS: Final = ("manifest unknown", "name unknown", "not found")
_NOT_FOUND_STATUS: Final = re.compile(r"\b404\b")
# What skopeo prints when this host, not the registry, failed it.
_DENIED_MARKERS: Final = ("denied", "unauthorized", "authentication required")


class RegistryUnavailable(VmfleetError):
    """The registry could not be reached or did not answer properly (retrying may help)."""

    status = 502
    code = "registry_unavailable"
    retryable = True


class Registry:
    """skopeo, pinned to one platform and one set of insecure registries."""

    def __init__(
        self,
        insecure_registries: frozenset[str],
        *,
        os_name: str,
        arch: str,
        timeouts: Timeouts,
        runner: Runner,
    ) -> None:
        self.insecure_registries = insecure_registries
        self.os_name = os_name
        self.arch = arch
        self._timeouts = timeouts
        self._run = runner

    async def platform_digest(self, ref: ImageRef) -> str:
        """The digest of the manifest this host would run."""
        raw = await self._skopeo(ref, "inspect", "--raw", *self._tls(ref, "--tls-verify"))
        return self._digest_for_platform(ref, raw)

    async def copy(self, ref: ImageRef, digest: str, layout: Path) -> None:
        """The manifest ``digest`` and its blobs into the OCI layout at ``layout``, tagged
        by the digest's hex."""
        tls = self._tls(ref, "--src-tls-verify")
        destination = f"oci:{layout}:{digest_hex(digest)}"
        await self._skopeo(ref, "copy", "--quiet", *tls, ref.at(digest), destination)

    async def _skopeo(self, ref: ImageRef, *args: str) -> bytes:
        timeout = self._timeouts.resolve_s if args[0] == "inspect" else self._timeouts.copy_s
        platform_flags = ("--override-os", self.os_name, "--override-arch", self.arch)
        source = () if args[0] == "copy" else (ref.source,)
        try:
            return await self._run(["skopeo", *platform_flags, *args, *source], timeout)
        except CommandFailed as exc:
            raise registry_error(ref, exc) from exc

    def _tls(self, ref: ImageRef, flag: str) -> list[str]:
        verify = not uses_plain_http(ref.registry, self.insecure_registries)
        return [f"{flag}={str(verify).lower()}"]

    def _digest_for_platform(self, ref: ImageRef, raw: bytes) -> str:
        try:
            manifest = msgspec.json.decode(raw)
        except msgspec.DecodeError:
            raise RegistryUnavailable(
                f"registry sent an unreadable manifest for {ref.name}"
            ) from None
        if not _is_index(manifest):
            return f"sha256:{hashlib.sha256(raw).hexdigest()}"
        for entry in manifest.get("manifests") or []:
            found = entry.get("platform") or {}
            if found.get("os") == self.os_name and found.get("architecture") == self.arch:
                return _checked_digest(ref, entry.get("digest"))
        raise BadRequest(
            f"image {ref.name} has no {self.os_name}/{self.arch} manifest",
            code="unsupported_platform",
        )


def uses_plain_http(registry: str, insecure_registries: frozenset[str] = frozenset()) -> bool:
    """Loopback registries, and those the operator lists as insecure, skip TLS verification."""
    host = _registry_host(registry)
    return _is_loopback(host) or registry in insecure_registries or host in insecure_registries


def host_arch() -> str:
    """This machine's architecture in OCI terms (``amd64``, ``arm64``, …)."""
    machine = platform.machine().lower()
    return {"x86_64": "amd64", "aarch64": "arm64", "armv7l": "arm"}.get(machine, machine)


def registry_error(ref: ImageRef, failure: CommandFailed) -> VmfleetError:
    """What a failed skopeo call means to the client."""
    if failure.timed_out:
        return RegistryUnavailable(
            f"registry {ref.registry} did not answer for {ref.name}: {failure.stderr}"
        )
    reason = _skopeo_reason(failure.stderr)
    if disk_full(reason):
        return InsufficientStorage(f"pulling {ref.name} failed on this host: {reason}")
    # The registry's own address must not pass for a 404 (think of port 40404).
    text = reason.replace(ref.registry, "<registry>").lower()
    if any(marker in text for marker in _NOT_FOUND_MARKERS) or _NOT_FOUND_STATUS.search(text):
        return NotFound("image not found")
    if any(marker in text for marker in _DENIED_MARKERS):
        return NotFound(f"image not found: {ref.registry} denied access to {ref.repository}")
    return RegistryUnavailable(f"registry {ref.registry} unavailable for {ref.name}: {reason}")


def _registry_host(registry: str) -> str:
    if registry.startswith("["):
        return registry[1 : registry.index("]")]
    return registry.partition(":")[0]


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _checked_digest(ref: ImageRef, digest: Any) -> str:
    if not isinstance(digest, str) or not DIGEST.fullmatch(digest):
        raise RegistryUnavailable(f"registry sent an index with a bad digest for {ref.name}")
    return digest


def _is_index(manifest: Any) -> bool:
    """An OCI index or Docker manifest list (OCI allows the index to omit ``mediaType``)."""
    if not isinstance(manifest, dict):
        return False
    media_type = manifest.get("mediaType")
    return media_type in _INDEX_TYPES or (media_type is None and "manifests" in manifest)


def _skopeo_reason(stderr: str) -> str:
    """The message inside skopeo's ``level=fatal msg="…"`` line, or the stderr tail."""
    found = re.search(r'msg="((?:[^"\\]|\\.)*)"', stderr)
    if found is None:
        return tail(stderr)
    message = found.group(1).replace('\\"', '"')
    return re.sub(r'^Error parsing image name "[^"]*": ', "", message)
