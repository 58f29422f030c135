"""`import savegame.tensorflow`: the TensorFlow pieces a training script uses."""
from savegame.worker.tensorflow.adapter import EpochSteps, TensorFlowAdapter, weights_sha256
from savegame.worker.tensorflow.resume import auto_resume

__all__ = ["EpochSteps", "TensorFlowAdapter", "auto_resume", "weights_sha256"]
