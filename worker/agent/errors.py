"""What the agent's host side raises."""

from __future__ import annotations

from schemas.errors import HypervisorError

__all__ = ["AgentProtocolError", "AgentSessionClosed", "AgentUnavailable", "ChannelLost"]


class AgentUnavailable(HypervisorError):
    """The instance has no live agent (not yet, or not any more); the message says why."""


class AgentSessionClosed(Exception):
    """A session ended without its clean end: the agent, its channel or the VM went away,
    or the agent refused the session. The message says why."""


class AgentProtocolError(Exception):
    """The other side broke the framing protocol (a frame too big, an unknown version)."""


class ChannelLost(Exception):
    """An agent channel is unusable; the message says why (its sessions got the same reason)."""
