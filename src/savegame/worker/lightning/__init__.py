"""The PyTorch Lightning callback (savegame.lightning is the public module)."""
