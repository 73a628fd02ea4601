"""runflow-worker: the daemon, queue, run lifecycle, reporting, storage and CLI."""
