"""The Hugging Face Trainer on savegame (savegame.hf), real training of a tiny ViT on the MNIST subset:
interrupted under the real daemon (a SIGKILLed worker, then a SIGTERM and a new daemon) it ends with
the weights of an uninterrupted run, bit for bit; metric_for_best_model / greater_is_better decide
which checkpoint retention keeps as the best and `savegame export --best` writes; nothing pickled is
ever written; the Trainer's own checkpoints and a bare trainer.train() are refused in one line."""
from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from helpers import Daemon, savegame, wait_until
from savegame.storage import CheckpointStore

pytestmark = pytest.mark.frameworks
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # before transformers reads it: nothing is ever downloaded
pytest.importorskip("transformers")
pytest.importorskip("accelerate")

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
EXAMPLE = str(EXAMPLES / "hf_trainer_tiny.py")
ARGS = ["--epochs", "3", "--limit-batches", "16", "--batch-size", "32", "--seed", "2", "--log-every", "1"]
HASH = re.compile(r"^final-weights-sha256 ([0-9a-f]{64})$", re.M)
EVAL = re.compile(r"^epoch (\d+)/\d+: eval_loss (\S+) eval_accuracy (\S+)$", re.M)
PICKLES = {".pth", ".pt", ".bin", ".pkl", ".pickle", ".ckpt", ".npy", ".npz"}
OFFLINE = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}


def steps(text: str) -> list[int]:
    return [int(m) for m in re.findall(r"^step (\d+) ", text, re.M)]


def pickles_under(folder: Path) -> list[Path]:
    return [p for p in folder.rglob("*") if p.suffix in PICKLES]


def test_interrupted_under_the_daemon_ends_like_an_uninterrupted_run(tmp_path: Path) -> None:
    # 40 steps an epoch: room for the kill and the stop to land mid-epoch on a busy machine
    args = ["--epochs", "3", "--limit-batches", "40", "--batch-size", "16", "--seed", "2", "--log-every", "1"]
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("SAVEGAME_")}, **OFFLINE}
    reference = subprocess.run([sys.executable, EXAMPLE, *args, "--dir", str(tmp_path / "ref")], env=env,
                               capture_output=True, text=True, timeout=300)
    assert reference.returncode == 0, reference.stderr[-3000:]
    expected = HASH.findall(reference.stdout)[-1]

    run = tmp_path / "run"
    worker = [EXAMPLE, *args, "--save-every-steps", "5"]
    daemon = Daemon(run, worker, env=OFFLINE).start()
    first = daemon.ready(timeout=120)
    wait_until(lambda: max(steps(daemon.stdout), default=0) >= 12, timeout=120)  # mid-epoch 1
    os.kill(first, signal.SIGKILL)  # a crash: restarted from the last periodic checkpoint
    second = daemon.worker_pid(timeout=120, other_than=first)
    wait_until(lambda: daemon.status().get("worker_ready") and daemon.status().get("worker_pid") == second,
               timeout=120)
    wait_until(lambda: max(steps(daemon.stdout), default=0) >= 52, timeout=120)  # mid-epoch 2
    daemon.signal(signal.SIGTERM)  # a stop: emergency checkpoint at the next step, then the daemon exits 0
    assert daemon.wait(timeout=120) == 0, daemon.stderr[-3000:]
    assert re.search(r"resumed from step (\d+) \(epoch 0, batch \1\)", daemon.stderr), daemon.stderr[-3000:]
    latest = CheckpointStore(str(run)).latest()
    assert latest is not None and latest.reason == "emergency" and 52 <= latest.step < 80, latest
    assert latest.step % 40 != 0  # mid-epoch: the resume below must skip the batches already trained

    again = Daemon(run, worker, env=OFFLINE).start()  # a daemon restart
    assert again.wait(timeout=300) == 0, again.stderr[-3000:]
    assert f"resumed from step {latest.step} (epoch 1, batch {latest.step - 40})" in again.stderr, again.stderr[-3000:]
    assert HASH.findall(again.stdout)[-1] == expected
    assert pickles_under(tmp_path) == []  # the run folders, the Trainer's output folders inside them


def test_metric_for_best_model_decides_what_is_kept_and_exported(tmp_path: Path) -> None:
    """greater_is_better=True on eval_loss: the best is the *worst* epoch (the first, as the loss
    falls), so neither 'latest' nor savegame's own default for a loss (min) would pick it."""
    run = tmp_path / "run"
    daemon = Daemon(run, [EXAMPLE, *ARGS, "--metric-for-best-model", "loss", "--greater-is-better", "true"],
                    options=["--keep-last", "1", "--keep-best", "1"], env=OFFLINE).start()
    assert daemon.wait(timeout=300) == 0, daemon.stderr[-3000:]
    losses = {int(epoch): float(loss) for epoch, loss, _ in EVAL.findall(daemon.stdout)}
    assert sorted(losses) == [1, 2, 3], daemon.stdout[-3000:]
    best_epoch = max(losses, key=losses.__getitem__)
    assert best_epoch < 3, losses  # else the test would not tell the best from the latest

    policy = json.loads((run / ".savegame" / "policy.json").read_text())
    assert (policy["monitor"], policy["mode"]) == ("eval_loss", "max")
    kept = CheckpointStore(str(run)).list()
    best = [c for c in kept if c.epoch == best_epoch and c.reason == "best"]
    assert len(best) == 1, [(c.step, c.epoch, c.reason) for c in kept]
    assert best[0].metrics["eval_loss"] == pytest.approx(losses[best_epoch], rel=1e-6)
    assert {c.epoch for c in kept} == {best_epoch, 3}  # the others were collected: retention ran

    out = tmp_path / "best.safetensors"
    done = savegame("export", str(run), "--best", "--to", str(out), timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith(f"exported step {best[0].step} "), done.stdout

    sys.path.insert(0, str(EXAMPLES))
    try:
        import hf_trainer_tiny
    finally:
        sys.path.remove(str(EXAMPLES))
    import savegame.torch as st
    from safetensors.torch import load_file

    model = hf_trainer_tiny.build_model(seed=0)
    model.load_state_dict(load_file(str(out)))  # the model's own state_dict names, as they are
    reference = hf_trainer_tiny.build_model(seed=0)
    st.load_weights(reference, str(run), which=best[0].step)
    assert st.weights_sha256(model) == st.weights_sha256(reference)
    assert pickles_under(tmp_path) == []


def said(capsys: pytest.CaptureFixture) -> list[str]:
    """savegame's lines on stderr (transformers may log its own there)."""
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    return [line for line in err.splitlines() if line.startswith("savegame:")]


@pytest.fixture
def tiny(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """The example's module, with this process looking like a script run on its own."""
    for key in [k for k in os.environ if k.startswith("SAVEGAME_")]:
        monkeypatch.delenv(key)
    for key, value in OFFLINE.items():
        monkeypatch.setenv(key, value)
    monkeypatch.syspath_prepend(str(EXAMPLES))
    import hf_trainer_tiny
    return hf_trainer_tiny


def test_the_trainers_own_checkpoints_are_refused(tiny, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from savegame.hf import train

    args = tiny.parse_args([*ARGS, "--dir", str(tmp_path / "run")])
    trainer = tiny.make_trainer(args, save_strategy="steps", save_steps=2)
    with pytest.raises(SystemExit) as stopped:
        train(trainer)
    assert stopped.value.code == 78
    err = said(capsys)
    assert len(err) == 1 and "save_strategy='no'" in err[0], err
    assert not list(tmp_path.rglob("checkpoint-*")) and pickles_under(tmp_path) == []


def test_a_bare_trainer_train_is_refused(tiny, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """trainer.train() cannot resume exactly (see docs/huggingface.md): said before any step."""
    from savegame.hf import SavegameCallback

    args = tiny.parse_args([*ARGS, "--dir", str(tmp_path / "run")])
    trainer = tiny.make_trainer(args)
    trainer.add_callback(SavegameCallback())
    with pytest.raises(SystemExit) as stopped:
        trainer.train()
    assert stopped.value.code == 78
    err = said(capsys)
    assert len(err) == 1 and "savegame.hf.train(trainer)" in err[0], err
    assert trainer.state.global_step == 0


def run_in_process(tiny, folder: Path, stop_at: int = 0, **overrides) -> str | None:
    """The example in this process; SIGTERM to itself after step `stop_at`. The final hash, or None
    when it stopped (exit 75)."""
    from transformers import TrainerCallback

    from savegame.hf import train
    from savegame.torch import weights_sha256

    class Stop(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs) -> None:
            if state.global_step == stop_at:
                os.kill(os.getpid(), signal.SIGTERM)  # the emergency checkpoint comes at the next boundary

    args = tiny.parse_args(["--epochs", "2", "--limit-batches", "15", "--batch-size", "16", "--seed", "3",
                            "--dir", str(folder)])
    trainer = tiny.make_trainer(args, gradient_accumulation_steps=2, **overrides)  # 8 steps an epoch, the last short
    trainer.add_callback(Stop())
    try:
        train(trainer)
    except SystemExit as stopped:
        assert stopped.code == 75
        return None
    return weights_sha256(trainer.model)


@pytest.mark.parametrize("evaluation, stop_at", [("steps", 5), ("epoch", 8)], ids=["mid-epoch", "epoch-end"])
def test_accumulated_steps_resume_exactly(tiny, tmp_path: Path, evaluation: str, stop_at: int) -> None:
    """Gradient accumulation (the Trainer skips 2 batches a step), evaluation by steps or by epoch,
    stopped mid-epoch or at the epoch's last step (one boundary: its count and metrics are saved)."""
    settings = {"eval_strategy": evaluation, "eval_steps": 3}
    expected = run_in_process(tiny, tmp_path / "ref", **settings)
    assert run_in_process(tiny, tmp_path / "run", stop_at=stop_at, **settings) is None
    stopped = CheckpointStore(str(tmp_path / "run")).latest()
    assert stopped is not None and (stopped.step, stopped.reason) == (stop_at, "emergency")
    if evaluation == "epoch":
        assert stopped.epoch == 1 and "eval_accuracy" in stopped.metrics, stopped
    before = set(Path(tempfile.gettempdir()).glob("savegame-hf-*"))
    with never_unpickled():
        assert run_in_process(tiny, tmp_path / "run", **settings) == expected
    assert set(Path(tempfile.gettempdir()).glob("savegame-hf-*")) == before  # the resume folder is gone


@contextlib.contextmanager
def never_unpickled():
    """torch.load and pickle's loaders fail while the resumed run runs: nothing it reads is a pickle."""
    import pickle

    import torch

    def refuse(*args, **kwargs):
        raise AssertionError("something was unpickled")

    with pytest.MonkeyPatch.context() as patch:
        for module, name in [(torch, "load"), (pickle, "load"), (pickle, "loads"), (pickle, "Unpickler")]:
            patch.setattr(module, name, refuse)
        yield
