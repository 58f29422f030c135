"""A small HTTP fault proxy in front of the S3 server: throttle, stall, reset, refuse, or answer 503.

Real TCP on 127.0.0.1, real HTTP (aiohttp, which s3fs already brings): the daemon under test talks
to the proxy's endpoint exactly as it would to a bucket behind a bad network. The test changes the
faults while the daemon runs:

    proxy.upload_rate = 3e6                          # bytes/s from client to server
    proxy.stall = True                               # hold every request until unset
    proxy.fail("GET", r"manifest\\.json$", 503, times=1)
    proxy.refuse()  ... proxy.accept()               # connection refused, then back
    proxy.refuse(); proxy.accept(after=20)           # ... back by itself in 20 s, unless closed first

close() leaves nothing behind: what the proxy scheduled (a delayed accept) is cancelled, every task
on its loop is cancelled and awaited, its thread has ended and its loop is closed. A control call
after close() raises at once instead of queueing a coroutine on a loop that will never run it (a
test's own threading.Timer calling accept() after its proxy closed used to block 30 s, then fail in
the middle of a later test, with "coroutine 'FaultProxy._open_site' was never awaited").
"""
from __future__ import annotations

import asyncio
import re
import socket
import threading
import time
import weakref
from dataclasses import dataclass
from typing import Optional

from aiohttp import ClientSession, ClientTimeout, web

HOP_BY_HOP = {"connection", "keep-alive", "transfer-encoding", "te", "trailer", "upgrade",
              "proxy-authorization", "proxy-authenticate", "content-length"}
CHUNK = 64 * 1024


@dataclass
class Rule:
    method: str
    path: re.Pattern
    action: int | str  # an HTTP status to answer, "reset" or "stall"
    times: Optional[int]  # None: forever


class FaultProxy:
    def __init__(self, upstream: str) -> None:
        self.upstream = upstream.rstrip("/")
        self.upload_rate: Optional[float] = None
        self.download_rate: Optional[float] = None
        self.stall = False
        self.rules: list[Rule] = []
        self.seen: list[tuple[str, str]] = []  # (method, path) of every request, in order
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="fault-proxy", daemon=True)
        self._site: Optional[web.TCPSite] = None
        self._runner: Optional[web.AppRunner] = None
        self._session: Optional[ClientSession] = None
        self._open_transports: weakref.WeakSet = weakref.WeakSet()
        self._closing = False  # close() began: stalled requests give up
        self._closed = False  # no control call is taken any more (under _lock)
        self._lock = threading.Lock()
        self._timers: list[asyncio.TimerHandle] = []  # accept(after=...), cancelled by close()
        self._tasks: set[asyncio.Task] = set()  # what the timers started, cancelled by close()
        self.errors: list[BaseException] = []  # what a scheduled action raised; close() raises it
        self._free_at = {"up": 0.0, "down": 0.0}  # a shared link per direction: when it is free again
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.endpoint = f"http://127.0.0.1:{self.port}"

    # -- control, from the test's thread ---------------------------------------------------------

    def start(self) -> "FaultProxy":
        self._thread.start()
        self._call(self._start())
        return self

    def close(self) -> None:
        """Stop the proxy and everything it started; it cannot be used again."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
        self.stall = False
        self._closing = True
        try:
            if self._thread.is_alive():
                asyncio.run_coroutine_threadsafe(self._stop(), self._loop).result(timeout=30)
        finally:
            if self._thread.is_alive():
                self._loop.call_soon_threadsafe(self._loop.stop)
                self._thread.join(timeout=10)
            if self._thread.is_alive():
                raise RuntimeError("the fault proxy's thread did not stop")
            self._loop.close()
        if self.errors:
            raise RuntimeError(f"a scheduled action of the fault proxy failed: {self.errors[0]!r}") from self.errors[0]

    def fail(self, method: str, path_regex: str, action: int | str, times: Optional[int] = None) -> None:
        """Answer matching requests with `action` (a status, "reset" or "stall"), `times` times."""
        self.rules.append(Rule(method.upper(), re.compile(path_regex), action, times))

    def clear(self) -> None:
        self.rules.clear()
        self.stall = False
        self.upload_rate = self.download_rate = None

    def refuse(self) -> None:
        """Stop listening: new connections are refused (open ones are cut)."""
        self._call(self._close_site())

    def accept(self, after: Optional[float] = None) -> None:
        """Listen again: now, or `after` seconds from now on the proxy's own loop (cancelled by close())."""
        if after is None:
            self._call(self._open_site())
        else:
            self._call(self._schedule(after, self._open_site))

    def env(self) -> dict[str, str]:
        return {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                "AWS_ENDPOINT_URL_S3": self.endpoint, "AWS_ENDPOINT_URL": self.endpoint}

    def _call(self, coroutine) -> None:
        with self._lock:
            if self._closed or not self._thread.is_alive():
                coroutine.close()  # never run, and not left to warn "was never awaited" at its collection
                raise RuntimeError("the fault proxy is closed" if self._closed else "the fault proxy is not started")
            future = asyncio.run_coroutine_threadsafe(coroutine, self._loop)
        future.result(timeout=30)  # a call queued before close() runs before close()'s _stop

    # -- the proxy, on its own loop ----------------------------------------------------------------

    async def _start(self) -> None:
        self._session = ClientSession(timeout=ClientTimeout(total=None), auto_decompress=False)
        app = web.Application(client_max_size=1 << 34)
        app.router.add_route("*", "/{tail:.*}", self._handle)
        self._runner = web.AppRunner(app, handle_signals=False)
        await self._runner.setup()
        await self._open_site()

    async def _schedule(self, delay: float, action) -> None:
        def fire() -> None:
            task = self._loop.create_task(action())
            self._tasks.add(task)
            task.add_done_callback(self._task_done)

        self._timers.append(self._loop.call_later(delay, fire))  # cancelling one that fired is harmless

    def _task_done(self, task: asyncio.Task) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            self.errors.append(task.exception())

    async def _open_site(self) -> None:
        assert self._runner is not None
        if self._site is not None:
            return  # already listening
        self._site = web.TCPSite(self._runner, "127.0.0.1", self.port, reuse_address=True)
        await self._site.start()

    async def _close_site(self) -> None:
        for transport in list(self._open_transports):
            transport.abort()
        if self._site is not None:
            await self._site.stop()
            self._site = None

    async def _stop(self) -> None:
        for timer in self._timers:
            timer.cancel()
        self._timers.clear()
        await self._close_site()
        if self._runner is not None:
            await self._runner.cleanup()
        if self._session is not None:
            await self._session.close()
        current = asyncio.current_task()
        left = [task for task in asyncio.all_tasks() if task is not current]  # scheduled actions, handlers
        for task in left:
            task.cancel()
        await asyncio.gather(*left, return_exceptions=True)
        await self._loop.shutdown_asyncgens()  # the _throttled generators of cut requests
        await self._loop.shutdown_default_executor()

    def _rule_for(self, method: str, path: str) -> Optional[Rule]:
        for rule in self.rules:
            if rule.method in (method, "*") and rule.path.search(path) and rule.times != 0:
                if rule.times is not None:
                    rule.times -= 1
                return rule
        return None

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        if request.transport is not None:
            self._open_transports.add(request.transport)  # kept: refuse() cuts idle keep-alive ones too
        return await self._forward(request)

    async def _forward(self, request: web.Request) -> web.StreamResponse:
        self.seen.append((request.method, request.path))
        while self.stall:
            await asyncio.sleep(0.05)
        rule = self._rule_for(request.method, request.path)
        if rule is not None:
            if rule.action == "reset":
                if request.transport is not None:
                    request.transport.abort()
                raise asyncio.CancelledError
            if rule.action == "stall":
                while rule in self.rules and not self._closing:
                    await asyncio.sleep(0.05)
                if request.transport is not None:
                    request.transport.abort()
                raise asyncio.CancelledError
            return web.Response(status=int(rule.action), text="<Error><Code>SlowDown</Code></Error>",
                                headers={"Connection": "close"})
        body = await self._read_body(request)
        headers = {k: v for k, v in request.headers.items() if k.lower() not in HOP_BY_HOP}
        assert self._session is not None
        async with self._session.request(request.method, self.upstream + request.path_qs, headers=headers,
                                         data=body, allow_redirects=False) as upstream:
            response = web.StreamResponse(status=upstream.status, headers={
                k: v for k, v in upstream.headers.items() if k.lower() not in HOP_BY_HOP})
            if upstream.headers.get("Content-Length") is not None:
                response.content_length = int(upstream.headers["Content-Length"])
            await response.prepare(request)
            async for chunk in self._throttled(upstream.content.iter_chunked(CHUNK), "down"):
                await response.write(chunk)
            await response.write_eof()
            return response

    async def _read_body(self, request: web.Request) -> bytes:
        parts = []
        async for chunk in self._throttled(request.content.iter_chunked(CHUNK), "up"):
            parts.append(chunk)
        return b"".join(parts)

    async def _throttled(self, chunks, direction: str):
        """Chunks at the rate of one link per direction, shared by every request (like an uplink)."""
        async for chunk in chunks:
            while self.stall:
                await asyncio.sleep(0.05)
            limit = self.upload_rate if direction == "up" else self.download_rate
            if limit:
                now = time.monotonic()
                self._free_at[direction] = max(now, self._free_at[direction]) + len(chunk) / limit
                await asyncio.sleep(self._free_at[direction] - now)
            yield chunk
