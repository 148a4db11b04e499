"""The stateless HTTP gateway: hypeman's API over vmfleet's NATS layout."""

from gateway.app import create_app
from gateway.config import GatewayConfig

__all__ = ["GatewayConfig", "create_app"]
