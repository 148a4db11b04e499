"""What a gateway needs to know, built once by the caller and passed in."""

from __future__ import annotations

from dataclasses import dataclass, field

from natsbus import BusOptions, Layout
from schemas.messages import DEFAULT_CPU_OVERCOMMIT, DEFAULT_MEMORY_OVERCOMMIT

__all__ = ["GatewayConfig"]


@dataclass(frozen=True)
class GatewayConfig:
    bus: BusOptions
    jwt_secret: str
    subject_prefix: str = "vmfleet"
    layout: Layout = field(default_factory=Layout)
    #: Largest JSON request body accepted; larger ones get 413 before they are read whole.
    max_json_body_bytes: int = 1 << 20
    #: Largest multipart volume upload (``size_gb`` is only known once the form is read);
    #: ``/volumes/from-archive`` is bounded by its ``size_gb`` instead.
    max_archive_bytes: int = 16 << 30
    #: How long a lifecycle call waits for the host's answer before a 504 (the command stays
    #: queued). Below the SDK's 60 s read timeout, so the client gets the 504, not a hang.
    command_timeout_s: float = 55.0
    #: A log or event stream with nothing to send sends an SSE comment this often.
    keepalive_s: float = 15.0
    #: ``GET /instances/{id}/wait``: default and largest timeout (the SDK documents 60 s / 5 min).
    wait_default_s: float = 60.0
    wait_max_s: float = 300.0
    #: How long ``POST /images`` waits for the host to refuse the pull outright (unknown
    #: image, bad reference) before answering 202 ``pending``; hypeman resolves in 2 s too.
    image_early_answer_s: float = 2.0
    #: Overcommit (VMFLEET_CPU_OVERCOMMIT, VMFLEET_MEMORY_OVERCOMMIT; set them as on the
    #: workers, which refuse what is past their own): vCPUs placed per host CPU (hypeman's
    #: default is 4), and memory per byte of a host's RAM.
    cpu_overcommit: float = DEFAULT_CPU_OVERCOMMIT
    memory_overcommit: float = DEFAULT_MEMORY_OVERCOMMIT
    #: Serve the browser view at ``/ui`` (``VMFLEET_UI``); off, ``/ui`` is a 404.
    ui: bool = False
