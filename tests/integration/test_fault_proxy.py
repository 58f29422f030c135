"""The fault proxy itself: each fault really happens on the wire, so tests built on it can fail."""
import asyncio
import contextlib
import gc
import http.client
import socket
import threading
import time
import urllib.request
import warnings

import pytest
import s3fs

pytestmark = pytest.mark.integration


def _fs(proxy, read_timeout=10):
    fs = s3fs.S3FileSystem(key="testing", secret="testing", skip_instance_cache=True,
                             client_kwargs={"endpoint_url": proxy.endpoint},
                             config_kwargs={"retries": {"max_attempts": 1}, "connect_timeout": 2,
                                            "read_timeout": read_timeout})
    fs.retries = 2
    return fs


def test_the_proxy_forwards_throttles_and_injects_faults(fault_proxy, s3_server):
    bucket = s3_server.make_bucket()
    fs = _fs(fault_proxy)
    fs.pipe_file(f"{bucket}/a", b"x" * 1000)
    assert fs.cat_file(f"{bucket}/a") == b"x" * 1000
    fault_proxy.upload_rate = 1e6
    started = time.monotonic()
    fs.pipe_file(f"{bucket}/b", b"y" * 2_000_000)
    assert time.monotonic() - started >= 1.5  # 2 MB at 1 MB/s
    fault_proxy.clear()
    fault_proxy.fail("GET", r"/a$", 503)
    with pytest.raises(Exception):
        fs.cat_file(f"{bucket}/a")
    assert ("GET", f"/{bucket}/a") in fault_proxy.seen
    fault_proxy.clear()
    fault_proxy.fail("GET", r"/a$", 503, times=1)
    assert fs.cat_file(f"{bucket}/a") == b"x" * 1000  # s3fs retries a 503 once it is gone
    fault_proxy.fail("GET", r"/a$", "reset")
    with pytest.raises(Exception):
        fs.cat_file(f"{bucket}/a")
    fault_proxy.clear()
    fault_proxy.refuse()
    with pytest.raises(Exception):
        _fs(fault_proxy).cat_file(f"{bucket}/a")
    fault_proxy.accept()
    assert _fs(fault_proxy).cat_file(f"{bucket}/a") == b"x" * 1000
    fault_proxy.stall = True
    with pytest.raises(Exception):
        _fs(fault_proxy, read_timeout=1).cat_file(f"{bucket}/a")  # read timeout
    fault_proxy.stall = False


# -- close() leaves nothing behind (a test's Timer calling accept() after its proxy closed once failed
#    30 s later in an unrelated test, with "coroutine 'FaultProxy._open_site' was never awaited") --


def _start_proxy(s3_server):
    from faultproxy import FaultProxy

    gc.collect()  # earlier tests' garbage is not counted below
    return FaultProxy(s3_server.endpoint).start()


def _close_and_collect(proxy) -> list[str]:
    """Close the proxy, drop it, collect: every warning this raises (unclosed loop, never-awaited coroutine)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        proxy.close()
        gc.collect()
    return [f"{w.category.__name__}: {w.message}" for w in caught]


def _refused(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
        return False
    except ConnectionRefusedError:
        return True


def test_a_delayed_accept_is_cancelled_by_close(s3_server):
    threads = set(threading.enumerate())
    proxy = _start_proxy(s3_server)
    proxy.refuse()
    proxy.accept(after=0.5)
    port, loop = proxy.port, proxy._loop
    assert _close_and_collect(proxy) == []
    time.sleep(1)
    assert _refused(port), "the delayed accept ran after close()"
    assert loop.is_closed() and not proxy.errors
    assert set(threading.enumerate()) - threads == set()


def test_a_control_call_after_close_fails_at_once_and_leaves_no_coroutine(s3_server):
    proxy = _start_proxy(s3_server)
    proxy.refuse()
    proxy.close()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        started = time.monotonic()
        with pytest.raises(RuntimeError, match="closed"):
            proxy.accept()  # what a test's threading.Timer(20, proxy.accept) did once its test had ended
        assert time.monotonic() - started < 1, "the call waited on a loop that no longer runs"
        del proxy
        gc.collect()
    assert [f"{w.category.__name__}: {w.message}" for w in caught] == []


def test_close_with_requests_in_flight_leaves_no_thread_task_or_warning(s3_server):
    threads = set(threading.enumerate())
    proxy = _start_proxy(s3_server)
    proxy.fail("PUT", r"/stalled$", "stall")
    proxy.upload_rate = 1e5  # 2 MB: 20 s

    def put(path: str, size: int) -> None:
        request = urllib.request.Request(f"{proxy.endpoint}{path}", data=b"x" * size, method="PUT")
        with contextlib.suppress(OSError, http.client.HTTPException):
            urllib.request.urlopen(request, timeout=30).read()

    clients = [threading.Thread(target=put, args=("/b/stalled", 10)),
               threading.Thread(target=put, args=("/b/slow", 2_000_000))]
    for client in clients:
        client.start()
    deadline = time.monotonic() + 10
    while len(proxy.seen) < 2 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert len(proxy.seen) == 2, proxy.seen
    loop = proxy._loop
    tasks = asyncio.all_tasks(loop)
    assert len(tasks) >= 2  # both handlers are running on the proxy's loop
    assert _close_and_collect(proxy) == []
    for client in clients:
        client.join(timeout=10)
    assert loop.is_closed() and all(task.done() for task in tasks)
    assert set(threading.enumerate()) - threads == set()
