"""The supervisor: runs the training script as a worker and keeps it alive."""
