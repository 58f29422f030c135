"""`import savegame.keras`: the Keras 3 pieces a training script uses (any Keras backend)."""
from savegame.worker.keras.adapter import KerasAdapter, ResumableBatches, set_random_seed, weights_sha256
from savegame.worker.keras.callback import SavegameCallback
from savegame.worker.keras.load import checkpoint_file, load_model, load_weights

__all__ = ["KerasAdapter", "ResumableBatches", "SavegameCallback", "checkpoint_file", "load_model", "load_weights",
           "set_random_seed", "weights_sha256"]
