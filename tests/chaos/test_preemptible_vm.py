"""The README's preemptible-VM story, end to end, on a throttled uplink: SIGTERM mid-epoch -> the
emergency checkpoint is in the bucket before the daemon exits -> a replacement VM with an empty disk
resumes from the bucket -> its final weights are bit-identical to an uninterrupted run."""
import json
import re
import signal
import struct
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import Daemon, clean_env, committed_steps, savegame, wait_until

pytestmark = [pytest.mark.chaos, pytest.mark.frameworks]
EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "pytorch_mnist_cnn.py"
TRAIN = [str(EXAMPLE), "--epochs", "2", "--limit-batches", "30", "--batch-size", "32", "--save-every-steps", "10"]


def final_hash(stdout: str) -> str:
    return re.findall(r"final-weights-sha256 ([0-9a-f]{64})", stdout)[-1]


def progress(run: Path) -> int:
    try:
        return struct.unpack("<q", (run / ".savegame" / "progress").read_bytes()[:8])[0]
    except (FileNotFoundError, struct.error):
        return -1


def test_preempted_vm_resumes_from_the_bucket_bit_identical(tmp_path, s3_server, fault_proxy):
    alone = subprocess.run([sys.executable, *TRAIN, "--dir", str(tmp_path / "alone")], capture_output=True,
                           text=True, env=clean_env(), timeout=600)
    assert alone.returncode == 0, alone.stderr[-3000:]
    url = f"s3://{s3_server.make_bucket()}/run"
    config = tmp_path / "vm.toml"
    config.write_text("grace = 15\nmirror_deadline = 12\n")  # the README's GCP advice
    fault_proxy.upload_rate = 1e6  # a slow uplink: 1 MB/s
    vm1 = Daemon(tmp_path / "vm1", TRAIN, ["--mirror", url, "--config", str(config)], env=fault_proxy.env()).start()
    try:
        wait_until(lambda: progress(tmp_path / "vm1") >= 45, timeout=300)  # mid-epoch 2 (30 steps per epoch)
        vm1.signal(signal.SIGTERM)  # the preemption notice
        assert vm1.wait(timeout=60) == 0, vm1.stderr[-3000:]
    finally:
        vm1.kill()
    emergency = committed_steps(tmp_path / "vm1")[-1]
    rows = json.loads(savegame("ls", url, "--json", env=s3_server.env).stdout)
    assert (rows[-1]["step"], rows[-1]["reason"]) == (emergency, "emergency")
    assert 45 <= emergency < 60
    fault_proxy.clear()
    vm2 = Daemon(tmp_path / "vm2", TRAIN, ["--mirror", url, "--config", str(config)], env=fault_proxy.env()).start()
    try:
        assert vm2.wait(timeout=600) == 0, vm2.stderr[-3000:]
    finally:
        vm2.kill()
    assert f"fetching step {emergency} from the mirror" in vm2.stderr
    assert final_hash(vm2.stdout) == final_hash(alone.stdout)
