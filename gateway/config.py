"""What a gateway needs to know, built once by the caller and passed in."""

from __future__ import annotations

from dataclasses import dataclass, field

from natsbus import BusOptions, Layout

__all__ = ["GatewayConfig"]


@dataclass(frozen=True)
class GatewayConfig:
    bus: BusOptions
    jwt_secret: str
    subject_prefix: str = "vmfleet"
    layout: Layout = field(default_factory=Layout)
    #: Largest JSON request body accepted; larger ones get 413 before they are read whole.
    max_json_body_bytes: int = 1 << 20
