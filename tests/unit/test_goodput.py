"""Goodput accounting from attempt records (pure), and the bounded JSON-lines files they live in."""
from __future__ import annotations

import json
import os

import pytest

from savegame.see import goodput as g
from savegame.see import jsonl

pytestmark = pytest.mark.unit
D1 = {"daemon_pid": 10, "daemon_started": 1000.0}


def attempt(n, spawned, ready, ended, resumed, last, cause, **extra):
    return {"kind": "attempt", "attempt": n, **D1, "spawned": spawned, "ready": ready, "ended": ended,
            "resumed_from": resumed, "last_step": last, "cause": cause, **extra}


def test_a_crash_loses_the_steps_since_the_resume_point_at_the_dying_attempts_pace():
    records = [
        # 0 -> 100 steps in 100 s of training (after 10 s of start-up), 5 s of it saving; dies at 100
        attempt(1, 1000.0, 1010.0, 1110.0, None, 100, "crash", stall_s=5.0, saves=4, restarted=True),
        # resumes from 80: 20 steps were lost, 20 x 0.95 s of the first attempt's training
        attempt(2, 1112.0, 1114.0, 1200.0, 80, 160, "finished", saves=3),
        {"kind": "daemon", "pid": 10, "started": 1000.0, "ended": 1205.0, "exit_code": 0},
    ]
    s = g.summarize(g.parse_ledger(records, "t"))
    assert s.lost_steps == 20
    assert s.seconds["redone"] == pytest.approx(20 * 0.95)
    assert s.seconds["restarts"] == pytest.approx(10 + 2)
    assert s.seconds["stalls"] == pytest.approx(5)
    assert s.seconds["waiting"] == pytest.approx(205 - 110 - 88)  # the backoff, and the end
    assert s.total_s == pytest.approx(205)
    assert s.seconds["productive"] == pytest.approx(205 - 19 - 12 - 5 - 7)
    assert s.goodput == pytest.approx(s.seconds["productive"] / 205)
    assert s.restarts == {"crash": 1} and s.attempts == 2 and s.saves == 7 and s.preemptions == 0


def test_the_last_attempts_loss_is_not_known_until_the_next_one_resumes_and_a_finish_loses_nothing():
    dying = attempt(1, 0.0, 1.0, 11.0, None, 10, "killed")
    assert g.summarize(g.parse_ledger([dying], "t")).lost_steps == 0
    assert g.summarize(g.parse_ledger([dying, attempt(2, 12.0, 13.0, 14.0, 4, 5, "finished")], "t")).lost_steps == 6
    assert g.summarize(g.parse_ledger([attempt(1, 0.0, 1.0, 2.0, None, 3, "finished")], "t")).lost_steps == 0


def test_time_without_a_daemon_is_down_time_not_lost_time_and_preemptions_count():
    records = [{**attempt(1, 0.0, 1.0, 10.0, None, 9, "stopped", preempted=True), "daemon_started": 0.0},
               {"kind": "daemon", "pid": 10, "started": 0.0, "ended": 12.0},
               {"kind": "attempt", "attempt": 2, "daemon_pid": 11, "daemon_started": 100.0, "spawned": 101.0,
                "ready": 102.0, "ended": 110.0, "resumed_from": 9, "last_step": 20, "cause": "finished"},
               {"kind": "daemon", "pid": 11, "started": 100.0, "ended": 111.0}]
    s = g.summarize(g.parse_ledger(records, "t"))
    assert s.down_s == pytest.approx(88) and s.total_s == pytest.approx(23)
    assert s.preemptions == 1 and s.daemons == 2 and s.lost_steps == 0


def test_records_are_checked_field_by_field():
    good = attempt(1, 0.0, 1.0, 2.0, None, 3, "finished")
    bad = [{**good, "ended": "soon"}, {**good, "ready": 5.0}, {**good, "attempt": 0}, {**good, "last_step": -1},
           {**good, "restarted": "yes"}, {"kind": "nonsense"}, {**good, "stall_s": float("inf")}]
    ledger = g.parse_ledger([good, *bad], "t")
    assert len(ledger.attempts) == 1 and ledger.skipped == len(bad)


def test_an_open_attempt_counts_as_productive_so_far():
    ledger = g.with_open(g.Ledger([], [], []), g.DaemonLife(10, 0.0, 30.0),
                         g.Attempt(1, (10, 0.0), 1.0, 3.0, 30.0, None, 50))
    s = g.summarize(ledger)
    assert s.seconds["productive"] == pytest.approx(27) and s.seconds["waiting"] == pytest.approx(1)
    assert s.rows[0]["cause"] == "running"


def test_a_torn_last_line_is_left_out_and_a_garbled_one_counted(tmp_path):
    path = tmp_path / "x.jsonl"
    jsonl.append(str(path), {"a": 1}, 1000)
    with open(path, "ab") as f:
        f.write(b'{"not json\n[1, 2]\n{"b": NaN}\n{"torn": ')
    lines = jsonl.read(str(path), 1000)
    assert lines.records == [{"a": 1}] and lines.skipped == 3


def test_appends_compact_the_oldest_half_into_a_folded_line(tmp_path):
    path = str(tmp_path / "attempts.jsonl")
    for n in range(1, 60):
        jsonl.append(path, attempt(n, n * 10.0, n * 10 + 1.0, n * 10 + 9.0, max(0, n * 5 - 5), n * 5, "crash",
                                   restarted=True), 4000, g.fold)
        assert os.path.getsize(path) <= 4000
    lines = jsonl.read(path, 4000)
    assert lines.records[0]["kind"] == "earlier" and lines.skipped == 0
    s = g.summarize(g.parse_ledger(lines.records, "t"))
    assert s.attempts == 59 and s.restarts == {"crash": 59}
    assert s.lost_steps == 58 * 0  # each attempt resumed from where the one before it got to


def test_appends_never_follow_a_planted_link(tmp_path):
    target = tmp_path / "elsewhere"
    target.write_text("")
    os.symlink(target, tmp_path / "h.jsonl")
    with pytest.raises(OSError):
        jsonl.append(str(tmp_path / "h.jsonl"), {"a": 1}, 1000)
    assert target.read_text() == ""
    assert json.loads(jsonl.encode({"x": 1.5})) == {"x": 1.5}
