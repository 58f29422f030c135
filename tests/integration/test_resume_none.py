"""Found by an adversarial review (it failed before its fix) (issue 8 item 2 and C9): `--resume none` is refused over an earlier run's
checkpoints, locally or in the bucket. When the bucket cannot be listed at start (network not up yet),
the check quietly finds "no steps" and the new run starts; once the network is back, its mirror
uploads into the earlier run's prefix and the bucket's retention deletes the earlier run's
checkpoints (they are older than the new run's)."""
from __future__ import annotations

import json
import time

import pytest

from helpers import Daemon, counter, savegame

pytestmark = pytest.mark.integration


def test_resume_none_with_an_unreadable_bucket_does_not_start_over_an_earlier_run(tmp_path, s3_server, fault_proxy):
    url = f"s3://{s3_server.make_bucket()}/run"
    earlier = Daemon(tmp_path / "vm1", counter("--steps", 40, "--every", 10, "--size-mb", 0.01),
                     ["--mirror", url, "--keep-last", "2"], env=s3_server.env).start()
    assert earlier.wait() == 0, earlier.stderr
    before = [c["step"] for c in json.loads(savegame("ls", url, "--json", env=s3_server.env).stdout)]
    assert before, "the earlier run is in the bucket"
    fault_proxy.refuse()
    fault_proxy.accept(after=20)  # the network comes up a little later (not after the test: close() cancels it)
    new = Daemon(tmp_path / "vm2", counter("--steps", 200, "--every", 10, "--sleep", 0.05, "--size-mb", 0.01),
                 ["--mirror", url, "--resume", "none", "--keep-last", "2"], env=fault_proxy.env()).start()
    try:
        code = new.wait(timeout=180)
    finally:
        new.kill()
    after = [c["step"] for c in json.loads(savegame("ls", url, "--json", env=s3_server.env).stdout)]
    assert code == 78 or set(before) <= set(after), (
        f"--resume none started although the bucket could not be checked, and the earlier run's "
        f"checkpoints {sorted(set(before) - set(after))} were deleted from the bucket (exit {code})")
