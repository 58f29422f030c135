"""The fault proxy itself: each fault really happens on the wire, so tests built on it can fail."""
import time

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
