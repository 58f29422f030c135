"""The ranks' agreement on stopping and saving, with 2 real gloo processes: what one rank alone sees
counts on every rank at the next step boundary (at once at an epoch end); clocks are rank 0's."""
from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import torch.distributed as dist
import torch.multiprocessing as mp

from savegame.strategies import AnySchedule, EveryNSeconds, EveryNSteps, History, Moment, OnImprovement
from savegame.worker.torch.distributed import Agreement, join_job

pytestmark = pytest.mark.frameworks


def _rank(rank: int, store: str, out: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
    schedule = AnySchedule((EveryNSteps(4), EveryNSeconds(5.0), OnImprovement("acc", "max")))
    agreement = Agreement(join_job(), schedule)
    history = History(last_time=0.0)
    seen = []
    for step in range(1, 9):
        # rank 1 alone: SIGUSR1 at step 2, SIGTERM from step 6; every rank's clock says "due" at step
        # 3, but only rank 0's counts; rank 1 alone sees a better metric at step 5
        now = 10.0 if step == 3 else 1.0
        moment = Moment(step, 0, now, False, {"acc": 0.9} if step == 5 and rank == 1 else {})
        stop, reason = agreement.decide(moment, history, rank == 1 and step >= 6, rank == 1 and step == 2)
        seen.append([step, stop, reason])
        if stop:
            break
        if reason:
            history = History(last_step=step, last_time=now)
        agreement.launch(saved=bool(reason))
    # an epoch end agrees at once: rank 1's request counts at this very boundary
    stop, reason = Agreement(join_job(), schedule).decide(Moment(9, 1, 1.0, True, {}), history, False, rank == 1)
    seen.append([9, stop, reason])
    Path(out, f"{rank}.json").write_text(json.dumps(seen))
    dist.destroy_process_group()


def _run_ranks(tmp_path: Path, timeout: float = 120.0) -> None:
    """Both ranks as processes, with a watchdog of the test's own: ranks that disagree deadlock in a
    collective (gloo's timeout is 30 minutes), which must fail the test, not hang it."""
    spawn = mp.get_context("spawn")
    ranks = [spawn.Process(target=_rank, args=(r, str(tmp_path / "store"), str(tmp_path))) for r in (0, 1)]
    for process in ranks:
        process.start()
    deadline = time.monotonic() + timeout
    for process in ranks:
        process.join(max(deadline - time.monotonic(), 0.1))
    hung = [r for r, process in enumerate(ranks) if process.is_alive()]
    for process in ranks:
        if process.is_alive():
            process.kill()
            process.join()
    assert not hung, f"rank(s) {hung} still waiting after {timeout:.0f} s: the ranks did not decide alike"
    assert [process.exitcode for process in ranks] == [0, 0]


def test_decisions_are_the_same_on_every_rank_one_step_later(tmp_path: Path) -> None:
    _run_ranks(tmp_path)
    seen = [json.loads((tmp_path / f"{r}.json").read_text()) for r in (0, 1)]
    assert seen[0] == seen[1]
    assert seen[0] == [[1, False, None], [2, False, None], [3, False, "manual"],  # rank 1's SIGUSR1, one step on
                       [4, False, "periodic"],  # every 4 steps: no agreement needed
                       [5, False, None],  # rank 0's clock (due at 3) was dropped: step 3 saved anyway
                       [6, False, None],  # rank 1's better metric is not rank 0's: no "best"
                       [7, True, None],  # rank 1's SIGTERM at 6 stops both at 7
                       [9, False, "manual"]]
