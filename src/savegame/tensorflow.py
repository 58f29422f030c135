"""`import savegame.tensorflow`: the TensorFlow pieces a training script uses."""
from savegame.worker.tensorflow.adapter import EpochSteps, TensorFlowAdapter, weights_sha256
from savegame.worker.tensorflow.resume import auto_resume
from savegame.worker.tensorflow.weights import load_weights

__all__ = ["EpochSteps", "TensorFlowAdapter", "auto_resume", "load_weights", "weights_sha256"]
