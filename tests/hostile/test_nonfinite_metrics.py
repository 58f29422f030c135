"""Non-finite metrics (security review 9.11): a -inf or +inf loss (a diverged run, or a manifest an
older writer wrote) is never the best, never pushes the real best out of retention, and nothing the
CLI prints as JSON holds NaN or Infinity."""
from __future__ import annotations

import json
import math
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from helpers import SAVEGAME
from storage_kit import base_manifest, cli, local_root, rows_by_step, save_good
from savegame.strategies.metrics import is_better, metric_of, rank_by_metric
from savegame.storage import CheckpointStore

INF, NAN = math.inf, math.nan


@dataclass(frozen=True)
class Item:
    step: int
    metrics: dict = field(default_factory=dict)


@pytest.mark.unit
@pytest.mark.parametrize("mode", ["min", "max"])
def test_non_finite_values_are_never_ranked(mode):
    items = [Item(1, {"loss": 0.5}), Item(2, {"loss": -INF}), Item(3, {"loss": INF}), Item(4, {"loss": NAN}),
             Item(5, {"loss": 0.2}), Item(6, {})]
    ranked = [i.step for i in rank_by_metric(items, "loss", mode)]
    assert ranked == ([5, 1] if mode == "min" else [1, 5])
    assert metric_of(items[1], "loss") is None and metric_of(items[2], "loss") is None


@pytest.mark.unit
@pytest.mark.parametrize("value, reference, mode, better", [
    (-INF, 0.5, "min", False), (INF, 0.5, "max", False), (NAN, 0.5, "min", False), (NAN, None, "max", False),
    (0.3, -INF, "min", True), (0.3, INF, "max", True), (0.3, NAN, "min", True), (0.3, None, "min", True),
    (0.3, 0.5, "min", True), (0.7, 0.5, "min", False),
])
def test_is_better(value, reference, mode, better):
    assert is_better(value, reference, mode) is better


@pytest.mark.integration
def test_a_minus_infinity_loss_neither_is_best_nor_pushes_the_best_out(tmp_path: Path, savegame_env):
    root = local_root(tmp_path / "run")
    store = CheckpointStore(root.url)
    for step, loss in ((10, 0.5), (20, 0.2)):
        save_good(store, step, metrics={"val_loss": loss})
    # as an older writer wrote it: -Infinity is in the file (json.dumps allows it)
    root.put_checkpoint(30, json.dumps({**base_manifest(30), "metrics": {"val_loss": -INF, "acc": NAN}}).encode())
    save_good(store, 40, metrics={"val_loss": 0.9})
    assert store.verify(store.get(30)) == []
    assert store.get(30).metrics == {}  # dropped on read

    rows = rows_by_step(cli(savegame_env, "ls", root.url, "--json", "--monitor", "val_loss", "--mode", "min"))
    assert rows[30]["metrics"] == {}
    flags = ["--keep-last", "1", "--keep-best", "1", "--monitor", "val_loss", "--mode", "min"]
    plan = json.loads(cli(savegame_env, "prune", root.url, *flags, "--dry-run", "--json").stdout)
    assert [k["step"] for k in plan["keep"]] == [20, 40]
    assert "best 1 by val_loss (min)" in plan["keep"][0]["why"]
    out = tmp_path / "restored"
    proc = cli(savegame_env, "restore", root.url, "--best", "--monitor", "val_loss", "--mode", "min", "--to", str(out))
    assert proc.stdout.startswith("restored step 20 ")


@pytest.mark.integration
def test_every_json_the_cli_prints_is_strict(tmp_path: Path, savegame_env):
    root = local_root(tmp_path / "run")
    save_good(CheckpointStore(root.url), 10)
    status = tmp_path / "run" / ".savegame" / "status.json"
    status.parent.mkdir()
    status.write_text('{"state": "stopped", "reason": "test", "best": NaN, "loss": -Infinity, "nested": [Infinity]}')
    for args in (["ls", root.url, "--json", "--all"], ["verify", root.url, "--json"],
                 ["prune", root.url, "--dry-run", "--json"]):
        out = cli(savegame_env, *args).stdout
        json.loads(out, parse_constant=lambda name: pytest.fail(f"`savegame {args[0]}` printed {name}"))
    # The daemon never writes NaN (its JSON is strict): a status file with one is damaged, said in one line.
    damaged = subprocess.run([SAVEGAME, "status", root.url, "--json"], env=savegame_env, capture_output=True, text=True)
    assert damaged.returncode == 78 and "is damaged" in damaged.stderr and damaged.stdout == ""
