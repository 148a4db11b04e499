"""The one JSON Encoder and one Decoder per message type, built once at import.

Why: msgspec encoders/decoders are cheap to reuse and costly to rebuild (msgspec perf tips),
and keeping every parse in one module means there is one place that decides how bytes become
typed values (style anchor 6). JSON, not msgpack, on NATS too: payloads stay readable with
``nats sub`` and in stream dumps.

Every ``decode_*`` raises ``msgspec.ValidationError`` (wrong type, failed constraint, unknown
command op; the message names the JSON path, e.g. ``... - at `$.name```) or its base
``msgspec.DecodeError`` (not JSON). Callers map those at their boundary: the gateway to a 400,
the worker to a terminal nak.
"""

from __future__ import annotations

from typing import Any, Final

import msgspec

from schemas import api
from schemas.messages import (
    AnyCommand,
    CommandResult,
    DrainRecord,
    HostRecord,
    ImageRecord,
    InstanceRecord,
    LogLine,
    NameClaim,
    StateEvent,
    VolumeRecord,
)

__all__ = [
    "decode_attach_volume_request",
    "decode_command",
    "decode_command_result",
    "decode_create_image_request",
    "decode_create_instance_request",
    "decode_create_volume_request",
    "decode_drain_record",
    "decode_drain_request",
    "decode_error",
    "decode_host_record",
    "decode_image",
    "decode_image_record",
    "decode_images",
    "decode_instance",
    "decode_instance_record",
    "decode_instances",
    "decode_log_line",
    "decode_name_claim",
    "decode_start_instance_request",
    "decode_state_event",
    "decode_volume",
    "decode_volume_record",
    "decode_volumes",
    "encode",
]

_ENCODER: Final = msgspec.json.Encoder()

# NATS payloads
_COMMAND: Final[msgspec.json.Decoder[AnyCommand]] = msgspec.json.Decoder(AnyCommand)
_COMMAND_RESULT: Final = msgspec.json.Decoder(CommandResult)
_STATE_EVENT: Final = msgspec.json.Decoder(StateEvent)
_LOG_LINE: Final = msgspec.json.Decoder(LogLine)
_HOST_RECORD: Final = msgspec.json.Decoder(HostRecord)
_DRAIN_RECORD: Final = msgspec.json.Decoder(DrainRecord)
_NAME_CLAIM: Final = msgspec.json.Decoder(NameClaim)
_INSTANCE_RECORD: Final = msgspec.json.Decoder(InstanceRecord)
_VOLUME_RECORD: Final = msgspec.json.Decoder(VolumeRecord)
_IMAGE_RECORD: Final = msgspec.json.Decoder(ImageRecord)

# HTTP request bodies (gateway)
_CREATE_INSTANCE: Final = msgspec.json.Decoder(api.CreateInstanceRequest)
_CREATE_VOLUME: Final = msgspec.json.Decoder(api.CreateVolumeRequest)
_ATTACH_VOLUME: Final = msgspec.json.Decoder(api.AttachVolumeRequest)
_CREATE_IMAGE: Final = msgspec.json.Decoder(api.CreateImageRequest)
_START_INSTANCE: Final = msgspec.json.Decoder(api.StartInstanceRequest)
_DRAIN: Final = msgspec.json.Decoder(api.DrainRequest)

# HTTP responses (CLI, tests)
_INSTANCE: Final = msgspec.json.Decoder(api.Instance)
_INSTANCES: Final = msgspec.json.Decoder(list[api.Instance])
_IMAGE: Final = msgspec.json.Decoder(api.Image)
_IMAGES: Final = msgspec.json.Decoder(list[api.Image])
_VOLUME: Final = msgspec.json.Decoder(api.Volume)
_VOLUMES: Final = msgspec.json.Decoder(list[api.Volume])
_ERROR: Final = msgspec.json.Decoder(api.Error)


def encode(obj: Any) -> bytes:
    """JSON bytes of any Struct (or list/dict of Structs) in this package."""
    return _ENCODER.encode(obj)


def decode_command(data: bytes) -> AnyCommand:
    """A command, dispatched on its ``op`` tag; unknown fields are ignored."""
    return _COMMAND.decode(data)


def decode_command_result(data: bytes) -> CommandResult:
    return _COMMAND_RESULT.decode(data)


def decode_state_event(data: bytes) -> StateEvent:
    return _STATE_EVENT.decode(data)


def decode_log_line(data: bytes) -> LogLine:
    return _LOG_LINE.decode(data)


def decode_drain_record(data: bytes) -> DrainRecord:
    return _DRAIN_RECORD.decode(data)


def decode_name_claim(data: bytes) -> NameClaim:
    return _NAME_CLAIM.decode(data)


def decode_host_record(data: bytes) -> HostRecord:
    return _HOST_RECORD.decode(data)


def decode_instance_record(data: bytes) -> InstanceRecord:
    return _INSTANCE_RECORD.decode(data)


def decode_volume_record(data: bytes) -> VolumeRecord:
    return _VOLUME_RECORD.decode(data)


def decode_image_record(data: bytes) -> ImageRecord:
    return _IMAGE_RECORD.decode(data)


def decode_create_instance_request(data: bytes) -> api.CreateInstanceRequest:
    return _CREATE_INSTANCE.decode(data)


def decode_create_volume_request(data: bytes) -> api.CreateVolumeRequest:
    return _CREATE_VOLUME.decode(data)


def decode_attach_volume_request(data: bytes) -> api.AttachVolumeRequest:
    return _ATTACH_VOLUME.decode(data)


def decode_create_image_request(data: bytes) -> api.CreateImageRequest:
    return _CREATE_IMAGE.decode(data)


def decode_start_instance_request(data: bytes) -> api.StartInstanceRequest:
    return _START_INSTANCE.decode(data)


def decode_drain_request(data: bytes) -> api.DrainRequest:
    return _DRAIN.decode(data)


def decode_instance(data: bytes) -> api.Instance:
    return _INSTANCE.decode(data)


def decode_instances(data: bytes) -> list[api.Instance]:
    return _INSTANCES.decode(data)


def decode_image(data: bytes) -> api.Image:
    return _IMAGE.decode(data)


def decode_images(data: bytes) -> list[api.Image]:
    return _IMAGES.decode(data)


def decode_volume(data: bytes) -> api.Volume:
    return _VOLUME.decode(data)


def decode_volumes(data: bytes) -> list[api.Volume]:
    return _VOLUMES.decode(data)


def decode_error(data: bytes) -> api.Error:
    return _ERROR.decode(data)
