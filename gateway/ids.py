"""Identifiers the gateway mints: hypeman-shaped resource ids and command ids.

hypeman's ids are CUID2 strings (24 characters, ``^[a-z][0-9a-z]{23}$``); clients and
tests match on that shape, so vmfleet's ids have it too. They are also valid NATS subject
tokens and KV keys, which is where vmfleet uses them.

An instance created with an ``Idempotency-Key`` gets an id *derived* from the key, so a
retried create finds the instance its first attempt made, whichever gateway replica and
whichever host served it.
"""

from __future__ import annotations

import hashlib
import secrets
import string
from typing import Final

__all__ = ["ID_LENGTH", "derived_id", "new_id"]

ID_LENGTH: Final = 24
_FIRST: Final = string.ascii_lowercase
_REST: Final = string.digits + string.ascii_lowercase


def new_id() -> str:
    """A fresh random id: a letter, then 23 base-36 characters (about 119 bits)."""
    return _encoded(int.from_bytes(secrets.token_bytes(32), "big"))


def derived_id(namespace: str, key: str) -> str:
    """The id a given idempotency key always maps to, within ``namespace`` (e.g. "instance")."""
    return _encoded(int.from_bytes(hashlib.sha256(f"{namespace}\0{key}".encode()).digest(), "big"))


def _encoded(number: int) -> str:
    """256 random bits as an id (one draw, not one per character: ids are minted per create)."""
    first, number = _FIRST[number % 26], number // 26
    rest = []
    for _ in range(ID_LENGTH - 1):
        number, index = divmod(number, 36)
        rest.append(_REST[index])
    return first + "".join(rest)
