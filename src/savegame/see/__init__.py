"""Seeing a run: its records (history.jsonl, attempts.jsonl), goodput, metrics, plots, progress bars.

Nothing here imports a framework; matplotlib and prometheus_client are imported only by the commands
and the exporter that need them (optional extras: savegame[plot], savegame[metrics]).
"""
