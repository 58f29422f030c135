"""The PyTorch adapter (savegame.torch is the public module): adapter, host buffers, DataLoader workers."""
