"""The shared-memory hand-over tier: a worker snapshots into a segment, the daemon commits it."""
