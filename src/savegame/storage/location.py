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
_USERINFO_RE = re.compile(r"^([a-zA-Z][\w+.-]*://)[^/@]*@")


def redact(url: str) -> str:
    """The URL with any user:password@ part hidden, safe to log."""
    return _USERINFO_RE.sub(r"\1***@", url)


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
    """Validate a run root. Raises ConfigError naming the problem and the fix."""
    if not isinstance(url, str) or not url.strip():
        raise ConfigError("the checkpoint location is empty; give a folder or a URL like s3://bucket/run")
    url = url.strip()
    protocol, rest = split_protocol(url)
    typo = re.match(r"^([a-z][a-z0-9+.-]*):/?(?!/)", url)
    if not protocol and typo and typo.group(1) in PACKAGE_FOR_PROTOCOL:
        raise ConfigError(f"{redact(url)!r} looks like a URL with a slash missing: write {typo.group(1)}://...")
    if protocol in LOCAL_PROTOCOLS:
        path = os.path.abspath(os.path.expanduser(rest))
        return Location(url=redact(url), protocol="", path=path, storage_options={})
    if not re.fullmatch(r"[a-z][a-z0-9+.-]*", protocol):
        raise ConfigError(f"{redact(url)!r} is not a valid URL; use a folder or a URL like s3://bucket/run")
    _check_protocol_known(protocol, url)
    if "@" in rest.split("/", 1)[0]:
        raise ConfigError(
            f"{redact(url)}: credentials in the URL are not accepted (they would end up in logs); "
            "use the environment (AWS_ACCESS_KEY_ID, ...) or the [storage] options of the config"
        )
    path = rest.rstrip("/")
    if not path:
        raise ConfigError(f"{redact(url)!r} names no bucket or path")
    return Location(url=redact(url), protocol=protocol, path=path,
                    storage_options=dict(storage_options or {}))


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
