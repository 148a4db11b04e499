"""One module per lifecycle operation, each an ``async def <op>(ctx, inst, cmd)`` in
numbered steps. :mod:`worker.engine` takes the per-instance lock and calls them."""
