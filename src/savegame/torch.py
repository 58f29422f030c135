"""`import savegame.torch`: the PyTorch pieces a training script uses, and load_weights for the model."""
from savegame.worker.torch.adapter import ResumableSampler, TorchAdapter, weights_sha256
from savegame.worker.torch.weights import load_state_dict, load_weights

__all__ = ["ResumableSampler", "TorchAdapter", "load_state_dict", "load_weights", "weights_sha256"]
