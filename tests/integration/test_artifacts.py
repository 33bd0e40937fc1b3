"""The artifact stores: a local folder and an S3 bucket (moto's S3 server, in this process)."""

from __future__ import annotations

import hashlib
import logging
import os
import re
import subprocess
import sys
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from chitrakar.artifacts import (
    ArtifactCorrupt,
    ArtifactMissing,
    ArtifactStore,
    LocalArtifactStore,
    S3ArtifactStore,
    StoredArtifact,
    artifact_store_from_url,
)

BUCKET = "chitrakar-test"
REGION = "us-east-1"
ACCESS_KEY = "testing-access-key"
SECRET_KEY = "testing-secret-key"

INVALID_KEYS = ["../x", "/abs", "a//b", "a\\b", "", "a/../b", "a/./b", "a/", "a/.hidden", "a\x00b"]


@pytest.fixture(scope="module")
def s3_endpoint() -> Iterator[str]:
    """moto's S3 server on a free local port, once for the module; offline."""
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one log line per request otherwise
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    try:
        yield f"http://{host}:{port}"
    finally:
        server.stop()


@pytest.fixture(scope="module")
def s3_client(s3_endpoint: str) -> Any:
    """One client for the module's stores (making one costs about 0.3 s), and the bucket."""
    client = _client(s3_endpoint)
    client.create_bucket(Bucket=BUCKET)
    return client


def _client(endpoint: str) -> Any:
    import boto3

    return boto3.client(
        "s3",
        endpoint_url=endpoint,
        region_name=REGION,
        aws_access_key_id=ACCESS_KEY,
        aws_secret_access_key=SECRET_KEY,
    )


def _s3_store(client: Any, prefix: str | None = None) -> S3ArtifactStore:
    """A store with a prefix of its own in the shared bucket."""
    return S3ArtifactStore(
        BUCKET,
        prefix=prefix if prefix is not None else f"test-{uuid.uuid4().hex[:12]}",
        client=client,
    )


@pytest.fixture(params=["local", "s3"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> ArtifactStore:
    if request.param == "local":
        return LocalArtifactStore(tmp_path / "artifacts")
    return _s3_store(request.getfixturevalue("s3_client"))


def _corrupt(store: ArtifactStore, key: str, data: bytes) -> None:
    """Change the stored bytes behind the store's back."""
    if isinstance(store, LocalArtifactStore):
        store.path_of(key).write_bytes(data)
    else:
        assert isinstance(store, S3ArtifactStore)
        store.client.put_object(Bucket=store.bucket, Key=store.prefix + key, Body=data)


def test_both_stores_satisfy_the_protocol(store: ArtifactStore) -> None:
    assert isinstance(store, ArtifactStore)


def test_put_get_round_trip(store: ArtifactStore) -> None:
    data = b"\x89PNG\r\n\x1a\n" + os.urandom(3000)
    stored = store.put("results/42/0-1234.png", data)
    assert stored == StoredArtifact(
        key="results/42/0-1234.png", sha256=hashlib.sha256(data).hexdigest(), size=len(data)
    )
    assert store.get(stored.key) == data
    assert store.get(stored.key, stored.sha256) == data
    assert store.get(stored.key, stored.sha256.upper()) == data
    assert store.exists(stored.key)
    assert not store.exists("results/42/other.png")


def test_put_replaces_and_empty_bytes_are_fine(store: ArtifactStore) -> None:
    store.put("a/b.png", b"first")
    stored = store.put("a/b.png", b"")
    assert stored.size == 0
    assert stored.sha256 == hashlib.sha256(b"").hexdigest()
    assert store.get("a/b.png", stored.sha256) == b""
    assert store.keys() == ["a/b.png"]


def test_wrong_checksum_is_corrupt(store: ArtifactStore) -> None:
    stored = store.put("results/1/0.png", b"the real picture")
    with pytest.raises(ArtifactCorrupt, match=re.escape("results/1/0.png")):
        store.get(stored.key, hashlib.sha256(b"something else").hexdigest())

    _corrupt(store, stored.key, b"the real picturf")
    with pytest.raises(ArtifactCorrupt):
        store.get(stored.key, stored.sha256)
    # Without a checksum to compare, the (changed) bytes come back as they are.
    assert store.get(stored.key) == b"the real picturf"


def test_absent_key_is_missing(store: ArtifactStore) -> None:
    with pytest.raises(ArtifactMissing, match=re.escape("results/9/none.png")):
        store.get("results/9/none.png")
    store.put("results/9", b"a file where a folder would be")
    with pytest.raises(ArtifactMissing):
        store.get("results/9/none.png")
    assert not store.exists("results/9/none.png")
    assert isinstance(ArtifactMissing("x"), LookupError)
    assert isinstance(ArtifactCorrupt("x"), ValueError)


def test_delete_is_idempotent(store: ArtifactStore) -> None:
    store.put("results/3/0.png", b"x")
    store.put("results/3/1.png", b"y")
    store.delete("results/3/0.png")
    store.delete("results/3/0.png")
    store.delete("never/was.png")
    store.delete("results/3")  # a "folder" is no artifact: nothing happens
    assert not store.exists("results/3/0.png")
    assert store.keys() == ["results/3/1.png"]


def test_delete_prefix_deletes_exactly_that_prefix(store: ArtifactStore) -> None:
    for key in [
        "results/4/0.png",
        "results/4/1.png",
        "results/4/deep/2.png",
        "results/42/0.png",
        "results/4.png",
        "inputs/4/0.png",
    ]:
        store.put(key, key.encode())
    assert store.delete_prefix("results/4/") == 3
    assert store.keys() == ["inputs/4/0.png", "results/4.png", "results/42/0.png"]
    assert store.delete_prefix("results/4/") == 0
    assert store.delete_prefix("nothing/here/") == 0
    assert store.get("results/42/0.png") == b"results/42/0.png"
    with pytest.raises(ValueError, match="non-empty prefix"):
        store.delete_prefix("")


def test_keys_by_prefix(store: ArtifactStore) -> None:
    assert store.keys() == []
    for key in ["results/42/1.png", "results/42/0.png", "results/4/0.png", "inputs/a.png"]:
        store.put(key, b"x")
    assert store.keys() == [
        "inputs/a.png",
        "results/4/0.png",
        "results/42/0.png",
        "results/42/1.png",
    ]
    assert store.keys("results/42/") == ["results/42/0.png", "results/42/1.png"]
    assert store.keys("results/4/") == ["results/4/0.png"]
    # A prefix is a string prefix, as in S3: it may end inside a segment.
    assert store.keys("results/4") == ["results/4/0.png", "results/42/0.png", "results/42/1.png"]
    assert store.keys("results/42/1") == ["results/42/1.png"]
    assert store.keys("res") == store.keys("results/")
    assert store.keys("nothing/") == []
    assert store.keys("inputs/a.png") == ["inputs/a.png"]


@pytest.mark.parametrize("key", INVALID_KEYS)
def test_invalid_keys_are_rejected(store: ArtifactStore, key: str) -> None:
    with pytest.raises(ValueError):
        store.put(key, b"x")
    with pytest.raises(ValueError):
        store.get(key)
    with pytest.raises(ValueError):
        store.exists(key)
    with pytest.raises(ValueError):
        store.delete(key)
    if isinstance(store, LocalArtifactStore):
        with pytest.raises(ValueError):
            store.path_of(key)
    assert store.keys() == []


@pytest.mark.parametrize("prefix", ["../", "/abs/", "a//", "a\\", "a/../", "a/."])
def test_invalid_prefixes_are_rejected(store: ArtifactStore, prefix: str) -> None:
    with pytest.raises(ValueError):
        store.keys(prefix)
    with pytest.raises(ValueError):
        store.delete_prefix(prefix)


def test_long_keys(store: ArtifactStore) -> None:
    key = "results/" + "a" * 200 + ".png"
    store.put(key, b"x")
    assert store.keys("results/") == [key]
    with pytest.raises(ValueError, match="longer than"):
        store.put("results/" + "a/" * 600 + "x.png", b"x")


# Local folder specifics


def test_local_keys_map_to_paths_under_the_root(tmp_path: Path) -> None:
    store = LocalArtifactStore(tmp_path / "artifacts")
    store.put("results/42/0.png", b"x")
    path = store.path_of("results/42/0.png")
    assert path == (tmp_path / "artifacts" / "results" / "42" / "0.png").resolve()
    assert path.read_bytes() == b"x"
    assert list(store.root.iterdir()) == [store.root / "results"]


def test_local_write_is_atomic(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    store = LocalArtifactStore(tmp_path)
    store.put("results/5/0.png", b"old picture")

    def crash(src: Any, dst: Any) -> None:
        raise OSError("disk went away")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(OSError, match="disk went away"):
        store.put("results/5/0.png", b"new picture")
    with pytest.raises(OSError, match="disk went away"):
        store.put("results/5/1.png", b"new picture")
    monkeypatch.undo()

    # The old file is whole, the new one never appeared, and no temporary file is left.
    assert store.get("results/5/0.png") == b"old picture"
    assert not store.exists("results/5/1.png")
    assert sorted(p.name for p in (tmp_path / "results" / "5").iterdir()) == ["0.png"]
    assert store.keys() == ["results/5/0.png"]


def test_local_temporary_files_are_never_keys(tmp_path: Path) -> None:
    store = LocalArtifactStore(tmp_path)
    store.put("results/6/0.png", b"x")
    # What a writer in another process looks like halfway through.
    (tmp_path / "results" / "6" / ".1.png.0123456789ab.tmp").write_bytes(b"half")
    (tmp_path / ".hidden").mkdir()
    (tmp_path / ".hidden" / "x.png").write_bytes(b"x")
    assert store.keys() == ["results/6/0.png"]
    assert store.keys("results/6/") == ["results/6/0.png"]
    assert store.delete_prefix("results/6/") == 1
    assert (tmp_path / "results" / "6" / ".1.png.0123456789ab.tmp").exists()


def test_local_readers_never_see_a_partial_file(tmp_path: Path) -> None:
    store = LocalArtifactStore(tmp_path)
    versions = [bytes([n]) * 200_000 for n in range(2)]
    digests = {hashlib.sha256(v).hexdigest() for v in versions}
    store.put("results/7/0.png", versions[0])
    done = threading.Event()

    def write() -> None:
        for n in range(30):
            store.put("results/7/0.png", versions[n % 2])
        done.set()

    writer = threading.Thread(target=write)
    writer.start()
    reads = 0
    while not done.is_set() or reads == 0:
        data = store.get("results/7/0.png")
        assert hashlib.sha256(data).hexdigest() in digests
        reads += 1
    writer.join()
    assert store.keys() == ["results/7/0.png"]


def test_local_delete_prunes_empty_folders(tmp_path: Path) -> None:
    store = LocalArtifactStore(tmp_path / "artifacts")
    store.put("results/8/a/0.png", b"x")
    store.put("results/8/1.png", b"x")
    store.delete("results/8/a/0.png")
    assert not (store.root / "results" / "8" / "a").exists()
    assert store.delete_prefix("results/8/") == 1
    assert list(store.root.iterdir()) == []
    assert store.root.is_dir()
    store.put("results/8/a/0.png", b"again")
    assert store.get("results/8/a/0.png") == b"again"


# S3 specifics


def test_s3_stores_the_checksum_as_metadata_and_checks_it(s3_client: Any) -> None:
    store = _s3_store(s3_client)
    stored = store.put("results/1/0.png", b"picture", content_type="image/png")
    head = store.client.head_object(Bucket=BUCKET, Key=store.prefix + "results/1/0.png")
    assert head["Metadata"] == {"sha256": stored.sha256}
    assert head["ContentType"] == "image/png"
    assert head["ContentLength"] == len(b"picture")

    # Bytes changed under metadata that still names the old checksum: corrupt even when the
    # caller gives no checksum.
    store.client.put_object(
        Bucket=BUCKET,
        Key=store.prefix + "results/1/0.png",
        Body=b"pictur3",
        Metadata={"sha256": stored.sha256},
    )
    with pytest.raises(ArtifactCorrupt):
        store.get("results/1/0.png")


def test_s3_prefixes_keep_stores_apart(s3_client: Any) -> None:
    first = _s3_store(s3_client)
    second = _s3_store(s3_client, prefix=first.prefix.rstrip("/") + "x")
    first.put("results/1/0.png", b"first")
    second.put("results/1/0.png", b"second")
    assert first.keys() == ["results/1/0.png"]
    assert first.get("results/1/0.png") == b"first"
    assert first.delete_prefix("results/") == 1
    assert second.get("results/1/0.png") == b"second"
    assert first.prefix.endswith("/")
    assert first.prefix.rstrip("/") + "x/" == second.prefix


def test_s3_keys_skip_objects_no_artifact_can_be(s3_client: Any) -> None:
    store = _s3_store(s3_client)
    store.put("results/2/0.png", b"x")
    for foreign in ["results/2/", "results//x.png", "results/2/.DS_Store"]:
        store.client.put_object(Bucket=BUCKET, Key=store.prefix + foreign, Body=b"")
    assert store.keys() == ["results/2/0.png"]
    assert store.delete_prefix("results/2/") == 1


def test_s3_delete_prefix_in_batches(s3_client: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    # DeleteObjects takes 1000 keys at most; a batch of 2 shows the batching.
    monkeypatch.setattr("chitrakar.artifacts._S3_DELETE_BATCH", 2)
    store = _s3_store(s3_client)
    keys = [f"results/3/{n}.png" for n in range(5)]
    for key in keys:
        store.put(key, b"x")
    store.put("results/30.png", b"x")
    assert store.delete_prefix("results/3/") == 5
    assert store.keys() == ["results/30.png"]


def test_s3_keys_page_through_listings(s3_client: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("chitrakar.artifacts._S3_LIST_PAGE", 3)
    store = _s3_store(s3_client)
    keys = [f"results/4/{n:02d}.png" for n in range(7)]
    for key in reversed(keys):
        store.put(key, b"x")
    assert store.keys() == keys
    assert store.keys("results/4/0") == keys


def test_s3_needs_both_keys_or_neither() -> None:
    with pytest.raises(ValueError, match="both"):
        S3ArtifactStore(BUCKET, access_key="a", client=object())
    with pytest.raises(ValueError, match="bucket"):
        S3ArtifactStore("", client=object())
    with pytest.raises(ValueError):
        S3ArtifactStore(BUCKET, prefix="a/../b", client=object())


def test_s3_with_an_unreachable_server_raises_not_missing() -> None:
    import boto3
    from botocore.config import Config

    client = boto3.client(
        "s3",
        endpoint_url="http://127.0.0.1:9",
        region_name=REGION,
        aws_access_key_id=ACCESS_KEY,
        aws_secret_access_key=SECRET_KEY,
        config=Config(retries={"total_max_attempts": 1}, connect_timeout=2),
    )
    store = S3ArtifactStore(BUCKET, client=client)
    with pytest.raises(Exception) as raised:
        store.get("results/1/0.png")
    assert not isinstance(raised.value, ArtifactMissing)
    with pytest.raises(Exception) as raised:
        store.exists("results/1/0.png")


# Choosing a store


def test_importing_the_module_does_not_load_boto3() -> None:
    code = "import sys, chitrakar.artifacts; sys.exit('boto3' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], check=False).returncode == 0


@pytest.mark.parametrize("url", [None, "", "  "])
def test_url_none_is_the_default_folder(url: str | None, tmp_path: Path) -> None:
    store = artifact_store_from_url(url, tmp_path / "results")
    assert isinstance(store, LocalArtifactStore)
    assert store.root == (tmp_path / "results").resolve()


def test_url_file(tmp_path: Path) -> None:
    store = artifact_store_from_url(f"file://{tmp_path}/some%20where", tmp_path / "unused")
    assert isinstance(store, LocalArtifactStore)
    assert store.root == (tmp_path / "some where").resolve()
    store.put("results/1/0.png", b"x")
    assert (tmp_path / "some where" / "results" / "1" / "0.png").read_bytes() == b"x"
    localhost = artifact_store_from_url(f"file://localhost{tmp_path}", tmp_path / "unused")
    assert isinstance(localhost, LocalArtifactStore)
    assert localhost.root == tmp_path.resolve()


def test_url_s3(
    s3_endpoint: str, s3_client: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Credentials from the environment only; no shared config files, profile or instance role.
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", ACCESS_KEY)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET_KEY)
    monkeypatch.delenv("AWS_SESSION_TOKEN", raising=False)
    monkeypatch.delenv("AWS_PROFILE", raising=False)
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-config"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-credentials"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    prefix = f"url-{uuid.uuid4().hex[:8]}"
    store = artifact_store_from_url(
        f"s3://{BUCKET}/{prefix}/deep/?endpoint_url={s3_endpoint}&region={REGION}",
        tmp_path / "unused",
    )
    assert isinstance(store, S3ArtifactStore)
    assert (store.bucket, store.prefix) == (BUCKET, f"{prefix}/deep/")
    stored = store.put("results/1/0.png", b"over s3")
    assert store.get("results/1/0.png", stored.sha256) == b"over s3"
    assert s3_client.get_object(Bucket=BUCKET, Key=f"{prefix}/deep/results/1/0.png")[
        "Body"
    ].read() == (b"over s3")
    assert not (tmp_path / "unused").exists()

    bare = artifact_store_from_url(f"s3://{BUCKET}?region={REGION}", tmp_path / "unused")
    assert isinstance(bare, S3ArtifactStore)
    assert (bare.prefix, bare.endpoint_url) == ("", None)


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("ftp://host/x", "unknown scheme"),
        ("/just/a/path", "unknown scheme"),
        ("s3:/", "bucket name"),
        ("file://otherhost/srv/x", "local folder"),
        ("file:relative/path", "absolute path"),
        ("file:///srv/x?mode=1", "no query"),
        (f"s3://{BUCKET}/p?access_key=a&secret_key=b", "AWS_ACCESS_KEY_ID"),
        (f"s3://{BUCKET}/p?aws_secret_access_key=b", "AWS_ACCESS_KEY_ID"),
        (f"s3://key:secret@{BUCKET}/p", "AWS_ACCESS_KEY_ID"),
        (f"s3://{BUCKET}/p?colour=blue", "unknown option"),
        (f"s3://{BUCKET}/p?region=a&region=b", "twice"),
        (f"s3://{BUCKET}/p?region=", "empty"),
        (f"s3://{BUCKET}/p?endpoint_url=minio:9000", "http"),
        (f"s3://{BUCKET}/a/../b", "prefix"),
        ("s3://Not_A_Bucket/p", "bucket name"),
    ],
)
def test_bad_urls(url: str, message: str, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=message):
        artifact_store_from_url(url, tmp_path)
