"""Turning a user's run root (a path or an fsspec URL) into a filesystem, with clear errors.

Backends load lazily, like fsspec's registry: `gs://` without gcsfs says which package to install.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass
from typing import Any, Mapping

from savegame.errors import ConfigError

# Protocols fsspec knows but whose backend lives in a separate package.
PACKAGE_FOR_PROTOCOL = {
    "s3": "s3fs", "s3a": "s3fs", "gs": "gcsfs", "gcs": "gcsfs", "az": "adlfs", "abfs": "adlfs",
    "abfss": "adlfs", "adl": "adlfs", "hf": "huggingface_hub", "oci": "ocifs", "oss": "ossfs",
    "webdav": "webdav4", "sftp": "paramiko", "ssh": "paramiko",
}
LOCAL_PROTOCOLS = ("", "file", "local")
# A missing or extra character in "://" of these is a typo, not a local folder's name.
TYPO_PROTOCOLS = frozenset(PACKAGE_FOR_PROTOCOL) | {"http", "https", "memory", "ftp"}
AT_IN_PATH = frozenset({"hf"})  # protocols whose paths may hold '@' (a revision), not credentials
_URLISH = re.compile(r"([A-Za-z][A-Za-z0-9+.-]*)(://|//|:/|:)(.*)", re.DOTALL)


def _spelling(url: str) -> tuple[str, str, str] | None:
    """(protocol, separator, rest) when `url` is, or is a typo of, a URL: "s3://", "s3//", "s3:/", "s3:"."""
    match = _URLISH.fullmatch(url)
    if match is None:
        return None
    protocol, separator, rest = match.group(1).lower(), match.group(2), match.group(3)
    if separator != "://" and protocol not in TYPO_PROTOCOLS:
        return None
    return protocol, separator, rest


def _credentials_end(protocol: str, rest: str) -> int | None:
    """Where userinfo ends in the part after "://" (just past its last '@'), or None without any.

    The last '@' counts, and a ':' before it marks userinfo even past a '/': AWS secrets often hold
    '/', passwords '@'. Only where paths may hold '@' (hf revisions) does a lone '@' past the first
    '/' mean something else."""
    at = rest.rfind("@")
    if at < 0:
        return None
    if protocol in AT_IN_PATH and "@" not in rest.split("/", 1)[0] and ":" not in rest[:at]:
        return None
    return at + 1


def redact(url: str) -> str:
    """The URL with what may be a secret hidden (userinfo in any spelling, the query string and the
    fragment: tokens, SAS and presigned signatures), safe to log. A local path is left as it is.
    An fsspec chain (`simplecache::s3://...`) is redacted link by link."""
    if "::" in url:
        return "::".join(redact(link) for link in url.split("::"))
    parts = _spelling(url)
    if parts is None:
        return url
    protocol, _separator, rest = parts
    query = _query_start(rest)
    end = _credentials_end(protocol, rest)
    if end is not None and end > query:  # an '@' past a '?' or '#': which part is the secret is unclear
        shown = "***"
    else:
        shown = ("***@" + rest[end:query] if end is not None else rest[:query])
        shown += rest[query] + "***" if query < len(rest) else ""
    return url[:len(url) - len(rest)] + shown


def _query_start(rest: str) -> int:
    """Where the query string or fragment starts (len(rest) without either)."""
    marks = [i for i in (rest.find("?"), rest.find("#")) if i >= 0]
    return min(marks) if marks else len(rest)


def split_protocol(url: str) -> tuple[str, str]:
    if "://" not in url:
        return "", url
    protocol, rest = url.split("://", 1)
    return protocol.lower(), rest


@dataclass(frozen=True)
class Location:
    """Where a store lives: a local folder, or a root path on an fsspec filesystem."""

    url: str  # as the user gave it, redacted
    protocol: str
    path: str  # local absolute path, or the fsspec path without protocol
    storage_options: Mapping[str, Any]

    @property
    def is_local(self) -> bool:
        return self.protocol in LOCAL_PROTOCOLS

    def __str__(self) -> str:
        return self.url


def parse_location(url: str, storage_options: Mapping[str, Any] | None = None) -> Location:
    """Validate a run root. Raises ConfigError naming the problem and the fix, never echoing a secret."""
    if not isinstance(url, str) or not url.strip():
        raise ConfigError("the checkpoint location is empty; give a folder or a URL like s3://bucket/run")
    url = url.strip()
    if "::" in url:  # fsspec's chains (simplecache::s3://...) cache remote files locally: not for checkpoints
        raise ConfigError(f"{redact(url)!r}: chained URLs (with '::') are not supported for checkpoints; give the "
                          "plain URL (e.g. s3://bucket/run): savegame verifies and caches what it needs itself")
    spelled = _spelling(url)
    if spelled is not None and spelled[1] != "://":
        protocol, _, rest = spelled
        raise ConfigError(f"{redact(url)!r} looks like a mistyped URL: did you mean "
                          f"{redact(protocol + '://' + rest.lstrip('/'))!r}? (for a local folder named like "
                          f"this, write ./{redact(url)})")
    protocol, rest = split_protocol(url)
    if protocol in LOCAL_PROTOCOLS:
        path = os.path.abspath(os.path.expanduser(rest))
        return Location(url=redact(url), protocol="", path=path, storage_options={})
    if not re.fullmatch(r"[a-z][a-z0-9+.-]*", protocol):
        raise ConfigError(f"{redact(url)!r} is not a valid URL; use a folder or a URL like s3://bucket/run")
    _check_protocol_known(protocol, url)
    _refuse_secrets(protocol, rest, url)
    path = rest.rstrip("/")
    if not path:
        raise ConfigError(f"{redact(url)!r} names no bucket or path")
    return Location(url=redact(url), protocol=protocol, path=path,
                    storage_options=dict(storage_options or {}))


def _refuse_secrets(protocol: str, rest: str, url: str) -> None:
    if _credentials_end(protocol, rest[:_query_start(rest)]) is not None:
        raise ConfigError(
            f"{redact(url)}: credentials in the URL are not accepted (they would end up in logs); "
            "use the environment (AWS_ACCESS_KEY_ID, ...) or the [storage] options of the config")
    if "?" in rest or "#" in rest:
        raise ConfigError(
            f"{redact(url)}: a query string or fragment is not accepted in a checkpoint URL (it may carry a "
            "token or a signature, as SAS and presigned URLs do, and would end up in logs); give credentials "
            "through the environment or the [storage] options of the config")


def _check_protocol_known(protocol: str, url: str) -> None:
    from fsspec.registry import known_implementations, registry

    if protocol not in known_implementations and protocol not in registry:
        raise ConfigError(
            f"{redact(url)}: unknown protocol {protocol!r}; use a local folder or one of "
            "s3://, gs://, az://, memory://, file://"
        )


def open_filesystem(location: Location) -> Any:
    """The fsspec filesystem for a non-local location; ConfigError if its package is missing."""
    import fsspec

    try:
        return fsspec.filesystem(location.protocol, **dict(location.storage_options))
    except ImportError as exc:
        package = PACKAGE_FOR_PROTOCOL.get(location.protocol, str(exc.name or "its backend"))
        raise ConfigError(
            f"{location.url}: the {location.protocol}:// protocol needs the {package!r} package; "
            f"install it with: pip install {package}"
            + ("  (or: pip install 'savegame[s3]')" if package == "s3fs" else "")
        ) from None
    except TypeError as exc:
        raise ConfigError(f"{location.url}: bad storage options for {location.protocol}:// ({exc})") from None
