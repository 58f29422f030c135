"""A worker with a known state size (--mb MiB, in a few tensors and an odd-sized one) that saves
--saves times, then prints one JSON line of its own memory figures from /proc/self/status:
`baseline` (VmRSS before the state exists), `hwm` (VmHWM at the end), `shmem` (RssShmem at the
end: the segments it mapped), `anon` (RssAnon at the end) and `state` (the state's bytes)."""
import argparse
import json

import numpy

parser = argparse.ArgumentParser()
parser.add_argument("--framework", choices=["torch", "numpy"], default="numpy")
parser.add_argument("--mb", type=float, default=64)
parser.add_argument("--saves", type=int, default=3)
parser.add_argument("--dir", default=None)
args = parser.parse_args()

if args.framework == "torch":
    import torch
import savegame  # noqa: E402


def status() -> dict[str, int]:
    """/proc/self/status' memory lines, in bytes."""
    figures = {}
    with open("/proc/self/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if value.strip().endswith("kB"):
                figures[key] = int(value.split()[0]) * 1024
    return figures


baseline = status()["VmRSS"]
parts = 4
part = int(args.mb * 2**20) // parts // 4  # float32 elements per big tensor
if args.framework == "torch":
    class Model(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.big = torch.nn.ParameterList([torch.nn.Parameter(torch.full((part,), float(i))) for i in range(parts)])
            self.odd = torch.nn.Parameter(torch.arange(7, dtype=torch.float32))  # not a multiple of 64 bytes

    state = {"model": Model()}
else:
    state = {f"big{i}": numpy.full(part, float(i), dtype=numpy.float32) for i in range(parts)}
    state["odd"] = numpy.arange(7, dtype=numpy.float32)
state_bytes = parts * part * 4 + 7 * 4

ckpt = savegame.Checkpointer(args.dir, every_steps=1, keep_last=2)
ckpt.track(**state)
ckpt.start_training()
for _ in range(args.saves):
    if args.framework == "torch":
        with torch.no_grad():
            for p in state["model"].parameters():
                p.add_(1)
    else:
        for array in state.values():
            array += 1
    ckpt.step()  # saves every step
ckpt.flush()
end = status()  # before finish(): the segments and the host buffers are all still there
ckpt.finish()
print(json.dumps({"baseline": baseline, "hwm": end["VmHWM"], "shmem": end.get("RssShmem", 0),
                  "anon": end.get("RssAnon", 0), "state": state_bytes}), flush=True)
