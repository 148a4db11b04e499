"""The NATS side shared by gateway and worker: connecting, the streams and buckets, and
who may do what on them.

Subject and bucket *names* are wire facts and live in ``schemas.subjects``; this package
only knows how to reach a NATS cluster, how to create what those names refer to, and the
permissions each component's NATS user needs (``vmfleet nats-config``).
"""

from natsbus._connect import (
    DEFAULT_INBOX_PREFIX,
    BusOptions,
    BusRefused,
    PublishDenials,
    close,
    connect,
    kv_subject,
    tls_context,
)
from natsbus._kv import live_entries
from natsbus._permissions import (
    FleetUser,
    Permissions,
    fleet_users,
    gateway_permissions,
    inbox_prefix,
    worker_permissions,
)
from natsbus._provision import Layout, provision
from natsbus._server_config import (
    DEFAULT_PASSWORDS_FILE,
    ServerTls,
    account_name,
    admin_user,
    complete_passwords,
    parse_passwords,
    password_variable,
    render_passwords,
    render_server_config,
)

__all__ = [
    "DEFAULT_INBOX_PREFIX",
    "DEFAULT_PASSWORDS_FILE",
    "BusOptions",
    "BusRefused",
    "FleetUser",
    "Layout",
    "Permissions",
    "PublishDenials",
    "ServerTls",
    "account_name",
    "admin_user",
    "close",
    "complete_passwords",
    "connect",
    "fleet_users",
    "gateway_permissions",
    "inbox_prefix",
    "kv_subject",
    "live_entries",
    "parse_passwords",
    "password_variable",
    "provision",
    "render_passwords",
    "render_server_config",
    "tls_context",
    "worker_permissions",
]
