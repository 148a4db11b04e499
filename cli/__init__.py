"""The ``vmfleet`` command: daemons (dev, gateway, worker), tools (token, kernel), and
the client commands that use a gateway (run, ps, logs, ...: ``cli.commands``)."""
