"""The Keras 3 adapter (savegame.keras is the public module): adapter, file format, callback, loaders."""
