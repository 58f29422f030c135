"""Commits: what became of the saves, as the training thread reads it after waiting on the writer."""
from __future__ import annotations

from typing import Any

import pytest

from savegame.storage import CheckpointInfo
from savegame.worker.commits import Commits
from savegame.worker.writer import SaveJob

pytestmark = pytest.mark.unit


class Link:
    def send(self, event: str, **fields: Any) -> None:
        pass


def job(step: int, reason: str = "periodic") -> SaveJob:
    return SaveJob(None, {}, step, 0, reason, {}, "numpy", "run", None)  # type: ignore[arg-type]


def test_an_older_hand_over_committed_after_a_newer_save_failed_does_not_make_the_failure_good():
    commits = Commits(Link(), lambda info: None)  # type: ignore[arg-type]
    commits.done(job(6, "emergency"), None, OSError(28, "No space left on device"))
    commits.committed_by_daemon(job(4), 4.0)  # the daemon's slow commit of an older hand-over lands after it
    assert commits.error is not None and commits.failures == 1
    assert commits.step == 4  # what the emergency check compares with the step it saved
    commits.committed_by_daemon(job(6), 0.1)  # a later save of that step (or a newer one) does
    assert commits.error is None and commits.failures == 0 and commits.step == 6
