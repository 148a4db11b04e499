"""Instance names, unique fleet-wide: a create claims its name before it is placed.

The claim is a KV ``create`` on the name's key in the ``names`` bucket: of several gateways
creating the same name at once, exactly one succeeds; the others answer 400
``name_conflict`` (hypeman's status and code). The claim is released when the instance is deleted,
and when its create fails before any host took it.

A gateway that dies mid-create leaves a claim whose instance may never appear. Such a claim
does not hold the name forever: once ``grace_s`` has passed since it was made and no
instance record with its id exists, a later create takes it over (a KV ``update`` on the
revision it read, so two takers cannot both win). The grace covers a create that is still
on its way (the slowest create is a pull plus a boot, well within the command timeout).

Names of instances made before claims existed have no claim: the view's records are
checked too, so such a name is refused all the same.
"""

from __future__ import annotations

import contextlib
import logging
from datetime import UTC, datetime

import anyio
import nats.errors
from nats.js.errors import KeyNotFoundError, KeyWrongLastSequenceError
from nats.js.kv import KeyValue

from gateway.service import Gateway
from natsbus.backoff import Backoff
from schemas.codec import decode_name_claim, encode
from schemas.errors import BadRequest
from schemas.messages import NameClaim

__all__ = ["CLAIM_GRACE_S", "claim_name", "release_name", "release_name_after_delete"]

log = logging.getLogger(__name__)

#: How long a claim whose instance does not exist (yet) holds its name.
CLAIM_GRACE_S = 300.0


async def claim_name(
    gw: Gateway, name: str, instance_id: str, *, grace_s: float = CLAIM_GRACE_S
) -> int:
    """Claim ``name`` for ``instance_id``; the claim's revision. 400 ``name_conflict`` when
    another instance has it."""
    _refuse_if_recorded(gw, name, instance_id)
    kv = await _bucket(gw)
    claim = encode(NameClaim(instance_id=instance_id, claimed_at=datetime.now(UTC)))
    try:
        return int(await kv.create(name, claim))
    except KeyWrongLastSequenceError:
        pass
    try:
        entry = await kv.get(name)
    except KeyNotFoundError:  # released (or purged) in between: try once more
        return await _create_or_conflict(kv, name, claim)
    held = _decode(entry.value)
    if held is not None and held.instance_id == instance_id:
        return int(entry.revision or 0)  # a retried create (same Idempotency-Key)
    if held is not None and not _abandoned(gw, held, grace_s):
        raise _conflict(name)
    try:
        return int(await kv.update(name, claim, last=entry.revision))
    except KeyWrongLastSequenceError:
        raise _conflict(name) from None


async def release_name(gw: Gateway, name: str, instance_id: str) -> None:
    """Give ``name`` up if ``instance_id`` holds it (never another instance's claim)."""
    kv = await _bucket(gw)
    try:
        entry = await kv.get(name)
    except KeyNotFoundError:
        return
    held = _decode(entry.value)
    if held is None or held.instance_id != instance_id:
        return
    # Taken over meanwhile (a wrong last sequence): the name is someone else's now.
    with contextlib.suppress(KeyWrongLastSequenceError):
        await kv.delete(name, last=entry.revision)


async def release_name_after_delete(
    gw: Gateway, name: str, instance_id: str, *, patience_s: float = 10.0
) -> None:
    """Give ``name`` up once its instance is deleted. The delete has happened: NATS failing
    now (a cluster failing over) must not turn it into an error that a client retries into
    a 404. Retried for a while; if NATS stays away, the claim stays until a later create
    takes it over (no instance holds it, so after its grace)."""
    backoff = Backoff(first_s=0.2, max_s=2.0)
    with anyio.move_on_after(patience_s):
        while True:
            try:
                await release_name(gw, name, instance_id)
                return
            except nats.errors.Error as exc:  # JetStream's errors are among them
                log.info("releasing the name %r of deleted %s: %r; again", name, instance_id, exc)
                await backoff.sleep()
    log.warning(
        "the name %r of deleted instance %s stays claimed until a create takes it over",
        name,
        instance_id,
    )


def _refuse_if_recorded(gw: Gateway, name: str, instance_id: str) -> None:
    # The view's index by name: one lookup, not a pass over every record per create.
    if any(other != instance_id for other in gw.view.instance_ids_named(name)):
        raise _conflict(name)


def _abandoned(gw: Gateway, held: NameClaim, grace_s: float) -> bool:
    if held.instance_id in gw.view.instances:
        return False
    return (datetime.now(UTC) - held.claimed_at).total_seconds() > grace_s


async def _create_or_conflict(kv: KeyValue, name: str, claim: bytes) -> int:
    try:
        return int(await kv.create(name, claim))
    except KeyWrongLastSequenceError:
        raise _conflict(name) from None


def _decode(value: bytes | None) -> NameClaim | None:
    """None for a deleted key's tombstone."""
    return decode_name_claim(value) if value else None


def _conflict(name: str) -> BadRequest:
    return BadRequest(f"instance name {name!r} is already in use", code="name_conflict")


async def _bucket(gw: Gateway) -> KeyValue:
    return await gw.bucket(gw.subjects.names_bucket)
