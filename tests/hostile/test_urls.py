"""URLs with credentials or tokens in them, and mistyped URLs (security review 9.5).

Credentials in a URL are refused in every spelling (a secret holding '/' or '@', user only, any
protocol), so are query strings and fragments (SAS tokens, presigned signatures); the message never
echoes the secret, and redact() hides it in every spelling. `s3//bucket`, `s3:/bucket`,
`http//host` are typos, not local folders."""
from __future__ import annotations

import pytest

from storage_kit import cli
from savegame.errors import ConfigError
from savegame.storage import parse_location, redact

SECRET = "Top/Secret@Key+123"  # an AWS-like secret: '/' and '+' are common, '@' happens in passwords

CREDENTIALS = [
    "s3://AKIAEXAMPLE:{s}@bucket/run",
    "S3://AKIAEXAMPLE:{s}@bucket/run",
    "s3://:{s}@bucket/run",
    "s3://{s}@bucket/run",
    "s3://AKIAEXAMPLE:{s}@bucket/run?versionId=1",
    "gs://user:{s}@bucket/run",
    "az://account:{s}@container/run",
    "abfs://account:{s}@container/run",
    "https://user:{s}@host/run",
    "hf://user:{s}@datasets/repo/run",
    "s3:///AKIAEXAMPLE:{s}@bucket/run",
]
QUERIES = [
    "az://container/run?sv=2024-11-04&ss=b&sig={s}",
    "s3://bucket/run?X-Amz-Algorithm=AWS4-HMAC-SHA256&X-Amz-Credential=AKIA&X-Amz-Signature={s}",
    "https://host/run?token={s}",
    "gs://bucket/run#{s}",
]
TYPOS = [
    ("s3//bucket/run", "s3://bucket/run"), ("s3:/bucket/run", "s3://bucket/run"),
    ("s3:bucket/run", "s3://bucket/run"), ("S3//bucket/run", "s3://bucket/run"),
    ("http//host/run", "http://host/run"), ("https:/host/run", "https://host/run"),
    ("gs//bucket/run", "gs://bucket/run"), ("memory//x/run", "memory://x/run"), ("s3///bucket/run", "s3://bucket/run"),
]
ACCEPTED = [
    ("s3://bucket/run", "s3", "bucket/run"), ("S3://bucket/run/", "s3", "bucket/run"),
    ("gs://bucket/deep/run", "gs", "bucket/deep/run"), ("memory://x/run", "memory", "x/run"),
    ("hf://datasets/user/repo@main/run", "hf", "datasets/user/repo@main/run"),
]
LOCAL = ["./s3//run", "/data/alice@host/run", "/data/run?x=1", "runs/exp:1", "C:/runs"]


@pytest.mark.unit
@pytest.mark.parametrize("template", CREDENTIALS)
def test_credentials_are_refused_in_every_spelling(template):
    url = template.format(s=SECRET)
    with pytest.raises(ConfigError) as info:
        parse_location(url)
    message = str(info.value)
    assert "credentials in the URL are not accepted" in message or "mistyped" in message
    assert "Secret" not in message and "Secret" not in redact(url)


@pytest.mark.unit
@pytest.mark.parametrize("template", QUERIES)
def test_query_strings_and_fragments_are_refused(template):
    url = template.format(s=SECRET)
    with pytest.raises(ConfigError, match="query string or fragment is not accepted") as info:
        parse_location(url)
    assert "Secret" not in str(info.value) and "Secret" not in redact(url)
    assert redact(url).endswith("***")


@pytest.mark.unit
@pytest.mark.parametrize("typo, meant", TYPOS)
def test_mistyped_urls_are_not_local_folders(typo, meant):
    with pytest.raises(ConfigError) as info:
        parse_location(typo)
    assert f"did you mean {meant!r}" in str(info.value)
    with pytest.raises(ConfigError) as info:  # with credentials in the typo, still nothing echoed
        parse_location(typo.replace("bucket", f"KEY:{SECRET}@bucket").replace("host", f"u:{SECRET}@host"))
    assert "Secret" not in str(info.value)


@pytest.mark.unit
@pytest.mark.parametrize("url, protocol, path", ACCEPTED)
def test_good_urls(url, protocol, path):
    location = parse_location(url)
    assert (location.protocol, location.path, location.url) == (protocol, path, url)


@pytest.mark.unit
@pytest.mark.parametrize("path", LOCAL)
def test_local_folders_with_odd_characters(path):
    location = parse_location(path)
    assert location.is_local and location.url == path and redact(path) == path


@pytest.mark.unit
@pytest.mark.parametrize("url, shown", [
    ("s3://AKIA:{s}@bucket/run", "s3://***@bucket/run"),
    ("s3://user:p@ss/w@rd@bucket/run", "s3://***@bucket/run"),
    ("s3://AKIA:se?cret@bucket/run", "s3://***"),  # '@' after '?': which part is secret is unclear
    ("az://c/run?sv=1&sig={s}", "az://***"),
    ("az://c/run?sv=1&sig=ab/c+d=", "az://c/run?***"),
    ("s3://AKIA:{s}@bucket/run?versionId=2", "s3://***@bucket/run?***"),
    ("s3//AKIA:{s}@bucket/run", "s3//***@bucket/run"),
    ("s3:/AKIA:{s}@bucket/run", "s3:/***@bucket/run"),
    ("https://host/x#{s}", "https://***"),
    ("https://host/x#token=abc", "https://host/x#***"),
    ("hf://user/repo@main/x", "hf://user/repo@main/x"),
    ("/local/a@b/run", "/local/a@b/run"),
])
def test_redact(url, shown):
    assert redact(url.format(s=SECRET)) == shown


@pytest.mark.integration
def test_the_cli_refuses_without_echoing(savegame_env, tmp_path):
    for url in (CREDENTIALS[0].format(s=SECRET), QUERIES[0].format(s=SECRET), f"s3//AKIA:{SECRET}@bucket/run"):
        proc = cli(savegame_env, "ls", url, codes=[78])
        assert "configuration error" in proc.stderr and "Secret" not in proc.stderr + proc.stdout
    proc = cli(savegame_env, "ls", "http//host/run", codes=[78])
    assert "did you mean 'http://host/run'" in proc.stderr
    assert not (tmp_path / "http").exists()
    proc = cli(savegame_env, "run", "--dir", str(tmp_path / "run"), "--mirror", f"s3//AKIA:{SECRET}@bucket/run",
               "--", "true", codes=[78])
    assert "did you mean 's3://***@bucket/run'" in proc.stderr and "Secret" not in proc.stderr
