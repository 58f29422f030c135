"""Hand-made and fuzzed hostile manifests, locally and in the S3 server: every reader (the parser,
the store, and `savegame ls/verify/prune/restore`) takes each for damage, named and kept, and none
crashes, hangs or prints a traceback."""
from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from storage_kit import RunRoot, base_manifest, cli, local_root, rows_by_step, s3_root, save_good
from savegame.errors import CorruptCheckpoint
from savegame.storage import Manifest, folder_name
from savegame.storage.manifest import parse_manifest

GOOD_STEPS = (10, 20)


def _with(folder_step: int, **changes) -> bytes:
    return json.dumps({**base_manifest(folder_step), **changes}).encode()


def _files(folder_step: int, *entries: dict) -> bytes:
    manifest = base_manifest(folder_step)
    return json.dumps({**manifest, "files": [*manifest["files"], *entries]}).encode()


def _entry(path: object, size: object = 1, checksum: object = "xxh3-128:" + "0" * 32) -> dict:
    return {"path": path, "bytes": size, "checksum": checksum}


def _text(step: int, replace: str, by: str) -> bytes:
    text = json.dumps(base_manifest(step))
    assert replace in text
    return text.replace(replace, by, 1).encode()


# id -> (builder of the manifest bytes for a step, what `ls --all` says about it)
HOSTILE = {
    "epoch-1e999": (lambda s: _text(s, '"epoch": 1', '"epoch": 1e999'), "'epoch' must be an integer"),
    "epoch-nan": (lambda s: _text(s, '"epoch": 1', '"epoch": NaN'), "'epoch' must be an integer"),
    "step-5000-digits": (lambda s: _text(s, f'"step": {s}', '"step": 1' + "0" * 5000), "not valid JSON"),
    "deeply-nested": (lambda s: _with(s, extra=json.loads("[" * 30 + "]" * 30)), "nested more than"),
    "very-deeply-nested": (lambda s: _text(s, '"epoch": 1', '"epoch": ' + "[" * 100_000 + "]" * 100_000),
                           "nested more than"),
    "files-manifest.json": (lambda s: _files(s, _entry("manifest.json")), "reserves for itself"),
    "files-QUARANTINE.json": (lambda s: _files(s, _entry("QUARANTINE.json")), "reserves for itself"),
    "files-duplicate": (lambda s: _files(s, _entry("model.bin")), "lists 'model.bin' twice"),
    "files-file-and-folder": (lambda s: _files(s, _entry("model.bin/inner")), "both as a file and as a folder"),
    "files-dotdot": (lambda s: _files(s, _entry("sub/../../outside")), "not a plain relative path"),
    "files-absolute": (lambda s: _files(s, _entry("/etc/passwd")), "not a plain relative path"),
    "files-backslash": (lambda s: _files(s, _entry("..\\outside")), "backslash"),
    "files-nul": (lambda s: _files(s, _entry("a\x00b")), "NUL"),
    "files-path-int": (lambda s: _files(s, _entry(7)), "'path' must be a string"),
    "files-negative": (lambda s: _files(s, _entry("b.bin", -1)), "'bytes' = -1 is out of range"),
    "files-huge": (lambda s: _files(s, _entry("b.bin", 10**30)), "is out of range"),
    "files-float-size": (lambda s: _files(s, _entry("b.bin", 1.5)), "'bytes' must be an integer"),
    "files-bad-checksum": (lambda s: _files(s, _entry("b.bin", 1, 17)), "'checksum' must be"),
    "files-not-a-list": (lambda s: _with(s, files={"model.bin": 1}), "'files' must be an array"),
    "files-entry-not-object": (lambda s: _with(s, files=["model.bin"]), "not an object"),
    "too-many-files": (lambda s: _with(s, files=[_entry(f"f{i}") for i in range(100_001)]), "more than the 100000"),
    "step-string": (lambda s: _with(s, step=str(s)), "'step' must be an integer"),
    "step-bool": (lambda s: _with(s, step=True), "'step' must be an integer"),
    "step-mismatch": (lambda s: _with(s, step=s + 1), "manifest says step {0}, folder says"),
    "created-bad": (lambda s: _with(s, created="2026-13-45T99:00:00Z"), "'created' = '2026-13-45T99:00:00Z'"),
    "created-year-1": (lambda s: _with(s, created="0001-01-01T00:00:00+14:00"), "between 1970"),
    "created-int": (lambda s: _with(s, created=1764130150), "'created' must be a string"),
    "reason-int": (lambda s: _with(s, reason=7), "'reason' must be a string"),
    "reason-unknown": (lambda s: _with(s, reason="x" * 20), "is not one of periodic"),
    "metrics-list": (lambda s: _with(s, metrics=[1, 2]), "'metrics' must be an object"),
    "metrics-string": (lambda s: _with(s, metrics={"val_loss": "low"}), "must be a number, not str"),
    "format-zero": (lambda s: _with(s, format=0), "'format' = 0 is out of range"),
    "format-newer": (lambda s: _with(s, format=2), "newer than this savegame reads"),
    "not-an-object": (lambda s: b"[1, 2, 3]", "must be a JSON object"),
    "null": (lambda s: b"null", "must be a JSON object"),
    "not-utf8": (lambda s: b"\xff\xfe{}", "not UTF-8"),
    "empty": (lambda s: b"", "not valid JSON"),
}
LARGE = {"local": 100 << 20, "s3": 20 << 20}  # bytes of the oversized manifest (moto keeps objects in memory)


def hostile_step(index: int) -> int:
    return 100 + index


def fill(root: RunRoot, kind: str, good: bool = True) -> dict[int, str]:
    """Good checkpoints at GOOD_STEPS, one hostile manifest per step after them; step -> expected problem."""
    store = root.store()
    for step in GOOD_STEPS if good else ():
        save_good(store, step)
    expected = {}
    for index, (name, (build, problem)) in enumerate(sorted(HOSTILE.items())):
        step = hostile_step(index)
        root.put_checkpoint(step, build(step))
        expected[step] = problem.format(step + 1)
    large = hostile_step(len(HOSTILE))
    padding = b" " * LARGE[kind]
    root.put_checkpoint(large, _with(large)[:-1] + padding + b"}")
    expected[large] = "more than the 16777216 allowed"
    return expected


@pytest.mark.unit
@pytest.mark.parametrize("name", sorted(HOSTILE))
def test_each_hostile_manifest_is_corrupt(name):
    build, problem = HOSTILE[name]
    raw = build(1200)
    try:
        manifest = parse_manifest(raw, "ckpt-000000001200")
    except CorruptCheckpoint as exc:
        assert str(exc).startswith("ckpt-000000001200: manifest")
        assert problem.format(1201) in str(exc) or name == "step-mismatch"
        return
    assert name == "step-mismatch" and manifest.step == 1201  # valid alone; the store compares it to the folder


@pytest.mark.integration
@pytest.mark.parametrize("kind", ["local", "s3"])
def test_every_command_takes_hostile_manifests_for_damage(kind, request, tmp_path: Path, savegame_env):
    root = local_root(tmp_path / "run") if kind == "local" else s3_root(request.getfixturevalue("s3_server"))
    expected = fill(root, kind)
    env = {**savegame_env, **root.env}
    before = root.files()

    rows = rows_by_step(cli(env, "ls", root.url, "--json", "--all", timeout=120))
    assert {s: r["status"] for s, r in rows.items()} == {**{s: "committed" for s in GOOD_STEPS},
                                                          **{s: "damaged" for s in expected}}
    for step, problem in expected.items():
        assert problem in rows[step]["problem"], (step, rows[step]["problem"])
    assert [r["step"] for r in json.loads(cli(env, "ls", root.url, "--json").stdout)] == list(GOOD_STEPS)
    text = cli(env, "ls", root.url).stdout
    damaged_lines = {int(line.split()[0]) for line in text.splitlines()[1:] if "DAMAGED: " in line}
    assert damaged_lines == set(expected)

    proc = cli(env, "verify", root.url, "--json", codes=[1])
    verdicts = {r["step"]: r["ok"] for r in json.loads(proc.stdout)}
    assert verdicts == {**{s: True for s in GOOD_STEPS}, **{s: False for s in expected}}

    proc = cli(env, "prune", root.url, "--keep-last", "1", "--keep-best", "0", "--json")
    assert [d["step"] for d in json.loads(proc.stdout)["delete"]] == [GOOD_STEPS[0]]
    assert root.files() == {f for f in before if not f.startswith(folder_name(GOOD_STEPS[0]))}  # damage kept

    out = tmp_path / "restored"
    proc = cli(env, "restore", root.url, "--step", str(hostile_step(0)), "--to", str(out), codes=[1])
    assert "no committed checkpoint at step" in proc.stderr
    proc = cli(env, "restore", root.url, "--latest", "--to", str(out))
    assert proc.stdout.strip().startswith(f"restored step {GOOD_STEPS[-1]} to")


@pytest.mark.integration
@pytest.mark.parametrize("supervised", [False, True])
def test_the_worker_and_the_daemon_start_past_hostile_manifests(supervised, tmp_path: Path, savegame_env):
    """A standalone worker's restore() and the daemon's start list the run folder: both resume from
    the newest good checkpoint and leave every hostile one where it is."""
    import subprocess
    import sys

    from helpers import COUNTER_WORKER, SAVEGAME as SAVEGAME_EXE

    root = local_root(tmp_path / "run")
    env = {**savegame_env, "SAVEGAME_DIR": root.url}
    first = subprocess.run([sys.executable, COUNTER_WORKER, "--steps", "20", "--every", "10"], env=env,
                           capture_output=True, text=True, timeout=120)  # real worker checkpoints at 10, 20
    assert first.returncode == 0, first.stderr[-3000:]
    expected = fill(root, "local", good=False)
    before = {f for f in root.files() if not f.startswith(".")}
    worker = [sys.executable, COUNTER_WORKER, "--steps", "25", "--every", "5"]
    command = [SAVEGAME_EXE, "run", "--dir", root.url, "--", *worker] if supervised else worker
    proc = subprocess.run(command, env=savegame_env if supervised else env, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    assert before <= root.files()  # nothing hostile was removed
    steps = [c.step for c in root.store().list()]
    assert GOOD_STEPS[-1] in steps and 25 in steps and not set(expected) & set(steps)
    assert root.store().scan().quarantined == []


# ---------------------------------------------------------------- fuzzing

NASTY = [float("inf"), float("-inf"), float("nan"), 10**30, -1, 2**63, 1e300, "", "..", "/", "manifest.json",
         "model.bin", [], {}, True]
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=12) | st.sampled_from(NASTY),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12)
TOP_KEYS = ["format", "step", "epoch", "reason", "created", "metrics", "framework", "run_id", "resumed_from",
            "files", "extra"]
ENTRY_KEYS = ["path", "bytes", "checksum", "extra"]


@st.composite
def mutated_manifests(draw, step: int = 1200) -> bytes:
    """A valid manifest with a few random changes: fields replaced by any JSON, dropped, added;
    file entries changed, dropped, added; or the bytes themselves cut or flipped."""
    data = copy.deepcopy(base_manifest(step))
    for _ in range(draw(st.integers(1, 4))):
        action = draw(st.sampled_from(["replace", "number", "drop", "entry", "add-entry", "drop-entry"]))
        if action == "replace":
            data[draw(st.sampled_from(TOP_KEYS))] = draw(json_values)
        elif action == "number":  # where a reader does arithmetic
            data[draw(st.sampled_from(["step", "epoch", "resumed_from", "format"]))] = draw(st.sampled_from(NASTY[:7]))
        elif action == "drop":
            data.pop(draw(st.sampled_from(TOP_KEYS)), None)
        elif isinstance(data.get("files"), list) and data["files"] and isinstance(data["files"][0], dict):
            if action == "entry":
                data["files"][0][draw(st.sampled_from(ENTRY_KEYS))] = draw(json_values)
            elif action == "add-entry":
                data["files"].append(_entry(draw(st.text(max_size=12)), draw(json_values)))
            else:
                data["files"][0].pop(draw(st.sampled_from(ENTRY_KEYS)), None)
    raw = json.dumps(data).encode()
    if draw(st.integers(0, 9)) == 0:
        cut = draw(st.integers(0, len(raw)))
        raw = raw[:cut] + draw(st.binary(max_size=4)) + raw[cut + 1:]
    return raw


def assert_sane(manifest: Manifest) -> None:
    """What every reader relies on once a manifest parsed."""
    assert isinstance(manifest.step, int) and 0 <= manifest.step < 10**12
    assert isinstance(manifest.epoch, int) and manifest.epoch >= 0
    assert manifest.created_at.year >= 1970
    assert all(isinstance(v, float) and v == v and abs(v) != float("inf") for v in manifest.metrics.values())
    paths = [f.path for f in manifest.files]
    assert len(set(paths)) == len(paths)
    for entry in manifest.files:
        assert isinstance(entry.bytes, int) and 0 <= entry.bytes <= 1 << 50
        assert not entry.path.startswith("/") and ".." not in entry.path.split("/") and "\\" not in entry.path
    json.dumps({"metrics": dict(manifest.metrics)}, allow_nan=False)


@pytest.mark.unit
@settings(max_examples=500, deadline=None, database=None)
@given(raw=st.one_of(mutated_manifests(), st.binary(max_size=300)))
def test_the_parser_only_ever_says_corrupt(raw):
    try:
        manifest = parse_manifest(raw, "ckpt-000000001200")
    except CorruptCheckpoint as exc:
        assert str(exc).startswith("ckpt-000000001200: manifest")
        return
    assert_sane(manifest)


@pytest.mark.integration
@pytest.mark.parametrize("kind", ["local", "s3"])
@settings(max_examples=2, deadline=None, database=None, suppress_health_check=list(HealthCheck),
          phases=[Phase.generate])  # no shrinking: each example runs the CLI
@given(batch=st.lists(mutated_manifests(), min_size=24, max_size=24))
def test_fuzzed_manifests_through_the_cli(kind, batch, request, tmp_path_factory, savegame_env):
    root = (local_root(tmp_path_factory.mktemp("fuzz") / "run") if kind == "local"
            else s3_root(request.getfixturevalue("s3_server")))
    steps = [hostile_step(i) for i in range(len(batch))]
    for step, raw in zip(steps, batch):
        root.put_checkpoint(step, raw.replace(b'"step": 1200', f'"step": {step}'.encode()))
    env = {**savegame_env, **root.env}
    rows = rows_by_step(cli(env, "ls", root.url, "--json", "--all", timeout=120))
    assert sorted(rows) == steps
    for step, row in rows.items():
        assert row["status"] in ("committed", "damaged") and (row["status"] == "committed" or row["problem"])
    proc = cli(env, "verify", root.url, "--json")
    assert sorted(r["step"] for r in json.loads(proc.stdout)) == steps
    cli(env, "prune", root.url, "--keep-last", "1", "--json", codes=[0])
