"""Reading many small objects (manifests) from an object store: concurrently, in bounded batches,
each failed read retried a few times.

A read that still fails is handed back as its exception, never as "absent": only a real 'not
found' (FileNotFoundError) means the object is not there. Whoever decides what to delete relies on
that difference (an unreadable manifest is damage, a missing one a leftover).
"""
from __future__ import annotations

import asyncio
import inspect
import time
from typing import Any, Sequence

READ_ATTEMPTS = 3  # on top of the backend's own retries (s3fs: fs.retries)
RETRY_PAUSE_S = 0.25  # then doubled
CONCURRENCY = 64  # reads in flight at once


def read_small_objects(fs: Any, paths: Sequence[str]) -> dict[str, bytes | BaseException]:
    """path -> bytes, or the exception its last read attempt raised."""
    if not paths:
        return {}
    if getattr(fs, "async_impl", False) and getattr(fs, "loop", None) is not None:
        from fsspec.asyn import sync

        return sync(fs.loop, _read_all_async, fs, list(paths))
    return {path: _read_with_retries(fs, path) for path in paths}


def _read_with_retries(fs: Any, path: str) -> bytes | BaseException:
    pause = RETRY_PAUSE_S
    for attempt in range(READ_ATTEMPTS):
        try:
            return fs.cat_file(path)
        except FileNotFoundError as exc:
            return exc
        except Exception as exc:  # noqa: BLE001 - handed back: the caller marks the folder unreadable
            if attempt == READ_ATTEMPTS - 1:
                return exc
        time.sleep(pause)
        pause *= 2
    raise AssertionError("unreachable")


async def _read_all_async(fs: Any, paths: list[str]) -> dict[str, bytes | BaseException]:
    # s3fs's _cat_file asks for the size first (a HEAD per object) unless max_concurrency is 1:
    # for small objects one GET is all it takes.
    extra = {"max_concurrency": 1} if "max_concurrency" in inspect.signature(fs._cat_file).parameters else {}
    gate = asyncio.Semaphore(CONCURRENCY)

    async def read(path: str) -> bytes | BaseException:
        pause = RETRY_PAUSE_S
        for attempt in range(READ_ATTEMPTS):
            try:
                async with gate:
                    return await fs._cat_file(path, **extra)
            except FileNotFoundError as exc:
                return exc
            except Exception as exc:  # noqa: BLE001 - handed back: the caller marks the folder unreadable
                if attempt == READ_ATTEMPTS - 1:
                    return exc
            await asyncio.sleep(pause)
            pause *= 2
        raise AssertionError("unreachable")

    results = await asyncio.gather(*(read(p) for p in paths))
    return dict(zip(paths, results))
