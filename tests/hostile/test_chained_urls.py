"""Found by an adversarial review (it failed before its fix) (issue 9 item 5, SECURITY.md "Credentials"): fsspec's chained URLs
(`simplecache::s3://...`, `filecache::`, `blockcache::`) are not recognised as URLs by redact(), so the
"not a valid URL" error prints the URL as given: secret key, signature and all."""
from __future__ import annotations

import pytest

from helpers import savegame

pytestmark = pytest.mark.integration
SECRET = "wJalrXUtnFEMIK7MDENG/bPxRfiCYEXAMPLEKEY"


@pytest.mark.parametrize("url", [
    f"simplecache::s3://AKIAEXAMPLE:{SECRET}@bucket/run",
    f"filecache::s3://AKIAEXAMPLE:{SECRET}@bucket/run",
    f"blockcache::s3://bucket/run?X-Amz-Signature={SECRET}",
])
@pytest.mark.parametrize("command", ["run", "ls"])
def test_a_chained_url_with_a_secret_is_refused_without_echoing_it(tmp_path, url, command):
    args = (["run", "--dir", str(tmp_path / "run"), "--mirror", url, "--", "true"] if command == "run"
            else ["ls", url])
    result = savegame(*args)
    assert result.returncode == 78, result.stderr
    assert SECRET not in result.stderr + result.stdout, result.stderr
