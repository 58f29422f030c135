"""The inspection commands (ls, verify, prune, restore) as a user runs them: the real executable in a
subprocess, against local folders and a real S3 server. Exit codes: 0 ok, 1 damage or failure,
2 usage, 78 configuration."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from savegame.storage import CheckpointStore

pytestmark = pytest.mark.integration

SAVEGAME = str(Path(sys.executable).parent / "savegame")
COMMANDS = ("ls", "verify", "prune", "restore")
ACC = {100: 0.71, 200: 0.93, 300: 0.88, 400: 0.90, 500: 0.85}


def cli(env: dict, *args: str) -> subprocess.CompletedProcess:
    proc = subprocess.run([SAVEGAME, *args], env=env, capture_output=True, text=True, timeout=60)
    assert "Traceback" not in proc.stderr and "Traceback" not in proc.stdout, proc.stderr
    return proc


def fill(store: CheckpointStore) -> None:
    for step, acc in ACC.items():
        with store.begin(step) as staged:
            staged.write_bytes("model.bin", bytes([step // 100]) * (64 << 10))
            staged.write_bytes("rng/state.json", json.dumps({"step": step}).encode())
            staged.commit(epoch=step // 100, reason="best" if step == 200 else "periodic",
                          metrics={"val_acc": acc, "val_loss": 1 - acc}, framework="torch")


@pytest.fixture
def run_dir(tmp_path: Path) -> Path:
    root = tmp_path / "run"
    fill(CheckpointStore(str(root)))
    return root


def restore_args(command: str) -> list[str]:
    return ["--latest", "--to", "/nonexistent-parent/should-not-be-created"] if command == "restore" else []


# ---------------------------------------------------------------- bad input to every command

def assert_fails(proc: subprocess.CompletedProcess, code: int, *words: str) -> None:
    assert proc.returncode == code, (proc.returncode, proc.stdout, proc.stderr)
    assert proc.stderr.strip(), "no message"
    assert all(w in proc.stderr for w in words), proc.stderr
    assert len(proc.stderr.strip().splitlines()) <= 10, proc.stderr


@pytest.mark.parametrize("command", COMMANDS)
def test_missing_folder(command, tmp_path, savegame_env):
    missing = tmp_path / "no-such-run"
    proc = cli(savegame_env, command, str(missing), *restore_args(command))
    assert_fails(proc, 78, "savegame: configuration error:", str(missing), "does not exist")
    assert not missing.exists()


@pytest.mark.parametrize("command", COMMANDS)
def test_unknown_protocol(command, savegame_env):
    proc = cli(savegame_env, command, "s4://bucket/run", *restore_args(command))
    assert_fails(proc, 78, "s4://bucket/run", "unknown protocol 's4'", "s3://")


@pytest.mark.parametrize("command", COMMANDS)
def test_protocol_whose_package_is_missing(command, savegame_env):
    proc = cli(savegame_env, command, "gs://bucket/run", *restore_args(command))
    assert_fails(proc, 78, "gs://", "gcsfs", "pip install gcsfs")


def test_credentials_in_a_url_are_refused_and_not_echoed(savegame_env):
    proc = cli(savegame_env, "ls", "s3://AKIAXXXX:topsecret@bucket/run")
    assert_fails(proc, 78, "credentials in the URL are not accepted")
    assert "topsecret" not in proc.stderr


@pytest.mark.parametrize("args, words", [
    (["verify", "{run}", "--step", "999"], ["no checkpoint at step 999", "savegame ls"]),
    (["restore", "{run}", "--step", "999", "--to", "{out}"], ["no committed checkpoint at step 999"]),
])
def test_unknown_step(args, words, run_dir, tmp_path, savegame_env):
    out = tmp_path / "restored"
    proc = cli(savegame_env, *[a.format(run=run_dir, out=out) for a in args])
    assert_fails(proc, 1, *words)
    assert not (out / "ckpt-000000000999").exists()


def test_restore_from_an_empty_run(tmp_path, savegame_env):
    (tmp_path / "empty").mkdir()
    proc = cli(savegame_env, "restore", str(tmp_path / "empty"), "--latest", "--to", str(tmp_path / "out"))
    assert_fails(proc, 1, "no committed checkpoint to restore")


@pytest.mark.parametrize("args, words", [
    (["ls", "{run}", "--bogus"], ["unrecognized arguments: --bogus"]),
    (["prune", "{run}", "--keep-l", "3"], ["unrecognized arguments: --keep-l"]),  # no abbreviations
    (["ls"], ["required: DIR_OR_URL"]),
    (["verify", "{run}", "--step", "abc"], ["--step", "invalid int value: 'abc'"]),
    (["verify", "{run}", "--json", "extra"], ["unrecognized arguments: extra"]),
    (["prune", "{run}", "--keep-last", "many"], ["--keep-last", "invalid int value"]),
    (["prune", "{run}", "--regime", "forever"], ["--regime", "invalid choice: 'forever'"]),
    (["prune", "{run}", "--mode", "sideways"], ["--mode", "invalid choice"]),
    (["restore", "{run}", "--latest"], ["required: --to"]),
    (["restore", "{run}", "--to", "{out}"], ["one of the arguments --latest --best --step is required"]),
    (["restore", "{run}", "--latest", "--best", "--to", "{out}"], ["not allowed with argument"]),
    (["restore", "{run}", "--step", "--to", "{out}"], ["--step", "expected one argument"]),
    (["frobnicate", "{run}"], ["invalid choice: 'frobnicate'"]),
    ([], ["required: command"]),
])
def test_bad_flags_are_usage_errors(args, words, run_dir, tmp_path, savegame_env):
    out = tmp_path / "restored"
    proc = cli(savegame_env, *[a.format(run=run_dir, out=out) for a in args])
    assert_fails(proc, 2, "usage: savegame", "savegame: error:", *words)
    assert not out.exists()


@pytest.mark.parametrize("command", ["ls", "prune"])
@pytest.mark.parametrize("toml, words", [
    ("[keep]\nlst = 3\n", ["unknown key 'keep.lst'", "did you mean 'keep.last'", "allowed:"]),
    ("regime = 'forever'\n", ["regime = 'forever'", "must be one of short, normal, long"]),
    ("[retention]\nlast = 3\n", ["unknown key 'retention'"]),
    ("[keep\nlast = 3\n", ["is not valid TOML"]),
])
def test_bad_config_file(command, toml, words, run_dir, tmp_path, savegame_env):
    config = tmp_path / "savegame.toml"
    config.write_text(toml)
    proc = cli(savegame_env, command, str(run_dir), "--config", str(config))
    assert_fails(proc, 78, "savegame: configuration error:", str(config), *words)
    assert len(CheckpointStore(str(run_dir)).list()) == len(ACC)  # prune did nothing


def test_missing_config_file_and_bad_flag_values(run_dir, tmp_path, savegame_env):
    proc = cli(savegame_env, "ls", str(run_dir), "--config", str(tmp_path / "nope.toml"))
    assert_fails(proc, 78, "nope.toml does not exist")
    proc = cli(savegame_env, "prune", str(run_dir), "--keep-last", "-1")
    assert_fails(proc, 78, "command line: keep.last = -1", "integer >= 0")
    proc = cli(savegame_env, "restore", str(run_dir), "--best", "--to", str(tmp_path / "out"))
    assert_fails(proc, 78, "--best needs --monitor")
    assert len(CheckpointStore(str(run_dir)).list()) == len(ACC)


def test_restore_only_into_a_local_folder(run_dir, savegame_env):
    proc = cli(savegame_env, "restore", str(run_dir), "--latest", "--to", "memory://elsewhere/run")
    assert_fails(proc, 78, "--to must be a local folder")


# ---------------------------------------------------------------- the JSON outputs

def test_ls_json(run_dir, savegame_env):
    proc = cli(savegame_env, "ls", str(run_dir), "--json")
    assert proc.returncode == 0, proc.stderr
    rows = json.loads(proc.stdout)
    assert [r["step"] for r in rows] == sorted(ACC)  # oldest first
    for row in rows:
        assert {"step", "epoch", "reason", "metrics", "created", "bytes", "path"} <= set(row)
        assert row["epoch"] == row["step"] // 100
        assert row["reason"] == ("best" if row["step"] == 200 else "periodic")
        assert row["metrics"] == {"val_acc": ACC[row["step"]], "val_loss": 1 - ACC[row["step"]]}
        assert row["bytes"] == (64 << 10) + len(json.dumps({"step": row["step"]}))
        assert row["path"] == str(run_dir / f"ckpt-{row['step']:012d}")
        assert row["created"].endswith("Z") and row["created"][:4].isdigit()
    text = cli(savegame_env, "ls", str(run_dir))
    assert text.returncode == 0
    assert text.stdout.splitlines()[0].split()[:3] == ["STEP", "EPOCH", "REASON"]
    assert len(text.stdout.splitlines()) == 1 + len(ACC)


def test_ls_of_an_empty_run(tmp_path, savegame_env):
    (tmp_path / "empty").mkdir()
    assert cli(savegame_env, "ls", str(tmp_path / "empty"), "--json").stdout.strip() == "[]"
    assert cli(savegame_env, "ls", str(tmp_path / "empty")).stdout.strip() == "no checkpoints"


def test_verify_json(run_dir, savegame_env):
    proc = cli(savegame_env, "verify", str(run_dir), "--json")
    assert proc.returncode == 0, proc.stderr
    rows = json.loads(proc.stdout)
    assert [(r["step"], r["ok"], r["problems"]) for r in rows] == [(s, True, []) for s in sorted(ACC)]
    one = json.loads(cli(savegame_env, "verify", str(run_dir), "--step", "300", "--json").stdout)
    assert [r["step"] for r in one] == [300]


def test_prune_dry_run_json_then_prune(run_dir, savegame_env):
    flags = ["--keep-last", "2", "--keep-best", "1", "--monitor", "val_acc", "--mode", "max"]
    proc = cli(savegame_env, "prune", str(run_dir), *flags, "--dry-run", "--json")
    assert proc.returncode == 0, proc.stderr
    plan = json.loads(proc.stdout)
    assert set(plan) >= {"keep", "delete"}
    assert [k["step"] for k in plan["keep"]] == [200, 400, 500]
    assert all(isinstance(k["why"], list) and k["why"] for k in plan["keep"])
    assert "best 1 by val_acc (max)" in plan["keep"][0]["why"] and "newest" in plan["keep"][2]["why"]
    assert [d["step"] for d in plan["delete"]] == [100, 300]
    assert all(d["path"].endswith(f"ckpt-{d['step']:012d}") for d in plan["delete"])
    assert [c.step for c in CheckpointStore(str(run_dir)).list()] == sorted(ACC)  # a dry run deletes nothing

    proc = cli(savegame_env, "prune", str(run_dir), *flags, "--json")
    assert proc.returncode == 0, proc.stderr
    assert [d["step"] for d in json.loads(proc.stdout)["delete"]] == [100, 300]
    assert proc.stderr == ""  # the deletions are the output; stderr is for problems
    assert [c.step for c in CheckpointStore(str(run_dir)).list()] == [200, 400, 500]
    again = json.loads(cli(savegame_env, "prune", str(run_dir), *flags, "--json").stdout)
    assert again["delete"] == []


def test_prune_dry_run_shows_the_leftovers_it_would_collect(run_dir, savegame_env):
    """A stale staging folder and a half-deleted checkpoint (no manifest) are shown by --dry-run,
    in text and JSON, and only a real prune removes them."""
    import os
    import time

    staging = run_dir / ".staging" / "ckpt-000000000600.otherhost.123.abcd1234"
    staging.mkdir(parents=True)
    (staging / "model.bin").write_bytes(b"half a save")
    half_deleted = run_dir / "ckpt-000000000050"
    half_deleted.mkdir()
    (half_deleted / "model.bin").write_bytes(b"payload left behind")
    old = time.time() - 7200
    for path in (staging, staging / "model.bin", half_deleted, half_deleted / "model.bin"):
        os.utime(path, (old, old))
    leftovers = [".staging/ckpt-000000000600.otherhost.123.abcd1234", "ckpt-000000000050"]

    dry = json.loads(cli(savegame_env, "prune", str(run_dir), "--dry-run", "--json").stdout)
    assert sorted(dry["collect"]) == sorted(leftovers) and dry["collected"] == []
    text = cli(savegame_env, "prune", str(run_dir), "--dry-run").stdout
    assert all(f"would remove stale staging {path}" in text for path in leftovers), text
    assert staging.exists() and half_deleted.exists()

    done = json.loads(cli(savegame_env, "prune", str(run_dir), "--json").stdout)
    assert sorted(done["collected"]) == sorted(leftovers)
    assert not staging.exists() and not half_deleted.exists()
    assert json.loads(cli(savegame_env, "prune", str(run_dir), "--dry-run", "--json").stdout)["collect"] == []


def test_prune_with_a_regime_and_a_config_file(run_dir, tmp_path, savegame_env):
    config = tmp_path / "savegame.toml"
    config.write_text('regime = "short"\nmonitor = "val_loss"\n')
    proc = cli(savegame_env, "prune", str(run_dir), "--config", str(config), "--dry-run", "--json")
    assert [k["step"] for k in json.loads(proc.stdout)["keep"]] == [200, 500]  # the best (lowest loss), the latest
    proc = cli(savegame_env, "prune", str(run_dir), "--config", str(config), "--keep-last", "3", "--dry-run", "--json")
    assert [k["step"] for k in json.loads(proc.stdout)["keep"]] == [200, 300, 400, 500]  # the flag wins


@pytest.mark.parametrize("which, step", [(["--latest"], 500), (["--best", "--monitor", "val_acc"], 200),
                                         (["--best", "--monitor", "val_loss"], 200), (["--step", "300"], 300)])
def test_restore_then_verify_the_copy(which, step, run_dir, tmp_path, savegame_env):
    out = tmp_path / "restored"
    proc = cli(savegame_env, "restore", str(run_dir), *which, "--to", str(out))
    assert proc.returncode == 0, proc.stderr
    folder = f"ckpt-{step:012d}"
    assert proc.stdout.strip() == f"restored step {step} to {out / folder}"
    assert cli(savegame_env, "verify", str(out)).returncode == 0
    copy = CheckpointStore(str(out))
    assert [c.step for c in copy.list()] == [step]
    assert copy.get(step).manifest == CheckpointStore(str(run_dir)).get(step).manifest
    assert (out / folder / "model.bin").read_bytes() == (run_dir / folder / "model.bin").read_bytes()
    again = cli(savegame_env, "restore", str(run_dir), *which, "--to", str(out))
    assert_fails(again, 1, "already a committed checkpoint")


def test_restore_refuses_a_damaged_checkpoint(run_dir, tmp_path, savegame_env):
    model = run_dir / "ckpt-000000000500" / "model.bin"
    data = bytearray(model.read_bytes())
    data[100] ^= 1
    model.write_bytes(bytes(data))
    out = tmp_path / "restored"
    proc = cli(savegame_env, "restore", str(run_dir), "--latest", "--to", str(out))
    assert_fails(proc, 1, "model.bin does not match its manifest; not copied")
    assert CheckpointStore(str(out)).list() == []


# ---------------------------------------------------------------- against the S3 server

@pytest.fixture
def s3_run(s3_server, savegame_env):
    bucket = s3_server.make_bucket()
    url = f"s3://{bucket}/experiment"
    fill(CheckpointStore(url, s3_server.storage_options))
    return url, {**savegame_env, **s3_server.env}


def test_s3_ls_verify_prune_restore(s3_run, s3_server, tmp_path):
    url, env = s3_run
    rows = json.loads(cli(env, "ls", url, "--json").stdout)
    assert [r["step"] for r in rows] == sorted(ACC)
    assert rows[0]["path"] == f"{url}/ckpt-000000000100" and rows[0]["bytes"] > 64 << 10

    proc = cli(env, "verify", url, "--json")
    assert proc.returncode == 0, proc.stderr
    assert all(r["ok"] for r in json.loads(proc.stdout))

    import s3fs
    fs = s3fs.S3FileSystem(**s3_server.storage_options, skip_instance_cache=True)
    fs.pipe_file(f"{url}/ckpt-000000000300/model.bin", b"\x03" * 100)  # truncated
    proc = cli(env, "verify", url)
    assert proc.returncode == 1
    assert "step 300: DAMAGED: model.bin: 100 bytes, the manifest says 65536 (truncated)" in proc.stdout

    plan = json.loads(cli(env, "prune", url, "--keep-last", "1", "--dry-run", "--json").stdout)
    assert [d["step"] for d in plan["delete"]] == [100, 400]  # 200 was saved as best: no metric here says otherwise
    proc = cli(env, "prune", url, "--keep-last", "1", "--json")
    assert proc.returncode == 0, proc.stderr
    assert [r["step"] for r in json.loads(cli(env, "ls", url, "--json").stdout)] == [200, 300, 500]  # damaged kept

    out = tmp_path / "restored"
    proc = cli(env, "restore", url, "--latest", "--to", str(out))
    assert proc.returncode == 0, proc.stderr
    assert cli(env, "verify", str(out)).returncode == 0
    assert (out / "ckpt-000000000500" / "model.bin").read_bytes() == b"\x05" * (64 << 10)
    assert_fails(cli(env, "restore", url, "--step", "300", "--to", str(out)), 1, "does not match its manifest")


def test_s3_missing_bucket(s3_server, savegame_env):
    env = {**savegame_env, **s3_server.env}
    for command in ("ls", "verify", "prune"):
        assert_fails(cli(env, command, "s3://no-such-bucket-here/run"), 78, "does not exist")
