"""The supervisor's state machine, driven by scripted event sequences (pure: no processes)."""
import signal

import pytest

from savegame.daemon import machine as m
from savegame.strategies import RestartPolicy

pytestmark = pytest.mark.unit
POLICY = RestartPolicy(max_restarts=3, window_s=100, backoff_initial_s=1, backoff_max_s=8, same_step_limit=3)


def run(events, machine=None, start=0.0, step=1.0, policy=POLICY):
    """Feed events in order; return the final machine and every (state, actions) seen."""
    machine = machine or m.Machine(grace_s=10)
    trace = []
    for i, event in enumerate(events):
        t = m.transition(machine, event, start + i * step, policy)
        machine = t.machine
        trace.append((machine.state, t.actions, t.reason))
    return machine, trace


def kinds(actions):
    return [type(a).__name__ for a in actions]


def test_clean_finish():
    machine, trace = run([m.Spawned(10), m.WorkerExited(0, None, 50)])
    assert machine.state == m.State.SUCCEEDED
    assert kinds(trace[-1][1]) == ["KillGroup", "Finish"] and trace[-1][1][-1].exit_code == 0


def test_stop_request_drains_then_stops_with_exit_0():
    machine, trace = run([m.Spawned(10), m.StopRequested("SIGTERM"), m.WorkerExited(75, None, 7)])
    assert [s for s, _, _ in trace] == [m.State.RUNNING, m.State.DRAINING, m.State.STOPPED]
    drain_actions = trace[1][1]
    assert drain_actions[0] == m.SignalWorker(signal.SIGTERM)
    assert drain_actions[1] == m.SetTimer("grace", 10)
    assert trace[-1][1][-1] == m.Finish(0)
    assert "emergency checkpoint committed" in trace[-1][2]


@pytest.mark.parametrize("requeue", [False, True])
def test_a_worker_that_finishes_while_a_stop_is_pending_is_a_success_not_lost_work(requeue):
    """The stop came while the worker committed its final checkpoint (finish() takes no stop): it
    exits 0 with training done. That is no "later work is lost" (74), and nothing is requeued."""
    machine, trace = run([m.Spawned(10), m.StopRequested("SIGTERM", requeue=requeue),
                          m.WorkerExited(0, None, 50, finished=True)])
    assert machine.state == m.State.SUCCEEDED
    assert trace[-1][1][-1] == m.Finish(0) and not any(isinstance(a, m.Requeue) for a in trace[-1][1])
    assert "lost" not in trace[-1][2]
    # exit 0 without the end of training reported (a handler of the script's own quit on the stop): work is lost
    machine, trace = run([m.Spawned(10), m.StopRequested("SIGTERM"), m.WorkerExited(0, None, 50)])
    assert machine.state == m.State.STOPPED and trace[-1][1][-1] == m.Finish(74)


def test_second_sigterm_does_not_cut_the_emergency_save_short():
    machine, trace = run([m.Spawned(10), m.StopRequested("SIGTERM"), m.StopRequested("SIGTERM")])
    assert machine.state == m.State.DRAINING
    assert trace[-1][1] == ()
    assert "not cut short" in trace[-1][2]


def test_grace_expiry_kills_the_group_and_stops():
    machine, trace = run([m.Spawned(10), m.StopRequested("SIGTERM"), m.GraceExpired(),
                          m.WorkerExited(None, signal.SIGKILL, 3)])
    assert [s for s, _, _ in trace][-2:] == [m.State.KILLING, m.State.STOPPED]
    assert kinds(trace[2][1]) == ["KillGroup"]
    assert "the last one stands" in trace[-1][2]


def test_stop_during_backoff_ends_at_once():
    machine, trace = run([m.Spawned(10), m.WorkerExited(1, None, 5), m.StopRequested("SIGINT")])
    assert trace[1][0] == m.State.BACKOFF
    assert machine.state == m.State.STOPPED and trace[-1][1] == (m.Finish(0),)


def test_crash_restarts_with_growing_backoff_then_gives_up():
    events = [m.Spawned(1)]
    for i in range(4):
        events += [m.WorkerExited(1, None, 10 * i), m.BackoffOver(), m.Spawned(2 + i)]
    machine, trace = run(events)
    delays = [a.seconds for _, actions, _ in trace for a in actions if isinstance(a, m.SetTimer)]
    assert delays == [0, 1, 2]  # the first failure restarts at once, then exponential
    assert machine.state == m.State.FAILED
    failed = [t for t in trace if t[0] == m.State.FAILED][0]
    assert failed[1][-1] == m.Finish(1) and "budget" in failed[2]


def test_failures_outside_the_window_do_not_count():
    machine = m.Machine()
    for i in range(10):  # one failure every 200 s with a 100 s window: never gives up
        machine, _ = run([m.Spawned(1), m.WorkerExited(1, None, i * 10), m.BackoffOver()], machine,
                         start=i * 200.0, step=0.0)
    assert machine.state == m.State.STARTING


def test_preemptions_spend_no_budget_but_quick_ones_back_off():
    """A worker that always exits 75 used to be restarted about 370 times a second."""
    events = [m.Spawned(1)]
    for _ in range(10):
        events += [m.WorkerExited(75, None, 5), m.BackoffOver(), m.Spawned(2)]
    machine, trace = run(events)
    assert machine.state == m.State.RUNNING  # never gives up on preemptions
    delays = [a.seconds for _, actions, _ in trace for a in actions if isinstance(a, m.SetTimer)]
    assert delays[0] == 0 and delays[1:4] == [1, 2, 4] and max(delays) == 8  # the policy's backoff, capped
    lone = run([m.Spawned(1), m.WorkerExited(75, None, 5)], start=0.0)[1]
    assert [a.seconds for a in lone[-1][1] if isinstance(a, m.SetTimer)] == [0]


def test_deaths_right_after_loading_fall_back_once_then_give_up():
    events = [m.Spawned(1)]
    for _ in range(3):  # loaded step 42, died before reaching any step boundary
        events += [m.WorkerExited(1, None, None, loaded_step=42), m.BackoffOver(), m.Spawned(2)]
    roomy = RestartPolicy(max_restarts=10, window_s=100, same_step_limit=3)
    machine, trace = run(events, m.Machine(), step=0.0, policy=roomy)
    starts = [a for _, actions, _ in trace for a in actions if isinstance(a, m.StartWorker)]
    assert [s.fallback for s in starts] == [False, False, True]
    fallback = [actions for state, actions, reason in trace if "falling back" in reason][0]
    assert m.SetAsideResume() in fallback and m.QuarantineResume() not in fallback  # never hidden on disk
    events = [m.WorkerExited(1, None, 42, loaded_step=42)]
    machine, trace = run(events, machine, start=1.0, policy=roomy)
    assert machine.state == m.State.FAILED and "even after falling back" in trace[-1][2]


@pytest.mark.parametrize("exit_event", [
    m.WorkerExited(1, None, None, loaded_step=None),  # died before loading: a missing dataset, an import error
    m.WorkerExited(1, None, 57, loaded_step=42),  # died after making progress: not about the checkpoint
    m.WorkerExited(None, signal.SIGKILL, 57, loaded_step=42),
    m.WorkerExited(None, signal.SIGKILL, None, loaded_step=42),  # the OOM killer right after loading
    m.WorkerExited(74, None, None, loaded_step=42),  # its saves failed (a full disk)
])
def test_failures_not_about_the_checkpoint_never_fall_back(exit_event):
    events = [m.Spawned(1)]
    for _ in range(6):
        events += [exit_event, m.BackoffOver(), m.Spawned(2)]
    roomy = RestartPolicy(max_restarts=10, window_s=100, same_step_limit=3)
    machine, trace = run(events, m.Machine(), step=0.0, policy=roomy)
    assert not any(isinstance(a, (m.SetAsideResume, m.QuarantineResume)) for _, actions, _ in trace for a in actions)
    assert all(not a.fallback for _, actions, _ in trace for a in actions if isinstance(a, m.StartWorker))


def test_hang_dumps_stacks_then_kills_then_restarts():
    machine, trace = run([m.Spawned(1), m.HangDetected(31.0), m.DumpWaitOver(),
                          m.WorkerExited(None, signal.SIGKILL, 9)])
    assert trace[1][1] == (m.SignalWorker(signal.SIGUSR2), m.SetTimer("dump", 2.0))
    assert kinds(trace[2][1]) == ["KillGroup"]
    assert machine.state == m.State.BACKOFF and "hang" in trace[-1][2]
    assert machine.failures[-1].cause == "hang"


def test_oom_kill_is_a_failure_not_a_stop():
    machine, trace = run([m.Spawned(1), m.WorkerExited(None, signal.SIGKILL, 9)])
    assert machine.state == m.State.BACKOFF and machine.failures[-1].cause == "killed"


def test_config_error_from_worker_is_never_retried():
    machine, trace = run([m.Spawned(1), m.WorkerExited(78, None, None)])
    assert machine.state == m.State.FAILED and trace[-1][1][-1] == m.Finish(78)


def test_bad_checkpoint_is_quarantined_and_restarted():
    machine, trace = run([m.Spawned(1), m.WorkerExited(65, None, 30)])
    assert machine.state == m.State.BACKOFF
    assert m.QuarantineResume() in trace[-1][1]


def test_a_command_that_cannot_run_is_a_config_error():
    machine, trace = run([m.SpawnFailed("command not found: 'pythn'", config_error=True)])
    assert machine.state == m.State.FAILED and trace[-1][1] == (m.Finish(78),)


def test_a_transient_spawn_failure_at_a_restart_backs_off_and_retries():
    """fork EAGAIN at a restart used to end the run with 78, which systemd never restarts."""
    machine, trace = run([m.Spawned(1), m.WorkerExited(None, signal.SIGKILL, 9), m.BackoffOver(),
                          m.SpawnFailed("Resource temporarily unavailable", config_error=False)])
    assert machine.state == m.State.BACKOFF and machine.failures[-1].cause == "spawn"
    assert not any(isinstance(a, m.Finish) for a in trace[-1][1])


def test_aborted_fails_from_any_state():
    machine, trace = run([m.Spawned(1), m.Aborted("the disk is full", 74)])
    assert machine.state == m.State.FAILED and kinds(trace[-1][1]) == ["KillGroup", "Finish"]
    assert trace[-1][1][-1] == m.Finish(74)  # the mirror is flushed on the way out too


def test_checkpoint_request_is_forwarded_only_while_running():
    _, trace = run([m.Spawned(1), m.CheckpointRequested()])
    assert trace[-1][1] == (m.SignalWorker(signal.SIGUSR1),)
    _, trace = run([m.Spawned(1), m.StopRequested("SIGTERM"), m.CheckpointRequested()])
    assert trace[-1][1] == ()


def test_terminal_states_ignore_everything():
    machine, _ = run([m.Spawned(1), m.WorkerExited(0, None, 1)])
    for event in (m.Spawned(2), m.StopRequested("SIGTERM"), m.WorkerExited(1, None, 1), m.BackoffOver()):
        t = m.transition(machine, event, 0.0, POLICY)
        assert t.machine == machine and t.actions == ()


def test_a_worker_that_could_not_save_is_told_apart():
    machine, trace = run([m.Spawned(1), m.StopRequested("SIGTERM"), m.WorkerExited(74, None, 9)])
    assert machine.state == m.State.STOPPED and trace[-1][1][-1] == m.Finish(74)
    assert "could not be committed" in trace[-1][2]
    machine, trace = run([m.Spawned(1), m.WorkerExited(74, None, 9)])
    assert machine.state == m.State.BACKOFF and machine.failures[-1].cause == "save-failed"


# ---------------------------------------------------------------- SLURM requeue, NaN/spike rollback

def test_a_preemption_signal_stops_then_requeues_after_the_exit_code_is_settled():
    machine, trace = run([m.Spawned(10), m.StopRequested("SIGUSR1 (the preemption signal)", requeue=True),
                          m.WorkerExited(75, None, 7)])
    assert machine.state == m.State.STOPPED and machine.requeue
    assert kinds(trace[-1][1]) == ["KillGroup", "Finish", "Requeue"]  # the mirror first, then the requeue
    _, trace = run([m.Spawned(10), m.WorkerExited(1, None, 5), m.StopRequested("SIGUSR1", requeue=True)])
    assert kinds(trace[-1][1]) == ["Finish", "Requeue"]  # no worker running: requeued all the same


def test_a_plain_stop_never_requeues_even_if_the_preemption_signal_follows():
    _, trace = run([m.Spawned(10), m.StopRequested("SIGTERM"), m.StopRequested("SIGUSR1", requeue=True),
                    m.WorkerExited(75, None, 7)])
    assert "Requeue" not in kinds(trace[-1][1])


def test_an_anomalous_loss_rolls_back_without_spending_the_budget():
    events = [m.Spawned(1)]
    for i in range(3):  # three rollbacks with max 3, plus crashes: the crash budget is untouched by them
        events += [m.WorkerExited(76, None, 31, anomaly_step=30, anomalies=i + 1), m.BackoffOver(), m.Spawned(2)]
    machine, trace = run(events, policy=RestartPolicy(max_restarts=0, window_s=100, max_rollbacks=3))
    assert machine.state == m.State.RUNNING
    rollbacks = [actions for state, actions, reason in trace if any(isinstance(a, m.RollBack) for a in actions)]
    assert len(rollbacks) == 3 and all(m.RollBack(30) in a and m.SetTimer("backoff", 0) in a for a in rollbacks)
    assert "rolling back to before step 30 (rollback 2 of 3)" in trace[4][2]


def test_one_anomaly_more_than_max_gives_up_with_exit_76():
    machine, trace = run([m.Spawned(1), m.WorkerExited(76, None, 31, anomaly_step=30, anomalies=4)],
                         policy=RestartPolicy(max_rollbacks=3))
    assert machine.state == m.State.FAILED and trace[-1][1][-1] == m.Finish(76)
    assert m.RollBack(30) in trace[-1][1]  # its checkpoints are set aside all the same
    assert "4 times" in trace[-1][2] and "rollback.max = 3" in trace[-1][2]


def test_an_anomaly_during_a_stop_sets_its_checkpoints_aside_and_stops():
    machine, trace = run([m.Spawned(1), m.StopRequested("SIGTERM"), m.WorkerExited(76, None, 31, anomaly_step=30,
                                                                                   anomalies=1)])
    assert machine.state == m.State.STOPPED and m.RollBack(30) in trace[-1][1] and trace[-1][1][-1] == m.Finish(0)
    assert "the loss went bad" in trace[-1][2]


def test_a_hang_right_after_loading_is_not_the_checkpoints_fault():
    """A long evaluation after loading, longer than --hang-timeout: a hang, never a suspect checkpoint."""
    events = [m.Spawned(1)]
    for _ in range(4):
        events += [m.HangDetected(5.0), m.DumpWaitOver(), m.WorkerExited(None, signal.SIGKILL, None, loaded_step=42),
                   m.BackoffOver(), m.Spawned(2)]
    roomy = RestartPolicy(max_restarts=10, window_s=100, same_step_limit=3)
    machine, trace = run(events, m.Machine(), step=0.0, policy=roomy)
    assert machine.failures[-1].cause == "hang"
    assert not any(isinstance(a, m.SetAsideResume) for _, actions, _ in trace for a in actions)


def test_a_stop_before_training_started_loses_nothing():
    machine, trace = run([m.Spawned(1), m.StopRequested("SIGTERM"),
                          m.WorkerExited(None, signal.SIGTERM, None, trained=False)])
    assert trace[-1][1][-1] == m.Finish(0) and "nothing to save" in trace[-1][2]
    machine, trace = run([m.Spawned(1), m.StopRequested("SIGTERM"), m.WorkerExited(None, signal.SIGKILL, 9)])
    assert trace[-1][1][-1] == m.Finish(74) and "later work is lost" in trace[-1][2]
