"""Seeing a run, from a real daemon's real run: its records (attempts.jsonl, history.jsonl), `savegame
history | report | plot`, goodput in `savegame status`, and its Prometheus metrics (a real HTTP GET of
the endpoint on 127.0.0.1, at a port the OS chose, and the textfile)."""
import csv
import fcntl
import io
import json
import os
import pty
import shutil
import socket
import struct
import subprocess
import termios
import urllib.request
from pathlib import Path

import pytest

from helpers import SAVEGAME, Daemon, clean_env, counter, savegame, wait_until

pytestmark = pytest.mark.integration
PNG = b"\x89PNG\r\n\x1a\n"


def scrape(url: str) -> dict[str, float]:
    """The endpoint's samples, by their name and labels as written."""
    with urllib.request.urlopen(url, timeout=10) as response:
        assert response.status == 200
        text = response.read().decode()
    return parse_samples(text)


def parse_samples(text: str) -> dict[str, float]:
    samples = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            samples[name] = float(value)
    return samples


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """One run: 40 steps, a checkpoint every 5 (the loss improves at each epoch: "best"), keep the last
    2; the first attempt crashes at step 23 and the second resumes from 20 and pauses at step 35 (so
    the metrics are scraped from a running daemon). Mirrored to a second folder."""
    root = tmp_path_factory.mktemp("see")
    bucket = root / "bucket"
    daemon = Daemon(root / "run", counter("--steps", 40, "--every", 5, "--epoch-steps", 5, "--metric",
                                          "--crash-once-at", 23, "--pause-at", 35, "--pause-for", 1.5,
                                          "--sleep", 0.01),
                    ["--keep-last", "2", "--metrics", "127.0.0.1:0", "--metrics-textfile", str(root / "m.prom"),
                     "--mirror", str(bucket)])
    Daemon.started.remove(daemon.start())  # it outlives each test: stopped at the module's end
    try:
        url = wait_until(lambda: (daemon.status() or {}).get("metrics_url"), timeout=30)
        live = wait_until(lambda: (lambda s: s if s.get('savegame_attempt{run="run"}') == 2
                                   and s.get('savegame_worker_up{run="run"}') == 1 else None)(scrape(url)),
                          timeout=30, interval=0.05)
        assert daemon.wait(timeout=60) == 0, daemon.stderr
        yield root, daemon, url, live
    finally:
        daemon.kill()


def lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_the_daemon_appends_each_attempt_and_itself_to_the_run_folder(run):
    root, _, _, _ = run
    records = lines(root / "run" / ".savegame" / "attempts.jsonl")
    assert [r["kind"] for r in records] == ["attempt", "attempt", "daemon"]
    first, second, daemon = records
    assert (first["attempt"], first["cause"], first["exit_code"], first["last_step"], first["restarted"]) == \
        (1, "crash", 3, 23, True)
    assert (second["attempt"], second["cause"], second["resumed_from"], second["last_step"]) == (2, "finished", 20, 40)
    assert second["saves"] >= 4 and second["stall_s"] > 0
    assert daemon["exit_code"] == 0 and daemon["started"] <= first["spawned"] < second["ended"] <= daemon["ended"]


def test_history_lists_every_commit_and_why_the_pruned_ones_went(run):
    root, _, _, _ = run
    result = savegame("history", str(root / "run"), "--json")
    assert result.returncode == 0, result.stderr
    rows = {r["step"]: r for r in json.loads(result.stdout)}
    assert sorted(rows) == [5, 10, 15, 20, 25, 30, 35, 40]
    assert {s for s, r in rows.items() if r["status"] == "kept"} == {35, 40}
    pruned = rows[20]
    assert pruned["status"] == "pruned" and pruned["reason"] == "best" and pruned["attempt"] == 1
    assert pruned["metrics"] == {"loss": 0.05} and "last 2" in pruned["why"][0]
    assert rows[25]["attempt"] == 2 and rows[5]["reason"] == "periodic"
    table = savegame("history", str(root / "run"), "--csv")
    parsed = list(csv.DictReader(io.StringIO(table.stdout)))
    assert [int(r["step"]) for r in parsed] == sorted(rows) and parsed[1]["loss"] == "0.1"
    assert parsed[0]["status"] == "pruned" and parsed[-1]["status"] == "kept"


def test_the_mirror_keeps_the_history_beside_the_checkpoints(run):
    root, _, _, _ = run
    result = savegame("history", str(root / "bucket"), "--json")
    assert result.returncode == 0, result.stderr
    rows = {r["step"]: r for r in json.loads(result.stdout)}
    assert sorted(rows) == [5, 10, 15, 20, 25, 30, 35, 40]  # the ones never uploaded or pruned there too
    assert rows[40]["status"] == "kept" and rows[10]["status"] == "pruned"


def test_report_and_status_tell_the_goodput(run):
    root, _, _, _ = run
    result = savegame("report", str(root / "run"), "--json")
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    assert data["attempts"] == 2 and data["daemons"] == 1 and data["restarts"] == {"crash": 1}
    assert data["lost_steps"] == 3  # reached 23, resumed from 20
    assert 0 < data["goodput"] < 1 and data["seconds"]["redone"] > 0 and data["seconds"]["restarts"] > 0
    assert data["total_s"] == pytest.approx(sum(data["seconds"].values()))
    assert data["checkpoints"]["committed"] == 8 and data["checkpoints"]["kept"] == 2
    assert data["checkpoints"]["pruned"] == 6 and data["checkpoints"]["by_reason"]["best"] >= 6
    text = savegame("report", str(root / "run")).stdout
    assert "goodput:" in text and "crash (exit 3)" in text and "3 steps" in text
    status = savegame("status", str(root / "run"))
    assert status.returncode == 0 and f"goodput:         {data['goodput'] * 100:.1f}%" in status.stdout


def test_the_metrics_endpoint_and_textfile(run):
    root, daemon, url, live = run
    assert url.startswith("http://127.0.0.1:") and not url.endswith(":0/metrics")
    assert live['savegame_checkpoints_committed_total{reason="best",run="run"}'] >= 3  # 10, 15, 20 by attempt 1
    assert live['savegame_restarts_total{cause="crash",run="run"}'] == 1
    assert live['savegame_work_lost_steps_total{run="run"}'] == 3
    assert live['savegame_state{run="run",state="running"}'] == 1
    assert live['savegame_last_checkpoint_age_seconds{run="run"}'] >= 0
    assert 0 < live['savegame_goodput_ratio{run="run"}'] <= 1
    assert 'savegame_mirror_pending_checkpoints{run="run"}' in live
    final = parse_samples((root / "m.prom").read_text())  # written at the end
    assert final['savegame_state{run="run",state="succeeded"}'] == 1
    assert final['savegame_checkpoints_committed_total{reason="best",run="run"}'] + \
        final['savegame_checkpoints_committed_total{reason="periodic",run="run"}'] == 8
    assert final['savegame_checkpoints_pruned_total{run="run",tier="local"}'] == 6
    assert final['savegame_checkpoints_written_bytes_total{run="run"}'] > 8 * 2**20
    with pytest.raises(OSError):  # the endpoint went with the daemon
        urllib.request.urlopen(url, timeout=2)


def test_plot_renders_the_run(run):
    root, _, _, _ = run
    out = root / "run.png"
    result = savegame("plot", str(root / "run"), "--out", str(out))
    assert result.returncode == 0, result.stderr
    assert "8 checkpoints, 2 attempts (1 ended early), loss" in result.stdout
    data = out.read_bytes()
    assert data.startswith(PNG)
    width, height = struct.unpack(">II", data[16:24])
    assert (width, height) == (1210, 880)  # 11 x 8 inches at 110 dpi
    assert savegame("plot", str(root / "run"), "--out", str(root / "run.txt")).returncode == 78


def test_bad_metrics_settings_exit_78_in_one_line(tmp_path):
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    port = taken.getsockname()[1]
    try:
        for flags, words in ((["--metrics", "localhost"], "HOST:PORT"),
                             (["--metrics-textfile", str(tmp_path / "m.txt")], ".prom"),
                             (["--metrics", f"127.0.0.1:{port}"], "cannot listen there")):
            result = savegame("run", "--dir", str(tmp_path / "r"), *flags, "--", "python", "-c", "pass")
            assert result.returncode == 78, result.stderr
            errors = [line for line in result.stderr.splitlines() if "error" in line]
            assert len(errors) == 1 and words in errors[0] and "Traceback" not in result.stderr, result.stderr
    finally:
        taken.close()


def test_a_killed_daemons_attempt_is_recorded_by_the_next_daemon(tmp_path):
    """SIGKILL leaves no record but the status file: the next daemon appends what it was doing."""
    worker = counter("--steps", 60, "--every", 5, "--sleep", 0.02)
    first = Daemon(tmp_path / "run", worker).start()
    first.ready()
    wait_until(lambda: ((first.status() or {}).get("last_checkpoint") or {}).get("step", 0) >= 10, timeout=30)
    first.kill()
    second = Daemon(tmp_path / "run", worker).start()
    assert second.wait(timeout=60) == 0, second.stderr
    records = lines(tmp_path / "run" / ".savegame" / "attempts.jsonl")
    assert [(r["kind"], r.get("cause")) for r in records] == [
        ("attempt", "daemon-lost"), ("daemon", None), ("attempt", "finished"), ("daemon", None)]
    assert records[1]["pid"] == first.proc.pid and records[3]["pid"] == second.proc.pid
    assert records[2]["attempt"] == 2 and records[2]["resumed_from"] >= 10
    data = json.loads(savegame("report", str(tmp_path / "run"), "--json").stdout)
    assert data["daemons"] == 2 and data["attempts"] == 2 and data["down_s"] >= 0
    assert data["lost_steps"] == records[0]["last_step"] - records[2]["resumed_from"]


def test_a_garbled_or_torn_record_line_is_left_out_and_said(run, tmp_path):
    root, _, _, _ = run
    copy = tmp_path / "run"
    shutil.copytree(root / "run", copy)
    with open(copy / ".savegame" / "history.jsonl", "a") as f:
        f.write('not json\n{"kind": "prune", "step": -1, "tier": "local", "time": 1}\n{"kind": "commit", "st')
    with open(copy / ".savegame" / "attempts.jsonl", "a") as f:
        f.write('{"kind": "attempt", "attempt": "x"}\n')
    result = savegame("history", str(copy), "--json")
    assert result.returncode == 0 and "2 lines of the run's history could not be read" in result.stderr
    assert len(json.loads(result.stdout)) == 8
    data = json.loads(savegame("report", str(copy), "--json").stdout)
    assert data["records_skipped"] == 3 and data["attempts"] == 2


def on_a_terminal(*args: str) -> tuple[int, str, str]:
    """Run savegame with its stderr on a real pty; (exit code, stdout, what the terminal got)."""
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 80, 0, 0))  # a terminal 80 columns wide
    try:
        proc = subprocess.run([SAVEGAME, *args], stdout=subprocess.PIPE, stderr=slave, env=clean_env(),
                              text=True, timeout=60)
        os.close(slave)
        slave = -1
        seen = b""
        while True:
            try:
                chunk = os.read(master, 65536)
            except OSError:  # EIO: the terminal's other end is closed and drained
                break
            if not chunk:
                break
            seen += chunk
    finally:
        if slave >= 0:
            os.close(slave)
        os.close(master)
    return proc.returncode, proc.stdout, seen.decode(errors="replace")


def test_restore_and_verify_draw_a_progress_bar_on_a_terminal_only(run, tmp_path):
    root, _, _, _ = run
    code, out, terminal = on_a_terminal("restore", str(root / "run"), "--latest", "--to", str(tmp_path / "a"))
    assert code == 0 and "restored step 40" in out
    assert "restoring step 40" in terminal and "|" in terminal, terminal  # tqdm's bar, drawn on stderr
    code, out, terminal = on_a_terminal("verify", str(root / "run"))
    assert code == 0 and "step 40: ok" in out and "verifying 2 checkpoint(s)" in terminal, terminal
    piped = savegame("restore", str(root / "run"), "--latest", "--to", str(tmp_path / "b"))
    assert piped.returncode == 0 and piped.stderr == ""  # not a terminal: nothing drawn
    piped = savegame("verify", str(root / "run"))
    assert piped.returncode == 0 and piped.stderr == ""


def test_the_history_in_an_s3_bucket(tmp_path, s3_server):
    """The mirror stores the history in the bucket; `savegame history s3://...` reads it from there,
    with the steps the bucket's own retention deleted."""
    url = f"s3://{s3_server.make_bucket()}/run"
    config = tmp_path / "savegame.toml"
    config.write_text("[mirror_keep]\nlast = 1\n")
    daemon = Daemon(tmp_path / "run", counter("--steps", 20, "--every", 5),
                    ["--config", str(config), "--mirror", url, "--keep-last", "2"], env=s3_server.env).start()
    assert daemon.wait(timeout=60) == 0, daemon.stderr
    result = savegame("history", url, "--json", env=s3_server.env)
    assert result.returncode == 0, result.stderr
    rows = {r["step"]: r for r in json.loads(result.stdout)}
    assert sorted(rows) == [5, 10, 15, 20] and rows[20]["status"] == "kept"
    why = {s: (r["status"], r["why"]) for s, r in rows.items()}
    assert all(rows[s]["status"] == "pruned" and "local" in {p["tier"] for p in rows[s]["pruned"]}
               for s in (5, 10)), why  # by local retention (last 2)
    # 15 is kept locally; the bucket (last 1) either deleted it, or never took it once 20 was there
    assert why[15][0] == "pruned" and "mirror" in why[15][1][-1] or why[15][0] == "gone" and \
        "never uploaded" in why[15][1][0], why


@pytest.mark.parametrize("ledger", [
    {"daemon": {"pid": 7, "started": 5.0}, "attempt": {"attempt": "x", "spawned": "soon", "ready": True}},
    {"daemon": {"pid": 7, "started": "x"}, "attempt": [1]}, [1, 2], "junk"])
def test_a_garbled_ledger_in_the_last_status_never_stops_the_next_daemon(tmp_path, ledger):
    state = tmp_path / "run" / ".savegame"
    state.mkdir(parents=True)
    (state / "status.json").write_text(json.dumps({"state": "running", "updated": 9.0, "ledger": ledger}))
    daemon = Daemon(tmp_path / "run", counter("--steps", 5, "--every", 5)).start()
    assert daemon.wait(timeout=60) == 0, daemon.stderr
    assert "internal error" not in daemon.stderr and "Traceback" not in daemon.stderr
    records = lines(state / "attempts.jsonl")
    assert [r["kind"] for r in records][-2:] == ["attempt", "daemon"] and records[-1]["pid"] == daemon.proc.pid
    assert all(r.get("cause") != "daemon-lost" for r in records)  # a garbled attempt is not made up


def test_without_the_optional_packages_a_clear_line_and_78(run, tmp_path):
    root, _, _, _ = run
    shadow = tmp_path / "shadow"  # matplotlib and prometheus_client, not installed
    shadow.mkdir()
    for name in ("matplotlib", "prometheus_client"):
        (shadow / f"{name}.py").write_text("raise ImportError('not installed')\n")
    env = {"PYTHONPATH": os.pathsep.join(filter(None, [str(shadow), os.environ.get("PYTHONPATH")]))}
    result = savegame("plot", str(root / "run"), "--out", str(tmp_path / "x.png"), env=env)
    assert result.returncode == 78 and "pip install 'savegame[plot]'" in result.stderr, result.stderr
    assert not (tmp_path / "x.png").exists()
    result = savegame("run", "--dir", str(tmp_path / "r"), "--metrics", "127.0.0.1:0", "--", "python", "-c", "pass",
                      env=env)
    assert result.returncode == 78 and "pip install 'savegame[metrics]'" in result.stderr, result.stderr
