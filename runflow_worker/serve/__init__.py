"""The daemon: the queue, leases, the records store, control, callbacks, health and metrics."""
