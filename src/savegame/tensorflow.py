"""`import savegame.tensorflow`: the TensorFlow pieces a training script uses."""
from savegame.worker.tensorflow import EpochSteps, TensorFlowAdapter, auto_resume, weights_sha256

__all__ = ["EpochSteps", "TensorFlowAdapter", "auto_resume", "weights_sha256"]
