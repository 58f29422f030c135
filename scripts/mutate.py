"""Break one invariant at a time in a copy of the code and check that the tests meant to catch it do.

    .venv/bin/python scripts/mutate.py            # every mutation; a table; exit 1 if any survives
    .venv/bin/python scripts/mutate.py rng-not-restored no-fsync-payload

Each mutation replaces one exact piece of source text (it must be found exactly once, so a
refactoring that moves the code makes the mutation fail loudly instead of silently testing nothing)
in a temporary copy of src/, then runs the named tests against that copy. A mutation is *caught*
when those tests fail, and *survives* when they pass. The same tests must pass on the unchanged copy
first, or the result means nothing. Not part of CI (it runs each test file once per mutation);
run it before resolving an issue that touches storage, the daemon or an adapter.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class Mutation:
    name: str
    path: str  # under src/savegame/
    old: str
    new: str
    tests: tuple[str, ...]


MUTATIONS = [
    Mutation("rng-not-restored", "worker/checkpointer.py", 'set_rng_state(core.get("rng", {}))', "pass",
             ("tests/workers/test_rng_resume.py",)),
    Mutation("daemon-skips-verification", "daemon/resume.py", "problems = self.local.verify(info)", "problems = []",
             ("tests/integration/test_daemon.py::test_the_daemon_verifies_the_checkpoint_before_the_worker_sees_it",)),
    Mutation("checksums-not-verified", "storage/store.py", "                problems.append(f\"{entry.path}: {problem}\")",
             "                pass", ("tests/integration/test_damage.py",)),
    Mutation("mirror-oldest-first", "daemon/mirror.py", "step = urgent[0] if urgent else (todo[0] if todo else None)",
             "step = min(todo) if todo else None",
             ("tests/integration/test_mirror_faults.py::test_the_emergency_checkpoint_jumps_a_backlog_on_a_slow_uplink",)),
    Mutation("no-fsync-payload", "storage/local.py", "            os.fsync(self._file.fileno())", "            pass",
             ("tests/integration/test_commit_durability.py",)),
    Mutation("no-fsync-parent", "storage/local.py", "                os.close(staging_fd)\n            os.fsync(root_fd)",
             "                os.close(staging_fd)", ("tests/integration/test_commit_durability.py",)),
    Mutation("non-atomic-publish", "storage/local.py",
             "        os.rename(src, dst, src_dir_fd=src_fd, dst_dir_fd=dst_fd)",
             "        import shutil as _s; _s.copytree(os.path.join(f'/proc/self/fd/{src_fd}', src), "
             "os.path.join(f'/proc/self/fd/{dst_fd}', dst)); _s.rmtree(os.path.join(f'/proc/self/fd/{src_fd}', src))",
             ("tests/integration/test_atomic_publish.py",)),
    Mutation("retention-drops-newest", "strategies/retention.py", '        add(max(by_step), "newest")', "        pass",
             ("tests/unit/test_retention.py",)),
    Mutation("retention-drops-best", "strategies/retention.py", '            add(ranked[0].step, f"best {monitor[0]}")',
             "            pass", ("tests/unit/test_retention.py",)),
    Mutation("resume-source-unprotected", "daemon/housekeeping.py",
             '                protected[d.resume_point.info.step] = "resume source"  # until the worker commits past it',
             "                pass",
             ("tests/integration/test_daemon.py::test_prune_from_the_command_line_spares_what_a_running_daemon_keeps",)),
    Mutation("sigterm-not-forwarded", "daemon/supervisor.py", "        self.worker.send(signum, targets)",
             "        return", ("tests/integration/test_daemon.py::test_sigint_and_sighup_stop_like_sigterm",)),
    Mutation("no-flush-at-exit", "daemon/supervisor.py",
             "        if self.mirror and self.startup.mirror_started:\n            code = self._flush_mirror(code)",
             "        pass",
             ("tests/integration/test_mirror.py::test_the_emergency_checkpoint_reaches_the_bucket_before_the_daemon_exits",
              "tests/integration/test_mirror_faults.py::test_a_run_that_gives_up_still_flushes_the_mirror")),
    Mutation("policy-not-stored", "daemon/startup.py", "            update_policy(d.local, config)", "            pass",
             ("tests/integration/test_run_policy.py::test_the_best_survives_a_daemon_restart",)),
    Mutation("sender-not-checked", "daemon/events.py", "            if sender is None or not accept(*sender):",
             "            if sender is None:", ("tests/hostile/test_event_socket.py",
                                                "tests/integration/test_daemon_guards.py")),
    Mutation("worker-keeps-daemon-oom-score", "daemon/process.py",
             "            if oom_score_adj is None or oom_score_adj == own_oom_score_adj():", "            if True:",
             ("tests/integration/test_oom_priority.py",)),
    Mutation("hang-timeout-ignores-steps", "strategies/hang.py", "    wanted = max(floor_s, factor * slowest_step_s)",
             "    wanted = floor_s", ("tests/integration/test_hang_auto.py",)),
    Mutation("status-all-misses-dead-daemons", "daemon/overview.py",
             "        if daemon is None or not process_alive(daemon):", "        if daemon is None:",
             ("tests/integration/test_status_all.py",)),
    Mutation("manifest-index-unchecked", "storage/manifestindex.py",
             "        if etag and entry is not None and entry[0] == etag and matches_etag(entry[1], etag):",
             "        if entry is not None:", ("tests/integration/test_manifest_index.py",)),
    # Found by the adversarial review: each was once a survivor or a bug, each has its test now.
    Mutation("retention-while-policy-unknown", "daemon/housekeeping.py",
             "        if not d.startup.policy_known or not d.is_leader:", "        if not d.is_leader:",
             ("tests/integration/test_run_policy.py::test_no_retention_runs_while_the_policy_is_unknown",)),
    Mutation("saved-as-best-unprotected", "strategies/retention.py",
             '                add(c.step, "saved as best (the metric is not known here)")', "                pass",
             ("tests/unit/test_retention.py", "tests/integration/test_run_policy.py")),
    Mutation("local-deletes-unmirrored", "daemon/housekeeping.py",
             '                protected.update({s: "not yet mirrored" for s in d.mirror.awaiting(checkpoints)})',
             "                pass", ("tests/integration/test_mirror_faults.py", "tests/integration/test_mirror.py")),
    Mutation("daemon-gone-ignored", "worker/checkpointer.py", "        if self._link.gone and not self._requests.stop:",
             "        if False:", ("tests/workers/test_daemon_gone.py",)),
    Mutation("fresh-start-when-mirror-unreadable", "daemon/resume.py",
             "            if not local:\n                raise MirrorUnreachable(",
             "            if False:\n                raise MirrorUnreachable(", ("tests/integration/test_daemon_start.py",)),
    Mutation("any-group-is-private", "storage/localfs.py",
             "    if user.pw_gid != gid or [m for m in group.gr_mem if m != user.pw_name]:\n        return False\n",
             "    return True\n",
             ("tests/hostile/test_symlink_traps.py", "tests/integration/test_run_folder_trust.py")),
    Mutation("resume-none-mixes-runs", "daemon/startup.py", "            self._refuse_to_mix_runs()", "            pass",
             ("tests/integration/test_resume_none.py", "tests/integration/test_daemon_start.py")),
    Mutation("unreadable-manifest-is-garbage", "storage/store.py",
             "if e.missing and e.manifest is None and not e.quarantined]",
             "if e.manifest is None and not e.quarantined]", ("tests/hostile/test_unreadable_manifests.py",)),
    Mutation("run-folder-not-checked", "daemon/rundir.py", "        check_run_folder(store.location.path)  # owned by us",
             "        pass  # owned by us", ("tests/integration/test_run_folder_trust.py",)),
    Mutation("upload-not-protected", "daemon/housekeeping.py",
             '                protected.update({s: "being uploaded" for s in d.mirror.reading()})', "                pass",
             ("tests/integration/test_mirror_faults.py::test_an_upload_slower_than_the_checkpoints_still_completes",)),
    Mutation("worker-exit-74-is-0", "worker/checkpointer.py",
             "            exit_io(f\"the {reason} checkpoint (step {self.progress.step}) was not saved: {error}\")",
             "            return", ("tests/workers/test_failed_saves.py",)),
    # torch.distributed jobs (issue 11)
    Mutation("commit-without-every-report", "worker/torch/dcp_storage.py",
             "        if sorted(reports) != list(range(self.world_size)):", "        if False:",
             ("tests/frameworks/test_dcp_storage.py",)),
    Mutation("agreement-ignored", "worker/torch/distributed.py", "        return bool(agreed[STOP]), reason",
             "        return stop, reason", ("tests/frameworks/test_agreement.py",)),
    Mutation("rank-rng-not-restored", "worker/torch/sharded_restore.py",
             '    _set_torch_rng(state.pop("torch_rng", None))', '    state.pop("torch_rng", None)',
             ("tests/frameworks/test_torch_ddp.py::test_interrupted_ddp_job_ends_with_the_weights_of_an_uninterrupted_one",)),
    Mutation("dcp-chunks-unchecked", "worker/torch/dcp_metadata.py", "    _check_coverage(fqn, size, chunks)\n",
             "", ("tests/frameworks/test_dcp_metadata.py",)),
    Mutation("launcher-exit-taken-as-is", "daemon/supervisor.py",
             "        meant, note = self.ranks.translate(code, launcher) if signum is None else (code, \"\")",
             "        meant, note = code, \"\"",
             ("tests/frameworks/test_torch_ddp.py::test_another_number_of_ranks_mid_epoch_is_refused_unless_the_epoch_restarts",)),
]


def copy_tree(into: Path) -> None:
    shutil.copytree(ROOT / "src", into / "src", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))


def run_tests(src: Path, tests: tuple[str, ...]) -> tuple[int, float]:
    """pytest's exit code (0 passed, 1 a test failed; anything else: the run itself broke) and seconds."""
    env = {**os.environ, "PYTHONPATH": str(src)}
    started = time.monotonic()
    done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", *tests],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=1800)
    return done.returncode, time.monotonic() - started


def apply(copy: Path, mutation: Mutation) -> None:
    path = copy / "src" / "savegame" / mutation.path
    text = path.read_text()
    count = text.count(mutation.old)
    if count != 1:
        raise SystemExit(f"mutation {mutation.name}: its text is found {count} times in {mutation.path}; "
                         "update scripts/mutate.py to the code as it is now")
    path.write_text(text.replace(mutation.old, mutation.new))


def main(names: list[str]) -> int:
    chosen = [m for m in MUTATIONS if not names or m.name in names]
    rows, survivors = [], 0
    with tempfile.TemporaryDirectory(prefix="savegame-mutate-") as tmp:
        for mutation in chosen:
            copy = Path(tmp) / mutation.name
            copy_tree(copy)
            clean, _ = run_tests(copy / "src", mutation.tests)
            if clean != 0:
                rows.append((mutation.name, "tests fail unmutated", "-"))
                survivors += 1
                continue
            apply(copy, mutation)
            code, seconds = run_tests(copy / "src", mutation.tests)
            # Caught means a test failed (exit 1); a run that broke (collection error: exit 2..4) proves nothing.
            result = "caught" if code == 1 else "SURVIVED" if code == 0 else f"run broke (pytest exit {code})"
            survivors += result != "caught"
            rows.append((mutation.name, result, f"{seconds:.0f}s"))
            print(f"{mutation.name:28} {rows[-1][1]:22} {rows[-1][2]}", flush=True)
    print("\n| mutation | result | tests took |\n|---|---|---|")
    for name, result, seconds in rows:
        print(f"| {name} | {result} | {seconds} |")
    return 1 if survivors else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
