"""Review: extra invariant-breaking mutations beyond scripts/mutate.py (run: python tests/review/extra_mutations.py [NAME...]).
Survivors found: retention-while-policy-unknown (test_no_retention_runs_while_the_policy_is_unknown cannot fail:
its folder holds only the newest and a checkpoint saved as best), run-folder-not-checked (no test runs `savegame run`
on a folder another user owns or may write)."""
import os, shutil, subprocess, sys, tempfile, time
from pathlib import Path
ROOT = Path("/work/wt-review")
M = [
 ("retention-while-policy-unknown", "daemon/housekeeping.py", "        if not d.startup.policy_known:\n            return\n", "",
  ["tests/integration/test_run_policy.py"]),
 ("saved-as-best-unprotected", "strategies/retention.py", '                add(c.step, "saved as best (the metric is not known here)")', "                pass",
  ["tests/unit/test_retention.py", "tests/integration/test_run_policy.py"]),
 ("local-deletes-unmirrored", "daemon/housekeeping.py", '                protected.update({s: "not yet mirrored" for s in d.mirror.awaiting(checkpoints)})', "                pass",
  ["tests/integration/test_mirror_faults.py::test_a_mirror_outage_does_not_stop_local_retention", "tests/integration/test_mirror.py"]),
 ("daemon-gone-ignored", "worker/checkpointer.py", "        if self._link.gone and not self._requests.stop:", "        if False:",
  ["tests/workers/test_daemon_gone.py", "tests/integration/test_worker_lifecycle.py::test_kill_9_of_the_daemon_leaves_no_orphan_writing_and_no_step_twice"]),
 ("fresh-start-when-mirror-unreadable", "daemon/resume.py", "            if not local:\n                raise MirrorUnreachable(", "            if False:\n                raise MirrorUnreachable(",
  ["tests/integration/test_daemon_start.py"]),
 ("any-group-is-private", "storage/localfs.py", "    return user.pw_gid == gid and not [m for m in group.gr_mem if m != user.pw_name]", "    return True",
  ["tests/hostile/test_symlink_traps.py"]),
 ("resume-none-mixes-runs", "daemon/startup.py", "            self._refuse_to_mix_runs()", "            pass",
  ["tests/integration/test_daemon_start.py", "tests/integration/test_run_policy.py"]),
 ("unreadable-manifest-is-garbage", "storage/store.py", "if e.missing and e.manifest is None and not e.quarantined]", "if e.manifest is None and not e.quarantined]",
  ["tests/hostile/test_unreadable_manifests.py"]),
 ("run-folder-not-checked", "daemon/rundir.py", "        check_run_folder(store.location.path)  # owned by us", "        pass  # owned by us",
  ["tests/hostile/test_symlink_traps.py", "tests/integration/test_daemon_start.py"]),
 ("worker-exit-74-is-0", "worker/checkpointer.py", "            exit_io(f\"the {reason} checkpoint (step {self.progress.step}) was not saved: {error}\")", "            return",
  ["tests/workers/test_failed_saves.py"]),
]
names = sys.argv[1:]
for name, path, old, new, tests in M:
    if names and name not in names: continue
    with tempfile.TemporaryDirectory(prefix="mut-") as tmp:
        shutil.copytree(ROOT / "src", Path(tmp) / "src", ignore=shutil.ignore_patterns("__pycache__"))
        f = Path(tmp) / "src/savegame" / path
        t = f.read_text()
        assert t.count(old) == 1, (name, t.count(old))
        f.write_text(t.replace(old, new))
        env = {**os.environ, "PYTHONPATH": str(Path(tmp) / "src")}
        s = time.monotonic()
        r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", *tests], cwd=ROOT, env=env, capture_output=True, text=True, timeout=1500)
        tail = [l for l in r.stdout.splitlines() if l.startswith(("FAILED", "ERROR")) or " passed" in l or " failed" in l][-2:]
        print(f"{name:36} {'SURVIVED' if r.returncode == 0 else 'caught'} {time.monotonic()-s:.0f}s {tail}", flush=True)
