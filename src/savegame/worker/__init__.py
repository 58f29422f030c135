"""What training scripts import: the Checkpointer and the framework adapters (loaded lazily)."""
