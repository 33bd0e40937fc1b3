"""Where result files live: an artifact store behind one small interface.

The database keeps an artifact's key and SHA-256, never its bytes. Two stores implement the
interface: a local folder (the default) and an S3-compatible bucket (AWS S3, MinIO, Ceph),
chosen by `artifact_store_from_url`.

Keys are relative, slash-separated paths such as ``results/42/0-1234.png``. Every segment is
non-empty, has no backslash or control character and does not start with a dot (which rules out
``.`` and ``..``, and keeps the local store's temporary files out of the key space), so a key can
never name a file outside the store's folder or prefix.

Prefixes, as given to `keys` and `delete_prefix`, match as plain string prefixes (S3 semantics):
``results/4/`` matches ``results/4/0.png`` but not ``results/42/0.png``; ``results/4`` matches
both.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib
import logging
import os
import re
import secrets
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, runtime_checkable
from urllib.parse import parse_qsl, unquote, urlsplit

log = logging.getLogger(__name__)

MAX_KEY_BYTES = 1024  # S3's limit on the whole object key
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
_TEMP_SUFFIX = ".tmp"
_S3_DELETE_BATCH = 1000  # DeleteObjects takes at most 1000 keys
_S3_LIST_PAGE = 1000  # ListObjectsV2 returns at most 1000 keys a page
_BUCKET_NAME = re.compile(r"^[a-z0-9][a-z0-9.\-]{1,61}[a-z0-9]$")


@dataclass(frozen=True)
class StoredArtifact:
    key: str
    sha256: str
    size: int


class ArtifactMissing(LookupError):
    """No artifact under this key."""


class ArtifactCorrupt(ValueError):
    """The bytes read back do not have the SHA-256 they were stored with."""


@runtime_checkable
class ArtifactStore(Protocol):
    def put(self, key: str, data: bytes, content_type: str = "image/png") -> StoredArtifact:
        """Store `data` under `key`, replacing what was there; returns its reference."""
        ...

    def get(self, key: str, sha256: str | None = None) -> bytes:
        """The bytes under `key`; ArtifactMissing if absent, ArtifactCorrupt if `sha256` differs."""
        ...

    def delete(self, key: str) -> None:
        """Delete one artifact; an absent one is fine."""
        ...

    def delete_prefix(self, prefix: str) -> int:
        """Delete every artifact whose key starts with `prefix` (non-empty); returns how many."""
        ...

    def exists(self, key: str) -> bool: ...

    def keys(self, prefix: str = "") -> list[str]:
        """Sorted keys starting with `prefix` (all keys for "")."""
        ...


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def validate_key(key: str) -> str:
    """Return `key` if it is a valid artifact key, else raise ValueError saying why."""
    if not isinstance(key, str) or not key:
        raise ValueError(f"artifact key must be a non-empty string, not {key!r}")
    if len(key.encode("utf-8")) > MAX_KEY_BYTES:
        raise ValueError(f"artifact key is longer than {MAX_KEY_BYTES} bytes: {key[:40]!r}...")
    if "\\" in key:
        raise ValueError(f"artifact key may not contain a backslash: {key!r}")
    if _CONTROL.search(key):
        raise ValueError(f"artifact key may not contain control characters: {key!r}")
    if key.startswith("/"):
        raise ValueError(f"artifact key must be relative, not {key!r}")
    for segment in key.split("/"):
        if not segment:
            raise ValueError(f"artifact key may not have empty segments: {key!r}")
        if segment.startswith("."):
            raise ValueError(f"artifact key segments may not start with a dot: {key!r}")
    return key


def validate_prefix(prefix: str) -> str:
    """Return `prefix` if some valid key could start with it ("" included), else ValueError."""
    if not isinstance(prefix, str):
        raise ValueError(f"artifact key prefix must be a string, not {prefix!r}")
    if not prefix:
        return prefix
    try:
        # A valid key cut anywhere: cut in a segment, it is a valid key itself; cut after a
        # slash, it is one without that slash.
        validate_key(prefix.removesuffix("/"))
    except ValueError as exc:
        raise ValueError(f"bad artifact key prefix {prefix!r}: {exc}") from None
    return prefix


def _verify(key: str, data: bytes, expected: str) -> None:
    actual = sha256_hex(data)
    if actual != expected.lower():
        raise ArtifactCorrupt(
            f"artifact {key!r} is corrupt: SHA-256 {actual}, expected {expected.lower()}"
        )


def _non_empty_prefix(prefix: str) -> str:
    validate_prefix(prefix)
    if not prefix:
        raise ValueError("delete_prefix needs a non-empty prefix (refusing to delete everything)")
    return prefix


class LocalArtifactStore:
    """Artifacts as files under one folder; writes are atomic (temp file, then os.replace)."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root).expanduser().resolve()

    def __repr__(self) -> str:
        return f"LocalArtifactStore({str(self.root)!r})"

    def path_of(self, key: str) -> Path:
        """The file a key maps to (it may not exist); for code that needs a local path."""
        validate_key(key)
        return self.root.joinpath(*key.split("/"))

    def put(self, key: str, data: bytes, content_type: str = "image/png") -> StoredArtifact:
        path = self.path_of(key)
        data = bytes(data)
        # A concurrent delete may prune the (then empty) folder between mkdir and open: retry.
        for attempt in range(3):
            path.parent.mkdir(parents=True, exist_ok=True)
            try:
                self._write_atomically(path, data)
                break
            except FileNotFoundError:
                if attempt == 2:
                    raise
        return StoredArtifact(key=key, sha256=sha256_hex(data), size=len(data))

    @staticmethod
    def _write_atomically(path: Path, data: bytes) -> None:
        temp = path.with_name(f".{path.name}.{secrets.token_hex(6)}{_TEMP_SUFFIX}")
        # 0o666 less the umask, like any other file this process writes.
        fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        try:
            with os.fdopen(fd, "wb") as file:
                file.write(data)
                file.flush()
                os.fsync(file.fileno())
            os.replace(temp, path)
            _fsync_folder(path.parent)
        except BaseException:
            with contextlib.suppress(OSError):
                temp.unlink()
            raise

    def get(self, key: str, sha256: str | None = None) -> bytes:
        path = self.path_of(key)
        try:
            data = path.read_bytes()
        except (FileNotFoundError, NotADirectoryError, IsADirectoryError) as exc:
            raise ArtifactMissing(f"no artifact {key!r} in {self.root}") from exc
        if sha256 is not None:
            _verify(key, data, sha256)
        return data

    def exists(self, key: str) -> bool:
        return self.path_of(key).is_file()

    def delete(self, key: str) -> None:
        path = self.path_of(key)
        try:
            path.unlink()
        except (FileNotFoundError, NotADirectoryError, IsADirectoryError):
            return
        self._prune(path.parent)

    def _prune(self, folder: Path) -> None:
        """Remove folders left empty by deletes, up to (not including) the root."""
        while folder != self.root and self.root in folder.parents:
            try:
                folder.rmdir()
            except OSError:  # not empty, already gone, or in use: stop here
                return
            folder = folder.parent

    def delete_prefix(self, prefix: str) -> int:
        deleted = 0
        for key in self.keys(_non_empty_prefix(prefix)):
            path = self.path_of(key)
            try:
                path.unlink()
            except (FileNotFoundError, NotADirectoryError, IsADirectoryError):
                continue
            deleted += 1
            self._prune(path.parent)
        return deleted

    def keys(self, prefix: str = "") -> list[str]:
        validate_prefix(prefix)
        folder_part = prefix.rpartition("/")[0]
        start = self.root.joinpath(*folder_part.split("/")) if folder_part else self.root
        return sorted(key for key in self._walk(start) if key.startswith(prefix))

    def _walk(self, start: Path) -> Iterator[str]:
        if not start.is_dir():
            return
        for dirpath, dirnames, filenames in os.walk(start):
            # Hidden names (temporary files among them) are never keys; symlinked folders are
            # not followed (os.walk's default), so a scan stays under the root.
            dirnames[:] = [name for name in dirnames if not name.startswith(".")]
            relative = Path(dirpath).relative_to(self.root).as_posix()
            for name in filenames:
                if name.startswith("."):
                    continue
                key = name if relative == "." else f"{relative}/{name}"
                if os.path.isfile(os.path.join(dirpath, name)):
                    yield key


def _fsync_folder(folder: Path) -> None:
    """Make a rename in `folder` durable (best effort: not every file system allows it)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


class S3ArtifactStore:
    """Artifacts as objects in an S3-compatible bucket, under an optional key prefix.

    Credentials come from the standard AWS chain (environment, shared config files, instance
    roles) unless `access_key` and `secret_key` are given. Each object also carries its SHA-256
    as ``x-amz-meta-sha256``; `get` without an expected checksum verifies against that.
    """

    def __init__(
        self,
        bucket: str,
        *,
        prefix: str = "",
        endpoint_url: str | None = None,
        region: str | None = None,
        access_key: str | None = None,
        secret_key: str | None = None,
        client: Any = None,
    ) -> None:
        if not bucket:
            raise ValueError("an S3 artifact store needs a bucket name")
        if (access_key is None) != (secret_key is None):
            raise ValueError("give both access_key and secret_key, or neither")
        prefix = prefix.strip("/")
        if prefix:
            validate_key(prefix)
            prefix += "/"
        self.bucket = bucket
        self.prefix = prefix
        self.endpoint_url = endpoint_url
        self.client: Any = (
            client
            if client is not None
            else _make_s3_client(
                endpoint_url=endpoint_url,
                region=region,
                access_key=access_key,
                secret_key=secret_key,
            )
        )

    def __repr__(self) -> str:
        where = f" at {self.endpoint_url}" if self.endpoint_url else ""
        return f"S3ArtifactStore('s3://{self.bucket}/{self.prefix}'{where})"

    def _object_key(self, key: str) -> str:
        return self.prefix + validate_key(key)

    def put(self, key: str, data: bytes, content_type: str = "image/png") -> StoredArtifact:
        object_key = self._object_key(key)
        data = bytes(data)
        digest = sha256_hex(data)
        self.client.put_object(
            Bucket=self.bucket,
            Key=object_key,
            Body=data,
            ContentType=content_type,
            Metadata={"sha256": digest},
        )
        return StoredArtifact(key=key, sha256=digest, size=len(data))

    def get(self, key: str, sha256: str | None = None) -> bytes:
        object_key = self._object_key(key)
        try:
            response = self.client.get_object(Bucket=self.bucket, Key=object_key)
        except Exception as exc:
            if _is_not_found(exc):
                raise ArtifactMissing(f"no artifact {key!r} in s3://{self.bucket}") from exc
            raise
        body = response["Body"]
        try:
            data: bytes = body.read()
        finally:
            body.close()
        expected = sha256 if sha256 is not None else response.get("Metadata", {}).get("sha256")
        if expected:
            _verify(key, data, expected)
        return data

    def exists(self, key: str) -> bool:
        object_key = self._object_key(key)
        try:
            self.client.head_object(Bucket=self.bucket, Key=object_key)
        except Exception as exc:
            if _is_not_found(exc):
                return False
            raise
        return True

    def delete(self, key: str) -> None:
        # DeleteObject succeeds for an absent key.
        self.client.delete_object(Bucket=self.bucket, Key=self._object_key(key))

    def delete_prefix(self, prefix: str) -> int:
        object_keys = [self.prefix + key for key in self.keys(_non_empty_prefix(prefix))]
        for start in range(0, len(object_keys), _S3_DELETE_BATCH):
            batch = object_keys[start : start + _S3_DELETE_BATCH]
            response = self.client.delete_objects(
                Bucket=self.bucket,
                Delete={"Objects": [{"Key": key} for key in batch], "Quiet": True},
            )
            errors = response.get("Errors") or []
            if errors:
                first = errors[0]
                raise OSError(
                    f"could not delete {len(errors)} of {len(batch)} objects from "
                    f"s3://{self.bucket}: {first.get('Key')}: {first.get('Code')} "
                    f"{first.get('Message')}"
                )
        return len(object_keys)

    def keys(self, prefix: str = "") -> list[str]:
        validate_prefix(prefix)
        paginator = self.client.get_paginator("list_objects_v2")
        found: list[str] = []
        pages = paginator.paginate(
            Bucket=self.bucket,
            Prefix=self.prefix + prefix,
            PaginationConfig={"PageSize": _S3_LIST_PAGE},
        )
        for page in pages:
            for item in page.get("Contents", []):
                key = item["Key"][len(self.prefix) :]
                try:
                    validate_key(key)
                except ValueError:
                    # Folder markers ("a/") and objects others put there with names no
                    # artifact can have: not ours.
                    continue
                found.append(key)
        return sorted(found)


def _is_not_found(exc: Exception) -> bool:
    response = getattr(exc, "response", None)
    if not isinstance(response, dict):
        return False
    code = str(response.get("Error", {}).get("Code", ""))
    status = response.get("ResponseMetadata", {}).get("HTTPStatusCode")
    return code in {"NoSuchKey", "404", "NotFound"} or (status == 404 and code != "NoSuchBucket")


def _make_s3_client(
    *,
    endpoint_url: str | None,
    region: str | None,
    access_key: str | None,
    secret_key: str | None,
) -> Any:
    # boto3 is imported only here: processes with a local store never load it. (It ships no
    # type information; imported this way its objects are Any, with no mypy override needed.)
    boto3 = importlib.import_module("boto3")
    config_class = importlib.import_module("botocore.config").Config

    options: dict[str, Any] = {
        "retries": {"max_attempts": 5, "mode": "standard"},
        "connect_timeout": 10,
        "read_timeout": 60,
    }
    if endpoint_url:
        # S3-compatible servers (MinIO, Ceph) want path-style URLs, and not all of them accept
        # the CRC checksums boto3 adds to every upload by default since 1.36.
        options["s3"] = {"addressing_style": "path"}
        options["request_checksum_calculation"] = "when_required"
        options["response_checksum_validation"] = "when_required"
    session = boto3.session.Session(
        aws_access_key_id=access_key,
        aws_secret_access_key=secret_key,
        region_name=region,
    )
    return session.client("s3", endpoint_url=endpoint_url, config=config_class(**options))


_S3_QUERY_OPTIONS = {"endpoint_url", "region"}


def artifact_store_from_url(url: str | None, default_root: Path) -> ArtifactStore:
    """The store a URL names.

    - None or "": a local folder at `default_root`.
    - ``file:///absolute/path``: a local folder there.
    - ``s3://bucket/optional/prefix?endpoint_url=http://host:9000&region=us-east-1``: an
      S3-compatible bucket. Credentials never go in the URL: they come from the standard AWS
      chain (``AWS_ACCESS_KEY_ID`` and ``AWS_SECRET_ACCESS_KEY``, shared config, instance role).
    """
    if url is None or not url.strip():
        return LocalArtifactStore(default_root)
    url = url.strip()
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    if scheme == "file":
        if parts.netloc not in ("", "localhost"):
            raise ValueError(f"artifact store URL {url!r}: a file URL names a local folder only")
        if parts.query or parts.fragment:
            raise ValueError(f"artifact store URL {url!r}: a file URL takes no query or fragment")
        path = Path(unquote(parts.path))
        if not parts.path or not path.is_absolute():
            raise ValueError(
                f"artifact store URL {url!r}: give an absolute path, as in file:///srv/artifacts"
            )
        return LocalArtifactStore(path)
    if scheme == "s3":
        return _s3_store_from_url(url, parts.netloc, parts.path, parts.query, parts.fragment)
    raise ValueError(
        f"artifact store URL {url!r}: unknown scheme {parts.scheme!r}; use file:///absolute/path "
        "or s3://bucket/prefix?endpoint_url=...&region=... (or leave it empty for the data folder)"
    )


def _s3_store_from_url(
    url: str, netloc: str, path: str, query: str, fragment: str
) -> S3ArtifactStore:
    if "@" in netloc:
        raise ValueError(
            "artifact store URL: credentials may not be part of an s3:// URL; set "
            "AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (or use an AWS profile or role)"
        )
    if fragment:
        raise ValueError(f"artifact store URL {url!r}: an s3:// URL takes no fragment")
    bucket = netloc
    if not _BUCKET_NAME.match(bucket):
        raise ValueError(
            f"artifact store URL {url!r}: {bucket!r} is not a valid bucket name "
            "(3 to 63 lowercase letters, digits, dots and hyphens)"
        )
    options: dict[str, str] = {}
    for name, value in parse_qsl(query, keep_blank_values=True, strict_parsing=bool(query)):
        if name not in _S3_QUERY_OPTIONS:
            hint = (
                "; credentials come from AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, never the URL"
                if any(word in name.lower() for word in ("key", "secret", "token", "password"))
                else ""
            )
            raise ValueError(
                f"artifact store URL: unknown option {name!r} (known: endpoint_url, region){hint}"
            )
        if name in options:
            raise ValueError(f"artifact store URL: option {name!r} given twice")
        if not value:
            raise ValueError(f"artifact store URL: option {name!r} is empty")
        options[name] = value
    endpoint_url = options.get("endpoint_url")
    if endpoint_url is not None:
        endpoint = urlsplit(endpoint_url)
        if endpoint.scheme not in ("http", "https") or not endpoint.netloc:
            raise ValueError(
                f"artifact store URL: endpoint_url {endpoint_url!r} must be an http(s) URL"
            )
        if "@" in endpoint.netloc:
            raise ValueError("artifact store URL: endpoint_url may not carry credentials")
    prefix = unquote(path).strip("/")
    if prefix:
        try:
            validate_key(prefix)
        except ValueError as exc:
            raise ValueError(f"artifact store URL {url!r}: bad key prefix: {exc}") from exc
    return S3ArtifactStore(
        bucket, prefix=prefix, endpoint_url=endpoint_url, region=options.get("region")
    )
