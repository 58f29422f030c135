"""`import savegame.hf`: the Hugging Face Trainer on savegame (pip install 'savegame[hf]').

    trainer = Trainer(model, TrainingArguments(..., save_strategy="no"), ..., callbacks=[SavegameCallback()])
    savegame.hf.train(trainer)          # trainer.train(), resumed at the next batch from savegame's checkpoint
"""
from savegame.worker.hf.callback import SavegameCallback
from savegame.worker.hf.state import Later, TrainerStateRecord
from savegame.worker.hf.train import train

__all__ = ["Later", "SavegameCallback", "TrainerStateRecord", "train"]
