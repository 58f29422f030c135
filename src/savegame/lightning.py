"""`import savegame.lightning`: PyTorch Lightning's Trainer.fit on savegame (pip install 'savegame[lightning]')."""
from savegame.worker.lightning.callback import LightningState, SavegameCallback

__all__ = ["LightningState", "SavegameCallback"]
