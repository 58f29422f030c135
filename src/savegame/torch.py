"""`import savegame.torch`: the PyTorch pieces a training script uses."""
from savegame.worker.torch.adapter import ResumableSampler, TorchAdapter, weights_sha256

__all__ = ["ResumableSampler", "TorchAdapter", "weights_sha256"]
