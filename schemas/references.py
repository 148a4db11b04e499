"""Image references, normalised the way Docker's distribution/reference does it.

Both sides need the rule: the gateway to key and show an image by its normalised name
(``alpine`` → ``docker.io/library/alpine:latest``), the worker to pull it.
"""

from __future__ import annotations

import re

import msgspec

from schemas.errors import BadRequest

__all__ = ["ImageRef", "normalize_reference"]

_NAME_MAX = 255  # distribution/reference's NameTotalLengthMax
_DIGEST = re.compile(r"sha256:[0-9a-f]{64}")
_PATH_COMPONENT = re.compile(r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*")
_TAG = re.compile(r"[\w][\w.-]{0,127}")
_DOMAIN = re.compile(
    r"(?:(?:[a-zA-Z0-9]|[a-zA-Z0-9][a-zA-Z0-9-]*[a-zA-Z0-9])"
    r"(?:\.(?:[a-zA-Z0-9]|[a-zA-Z0-9][a-zA-Z0-9-]*[a-zA-Z0-9]))*"
    r"|\[[0-9a-fA-F:.]+\])(?::[0-9]+)?"
)
_HEX64 = re.compile(r"[0-9a-f]{64}")


class ImageRef(msgspec.Struct, frozen=True):
    """A normalised reference: registry, repository, and a tag, a digest, or both."""

    registry: str
    repository: str
    tag: str | None = None
    digest: str | None = None

    @property
    def name(self) -> str:
        """``docker.io/library/alpine:latest``, ``…@sha256:…`` or ``…:tag@sha256:…``."""
        name = f"{self.registry}/{self.repository}"
        if self.tag is not None:
            name += f":{self.tag}"
        if self.digest is not None:
            name += f"@{self.digest}"
        return name

    def at(self, digest: str) -> str:
        """The skopeo source for one manifest of this repository."""
        return f"docker://{self.registry}/{self.repository}@{digest}"

    @property
    def source(self) -> str:
        """The skopeo source for this reference as given."""
        if self.digest is not None:
            return self.at(self.digest)
        return f"docker://{self.registry}/{self.repository}:{self.tag}"


def _invalid(reference: str, why: str) -> BadRequest:
    return BadRequest(f"invalid image name: {reference!r}: {why}", code="invalid_name")


def normalize_reference(reference: str) -> ImageRef:
    """Parse a reference the way Docker's distribution/reference does.

    ``alpine`` → ``docker.io/library/alpine:latest``; ``user/app`` → ``docker.io/user/app``;
    a first component with a dot or a colon, or ``localhost``, is a registry. Raises
    ``BadRequest(code="invalid_name")`` for anything Docker would reject.
    """
    if not reference or len(reference) > 2 * _NAME_MAX or reference != reference.strip():
        raise _invalid(reference, "empty, too long or padded with spaces")
    rest, digest = _split_digest(reference)
    rest, tag = _split_tag(rest)
    registry, repository = _split_registry(rest)
    _check_repository(reference, registry, repository)
    if digest is not None and not _DIGEST.fullmatch(digest):
        raise _invalid(reference, "digest must be sha256: and 64 lowercase hex digits")
    if tag is not None and not _TAG.fullmatch(tag):
        raise _invalid(reference, f"bad tag {tag!r}")
    if tag is None and digest is None:
        tag = "latest"
    return ImageRef(registry=registry, repository=repository, tag=tag, digest=digest)


def _split_digest(reference: str) -> tuple[str, str | None]:
    name, at, digest = reference.partition("@")
    return (name, digest) if at else (name, None)


def _split_tag(name: str) -> tuple[str, str | None]:
    slash = name.rfind("/")
    colon = name.rfind(":")
    if colon > slash:
        return name[:colon], name[colon + 1 :]
    return name, None


def _split_registry(name: str) -> tuple[str, str]:
    first, slash, remainder = name.partition("/")
    is_domain = "." in first or ":" in first or first == "localhost" or first != first.lower()
    if not slash or not is_domain:
        first, remainder = "docker.io", name
    if first == "index.docker.io":
        first = "docker.io"
    if first == "docker.io" and "/" not in remainder:
        remainder = f"library/{remainder}"
    return first, remainder


def _check_repository(reference: str, registry: str, repository: str) -> None:
    if not _DOMAIN.fullmatch(registry):
        raise _invalid(reference, f"bad registry {registry!r}")
    if repository != repository.lower():
        raise _invalid(reference, f"repository name {repository!r} must be lowercase")
    if not all(_PATH_COMPONENT.fullmatch(part) for part in repository.split("/")):
        raise _invalid(reference, f"bad repository {repository!r}")
    if _HEX64.fullmatch(repository.removeprefix("library/")):
        raise _invalid(reference, "a 64-character hex string is an image id, not a name")
    if len(registry) + 1 + len(repository) > _NAME_MAX:
        raise _invalid(reference, f"name longer than {_NAME_MAX} characters")
