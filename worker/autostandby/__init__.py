"""Auto-standby on the worker: inbound connections counted per instance, an idle clock, and
a standby with cause ``idle`` once an instance has been idle for its policy's timeout.

- :mod:`.registry`: connections the worker itself holds or relays (the wake listener).
- :mod:`.observe`: connections read from the kernel (socket table, conntrack).
- :mod:`.controller`: the idle clock, the status, the hold, the standby.
- :mod:`.service`: the host query the gateway asks (status, hold).
- :mod:`.metrics`: instances in standby by cause.
"""
