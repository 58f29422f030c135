"""Storage benchmarks; prints one JSON object of figures (never asserts).

(a) save-to-committed time of a checkpoint (CheckpointStore.begin/write/commit) against a raw
    sequential write + fsync of the same bytes, measured side by side, alternating (target <= 1.25);
(b) verify throughput (read + xxh3 of every file) in GB/s;
(c) CheckpointStore.list() of 10,000 local checkpoints (target < 2 s) and of 1,000 on a local
    moto S3 server (target < 2 s; 10,000: < 10 s with --s3-large), cold (every manifest read) and
    warm (manifests cached by ETag), plus `savegame ls --json` of the same, end to end.

    python bench/bench_storage.py [--quick] [--dir DIR] [--no-s3 | --only-s3] [--s3-large]
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any, Callable

from savegame.storage import CheckpointStore
from savegame.storage.checksum import Hasher
from savegame.storage.manifest import FileEntry, Manifest, folder_name, utc_now_iso

BIN = Path(sys.executable).parent
CHUNK = 64 << 20


def payload(total: int) -> list[memoryview]:
    """`total` random bytes as CHUNK-sized views of one random block (no allocation per chunk)."""
    block = memoryview(os.urandom(min(total, CHUNK)))
    views, left = [], total
    while left > 0:
        views.append(block[: min(left, len(block))])
        left -= len(views[-1])
    return views


def raw_write(path: Path, chunks: list[memoryview]) -> float:
    start = time.perf_counter()
    with open(path, "wb", buffering=0) as f:
        for chunk in chunks:
            f.write(chunk)
        os.fsync(f.fileno())
    elapsed = time.perf_counter() - start
    path.unlink()
    return elapsed


def store_commit(store: CheckpointStore, step: int, chunks: list[memoryview]) -> float:
    start = time.perf_counter()
    with store.begin(step) as staged:
        with staged.open("model.bin") as f:
            for chunk in chunks:
                f.write(chunk)
        staged.commit(epoch=step, metrics={"loss": 1.0 / (step + 1)})
    return time.perf_counter() - start


def bench_commit(workdir: Path, size: int, reps: int) -> dict[str, Any]:
    chunks = payload(size)
    store = CheckpointStore(str(workdir / "commit-run"))
    raw_path = workdir / "raw.bin"
    raw_s, commit_s = [], []
    raw_write(raw_path, chunks)  # warm up the filesystem once
    for rep in range(reps):
        for kind in (("raw", "store") if rep % 2 == 0 else ("store", "raw")):  # alternate who goes first
            if kind == "raw":
                raw_s.append(raw_write(raw_path, chunks))
            else:
                commit_s.append(store_commit(store, rep, chunks))
                if rep < reps - 1:
                    store.delete(rep)
    ratios = [c / r for c, r in zip(commit_s, raw_s)]
    return {"bytes": size, "repetitions": reps,
            "raw_write_fsync_s": [round(x, 4) for x in raw_s], "commit_s": [round(x, 4) for x in commit_s],
            "raw_median_s": round(statistics.median(raw_s), 4), "commit_median_s": round(statistics.median(commit_s), 4),
            "raw_GBps": round(size / statistics.median(raw_s) / 1e9, 3),
            "commit_GBps": round(size / statistics.median(commit_s) / 1e9, 3),
            "ratio_commit_over_raw_median": round(statistics.median(commit_s) / statistics.median(raw_s), 3),
            "ratio_commit_over_raw_min": round(min(commit_s) / min(raw_s), 3),  # least disturbed runs
            "ratio_per_pair": [round(r, 3) for r in ratios], "ratio_per_pair_median": round(statistics.median(ratios), 3),
            "target_ratio": 1.25}


def bench_verify(workdir: Path, size: int, reps: int) -> dict[str, Any]:
    store = CheckpointStore(str(workdir / "commit-run"))
    info = store.latest()
    assert info is not None and info.bytes == size
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        problems = store.verify(info)
        times.append(time.perf_counter() - start)
        assert problems == [], problems
    block = os.urandom(CHUNK)
    hasher, start = Hasher(), time.perf_counter()
    for _ in range(max(size // CHUNK, 1)):
        hasher.update(block)
    hash_s = time.perf_counter() - start
    return {"bytes": size, "repetitions": reps, "seconds": [round(t, 4) for t in times],
            "verify_GBps": round(size / statistics.median(times) / 1e9, 3),
            "xxh3_alone_GBps": round(max(size // CHUNK, 1) * CHUNK / hash_s / 1e9, 3),
            "note": "page cache warm (the file was just written): read from memory + checksum"}


def write_fake_checkpoints(put: Callable[[str, bytes], None], count: int) -> None:
    """`count` committed checkpoints with tiny payloads: real manifests, no fsync (setup only)."""
    data = b"tiny payload"
    digest = Hasher()
    digest.update(data)
    entry = FileEntry("model.bin", len(data), digest.digest())
    created = utc_now_iso()
    for step in range(count):
        manifest = Manifest(step=step * 10, epoch=step, reason="periodic", created=created, files=(entry,),
                            metrics={"val_acc": (step % 97) / 97, "val_loss": 1 - (step % 97) / 97},
                            framework="torch", run_id="bench")
        name = folder_name(step * 10)
        put(f"{name}/model.bin", data)
        put(f"{name}/manifest.json", manifest.to_json())


def time_calls(fn: Callable[[], Any], reps: int) -> list[float]:
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return times


def cli_ls_seconds(url: str, count: int, env: dict[str, str]) -> float:
    start = time.perf_counter()
    proc = subprocess.run([str(BIN / "savegame"), "ls", url, "--json"], env=env, capture_output=True, text=True)
    elapsed = time.perf_counter() - start
    assert proc.returncode == 0, proc.stderr
    assert len(json.loads(proc.stdout)) == count
    return elapsed


def bench_list_local(workdir: Path, count: int, reps: int) -> dict[str, Any]:
    root = workdir / "list-run"

    def put(rel: str, data: bytes) -> None:
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)

    write_fake_checkpoints(put, count)
    times = time_calls(lambda: _check_count(CheckpointStore(str(root)).list(), count), reps)
    cli = cli_ls_seconds(str(root), count, dict(os.environ))
    return {"checkpoints": count, "list_s": [round(t, 3) for t in times],
            "list_median_s": round(statistics.median(times), 3), "cli_ls_json_s": round(cli, 3), "target_s": 2.0}


def _check_count(listing: list, count: int) -> None:
    assert len(listing) == count, len(listing)


class MotoServer:
    def __init__(self) -> None:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.endpoint = f"http://127.0.0.1:{self.port}"
        exe = shutil.which("moto_server", path=str(BIN)) or shutil.which("moto_server")
        if exe is None:
            raise RuntimeError("moto_server not found: pip install 'moto[server]'")
        self.proc = subprocess.Popen([exe, "-H", "127.0.0.1", "-p", str(self.port)],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 30
        while True:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.2).close()
                return
            except OSError:
                if time.monotonic() > deadline:
                    self.stop()
                    raise RuntimeError("moto_server did not start")
                time.sleep(0.05)

    @property
    def options(self) -> dict[str, Any]:
        return {"key": "testing", "secret": "testing", "client_kwargs": {"endpoint_url": self.endpoint}}

    @property
    def env(self) -> dict[str, str]:
        return {**os.environ, "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                "AWS_ENDPOINT_URL_S3": self.endpoint, "AWS_ENDPOINT_URL": self.endpoint}

    def stop(self) -> None:
        os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait()


def bench_list_s3(count: int, reps: int) -> dict[str, Any]:
    """Listing `count` checkpoints on moto: cold (every manifest read: one GET each) and warm (manifests
    whose ETag is unchanged come from the cache), in-process and through `savegame ls --json`, side by
    side; plus the bare object listing (find) that every listing starts with."""
    import s3fs

    server = MotoServer()
    cache = tempfile.mkdtemp(prefix="savegame-bench-cache-")
    try:
        fs = s3fs.S3FileSystem(**server.options, skip_instance_cache=True)
        bucket = f"bench-{uuid.uuid4().hex[:8]}"
        fs.mkdir(bucket)
        batch: dict[str, bytes] = {}
        write_fake_checkpoints(lambda rel, data: batch.__setitem__(f"{bucket}/run/{rel}", data), count)
        start = time.perf_counter()
        fs.pipe(batch)
        setup_s = time.perf_counter() - start
        url = f"s3://{bucket}/run"
        # a fresh filesystem object each time, as a new process would have (no listing cache)
        fresh = {**server.options, "skip_instance_cache": True}
        find_s = time_calls(lambda: s3fs.S3FileSystem(**fresh).find(f"{bucket}/run"), reps)
        with _cache_dir("off"):
            cold, indexed, cli_cold, cli_indexed = _cold_side_by_side(fs, url, fresh, count, reps, server.env)
        with _cache_dir(cache):
            _check_count(CheckpointStore(url, fresh).list(), count)  # fills the cache
            warm = time_calls(lambda: _check_count(CheckpointStore(url, fresh).list(), count), reps)
            cli_warm = cli_ls_seconds(url, count, {**server.env, "SAVEGAME_CACHE_DIR": cache})
    finally:
        server.stop()
        shutil.rmtree(cache, ignore_errors=True)
    return {"checkpoints": count, "objects": 2 * count, "upload_setup_s": round(setup_s, 2),
            "find_median_s": _median(find_s), "list_cold_s": [round(t, 3) for t in cold],
            "list_cold_median_s": _median(cold), "list_warm_s": [round(t, 3) for t in warm],
            "list_warm_median_s": _median(warm), "list_cold_indexed_s": [round(t, 3) for t in indexed],
            "list_cold_indexed_median_s": _median(indexed), "cli_ls_json_cold_s": _median(cli_cold),
            "cli_ls_json_cold_indexed_s": _median(cli_indexed), "cli_ls_json_warm_s": round(cli_warm, 3),
            "target_s": 2.0 if count <= 1000 else 10.0, "server": "moto_server on 127.0.0.1",
            "note": "cold: no manifest cache, no index: one GET per manifest (client and moto both CPU-bound); "
                    "cold_indexed: no cache, the bucket's manifest index (what the mirror writes) instead; "
                    "warm: unchanged manifests (same ETag) from the cache; cold and cold_indexed alternate, "
                    "and all three are mostly the object listing (find) once the manifests are not read"}


def _cold_side_by_side(fs: Any, url: str, options: dict[str, Any], count: int, reps: int,
                       env: dict[str, str]) -> tuple[list[float], list[float], list[float], list[float]]:
    """Cold listings without and with the manifest index, alternating (the index removed, then
    written again), in-process and through the CLI."""
    from savegame.storage.manifestindex import INDEX_PATH

    index = f"{url[len('s3://'):]}/{INDEX_PATH}"
    plain: list[float] = []
    indexed: list[float] = []
    cli_plain: list[float] = []
    cli_indexed: list[float] = []
    cli_env = {**env, "SAVEGAME_CACHE_DIR": "off"}
    for rep in range(reps):
        for with_index in ((False, True) if rep % 2 == 0 else (True, False)):
            if with_index:
                CheckpointStore(url, options).write_index()
            elif fs.exists(index):
                fs.rm_file(index)
            fs.invalidate_cache()
            times, cli = (indexed, cli_indexed) if with_index else (plain, cli_plain)
            times += time_calls(lambda: _check_count(CheckpointStore(url, options).list(), count), 1)
            cli.append(cli_ls_seconds(url, count, cli_env))
    return plain, indexed, cli_plain, cli_indexed


def _median(times: list[float]) -> float:
    return round(statistics.median(times), 3)


class _cache_dir:
    """SAVEGAME_CACHE_DIR for this process while inside the block."""

    def __init__(self, value: str) -> None:
        self.value, self.before = value, os.environ.get("SAVEGAME_CACHE_DIR")

    def __enter__(self) -> None:
        os.environ["SAVEGAME_CACHE_DIR"] = self.value

    def __exit__(self, *exc: object) -> None:
        if self.before is None:
            os.environ.pop("SAVEGAME_CACHE_DIR", None)
        else:
            os.environ["SAVEGAME_CACHE_DIR"] = self.before


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small sizes: 128 MiB, 1,000 / 200 checkpoints")
    parser.add_argument("--dir", help="where to write (default: a temporary folder; same disk as /tmp)")
    parser.add_argument("--no-s3", action="store_true", help="skip the S3 listing")
    parser.add_argument("--s3-large", action="store_true", help="also list 10,000 checkpoints on S3 (minutes)")
    parser.add_argument("--only-s3", action="store_true", help="only the S3 listings")
    args = parser.parse_args()
    size = (128 << 20) if args.quick else (1 << 30)
    reps = 3 if args.quick else 7
    local_count, s3_count = (1000, 200) if args.quick else (10_000, 1000)

    workdir = Path(tempfile.mkdtemp(prefix="savegame-bench-", dir=args.dir))
    figures: dict[str, Any] = {"quick": args.quick, "python": sys.version.split()[0], "cpus": os.cpu_count(),
                               "workdir_filesystem_device": os.stat(workdir).st_dev}
    try:
        if not args.only_s3:
            figures["commit_vs_raw_write"] = bench_commit(workdir, size, reps)
            figures["verify"] = bench_verify(workdir, size, reps)
            shutil.rmtree(workdir / "commit-run")
            figures["list_local"] = bench_list_local(workdir, local_count, 5)
        if not args.no_s3:
            figures["list_s3"] = bench_list_s3(s3_count, 3)
        if args.s3_large:
            figures["list_s3_10000"] = bench_list_s3(10_000, 2)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    json.dump(figures, sys.stdout, indent=1)
    sys.stdout.write("\n")


if __name__ == "__main__":
    main()
