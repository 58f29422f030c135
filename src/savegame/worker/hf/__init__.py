"""The Hugging Face Trainer on savegame (behind savegame.hf)."""
