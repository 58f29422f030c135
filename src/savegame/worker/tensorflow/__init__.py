"""The TensorFlow adapter (savegame.tensorflow is the public module): adapter and auto_resume."""
