"""`every_seconds = "auto"`: the worker measures its saves and follows the Young-Daly interval, with the
MTBF from the run's failure record that the daemon keeps and hands to every worker it starts."""
import json

import pytest

from helpers import Daemon, counter

pytestmark = pytest.mark.integration


def test_the_interval_is_announced_with_its_inputs_and_failures_count(tmp_path):
    run, config = tmp_path / "run", tmp_path / "auto.toml"
    config.write_text('[save]\nevery_seconds = "auto"\nmtbf_prior = "1h"\n')
    daemon = Daemon(run, counter("--steps", 60, "--every", 20, "--sleep", 0.01, "--crash-once-at", 50),
                    ["--config", str(config)]).start()
    assert daemon.wait(timeout=60) == 0, daemon.stderr
    said = [line.split("the worker saves every ", 1)[1] for line in daemon.stderr.splitlines()
            if "the worker saves every " in line]
    assert said[0].startswith("60.0s now: no save measured yet: 60s, to measure one; "
                              "MTBF 1.0h (0 failures in 0s, prior 1.0h)"), said
    measured = [s for s in said if "stall " in s and "persist " in s]
    assert measured and "0 failures in" in measured[0]
    # the second worker was told of the crash, and starts from the costs its checkpoint (step 40) brought
    after_crash = [s for s in said if "1 failures in" in s]
    assert after_crash and "stall " in after_crash[0], said
    record = json.loads((run / ".savegame" / "reliability.json").read_text())
    assert record["failures"] == {"crash": 1} and record["observed_s"] > 0


def test_a_preemption_notice_counts_as_a_failure_for_the_mtbf(tmp_path):
    """SIGUSR1 as the scheduler's preemption signal: recorded as a preemption, so the next run saves more often."""
    import signal

    run, config = tmp_path / "run", tmp_path / "auto.toml"
    config.write_text('preemption_signal = "SIGUSR1"\n[save]\nevery_seconds = "auto"\n')
    daemon = Daemon(run, counter("--steps", 100000, "--sleep", 0.01), ["--config", str(config)]).start()
    daemon.ready()
    daemon.signal(signal.SIGUSR1)
    assert daemon.wait(timeout=30) == 0, daemon.stderr
    record = json.loads((run / ".savegame" / "reliability.json").read_text())
    assert record["failures"] == {"preempted": 1}
    second = Daemon(run, counter("--steps", 5), ["--config", str(config)]).start()
    assert second.wait(timeout=30) == 0, second.stderr
    assert "(1 failures in" in second.stderr
