"""The host side of the guest agent (docs/agent-protocol.md).

:class:`AgentHub` keeps one channel per running instance; :class:`AgentSession` is one
exec, cp or stat on it, carrying hypeman's WebSocket frames (:class:`Frame`) unchanged.
"""

from worker.agent.errors import AgentProtocolError, AgentSessionClosed, AgentUnavailable
from worker.agent.hub import AgentHub
from worker.agent.session import AgentSession, Frame, SessionKind
from worker.agent.tracking import track_instance

__all__ = [
    "AgentHub",
    "AgentProtocolError",
    "AgentSession",
    "AgentSessionClosed",
    "AgentUnavailable",
    "Frame",
    "SessionKind",
    "track_instance",
]
