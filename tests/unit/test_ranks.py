"""The daemon's view of a torchrun job's ranks: what their events mean for the launcher's exit."""
from __future__ import annotations

import pytest

from savegame import protocol
from savegame.daemon.ranks import RankTable, format_ranks
from savegame.daemon.torchrun import check_torchrun, launcher_args
from savegame.errors import ConfigError

pytestmark = pytest.mark.unit


def _job(*ranks: int, world: int = 2) -> RankTable:
    table = RankTable()
    for local, rank in enumerate(ranks):
        table.hello({"pid": 100 + rank, "rank": rank, "world_size": world, "local_rank": local})
    return table


def test_every_rank_stopped_after_its_emergency_checkpoint_is_exit_75() -> None:
    table = _job(0, 1)
    table.note({"pid": 100, "event": "stopping", "why": "requested", "step": 7})
    assert table.translate(1, launcher=True) == (1, "")  # rank 1 has not said so: a crash
    table.note({"pid": 101, "event": "stopping", "why": "agreed", "step": 7})
    code, note = table.translate(1, launcher=True)
    assert code == protocol.EXIT_SAVED_RESUME_ME and "the ranks were asked to stop" in note


def test_ranks_that_only_agreed_were_stopped_by_another_node() -> None:
    table = _job(2, 3, world=4)
    for pid in (102, 103):
        table.note({"pid": pid, "event": "stopping", "why": "agreed"})
    code, note = table.translate(1, launcher=True)
    assert code == 75 and "another node asked for an emergency checkpoint" in note
    assert not table.hosts_rank0


@pytest.mark.parametrize("events, expected", [
    ([{"event": "exiting", "code": 78}], 78),
    ([{"event": "bad-checkpoint", "step": 3}], 65),
    ([{"event": "exiting", "code": 74}, {"event": "exiting", "code": 78}], 78),  # 78 is never retried: it wins
    ([{"event": "exiting", "code": 3}], 1),  # not a code of savegame's: the launcher's stands
])
def test_a_code_a_rank_reported_replaces_the_launchers(events: list, expected: int) -> None:
    table = RankTable()  # reported before any hello: a rank that fails while it loads its checkpoint
    for i, event in enumerate(events):
        table.note({"pid": 200 + i, **event})
    assert table.translate(1, launcher=True)[0] == expected


def test_the_training_process_itself_keeps_its_exit_code() -> None:
    table = _job(0, world=1)
    table.note({"pid": 100, "event": "exiting", "code": 78})
    assert table.translate(1, launcher=False) == (1, "")  # it is the process that exited: its code is the truth
    assert table.summary() is None and format_ranks({}, 0.0) == []


def test_status_lines_show_each_local_rank() -> None:
    table = _job(0, 1)
    table.note({"pid": 101, "event": "heartbeat", "step": 12}, now=50.0)
    lines = format_ranks({"job": table.summary()}, now=52.0)
    assert lines[0].startswith("job:             world size 2, 2 rank(s) on this node (incl. rank 0)")
    assert "local rank 1: rank 1, pid 101, step 12, last heard 2.0s ago" in lines[2]


def test_torchrun_settings() -> None:
    cmd = ["/venv/bin/torchrun", "--nproc-per-node", "2", "--max-restarts=0", "train.py", "--max-restarts", "5"]
    assert launcher_args(cmd) == ["--nproc-per-node", "2", "--max-restarts=0"]  # the script's own flags are its own
    assert check_torchrun(cmd, {}, grace_s=25) == {"TORCH_ELASTIC_SHUTDOWN_TIMEOUT": "35"}
    assert check_torchrun([*cmd[:3], "--shutdown-timeout", "90", "train.py"], {}, 25) == {}
    assert check_torchrun(["python", "-m", "torch.distributed.run", "t.py"], {"PET_SHUTDOWN_TIMEOUT": "60"}, 25) == {}
    assert check_torchrun(["python", "train.py"], {}, 25) == {}
    with pytest.raises(ConfigError, match="--max-restarts 0"):
        check_torchrun(["torchrun", "--max_restarts", "3", "t.py"], {}, 25)
    with pytest.raises(ConfigError, match="--max-restarts 0"):
        check_torchrun(["torchrun", "t.py"], {"PET_MAX_RESTARTS": "2"}, 25)
