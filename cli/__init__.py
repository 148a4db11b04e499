"""The ``vmfleet`` command: daemons (dev, gateway, worker) and tools (token, kernel)."""
