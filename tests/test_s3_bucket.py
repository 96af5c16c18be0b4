"""S3Bucket beyond the contract suite: URLs, prefixes, multipart, streaming, version pinning.

The contract suite (tests/contract/test_buckets.py, backend "s3") proves the
interface; these tests prove what only S3 has: where objects land under a
prefix, which uploads go multipart, that a read streams instead of
downloading, and that a reader never mixes two versions of an object.
"""

from __future__ import annotations

import hashlib
import io
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from sluiceway.buckets.base import ObjectExists, ObjectNotFound
from sluiceway.buckets.s3 import MiB, S3Bucket, S3Location
from sluiceway.errors import ConfigError, SluicewayError
from sluiceway.steps.csv import CsvOptions, read_csv_batches

from .s3_backend import client_for, create_bucket, s3_url, use_endpoint_credentials
from .services import S3Endpoint


@pytest.fixture
def s3(s3_endpoint: S3Endpoint, monkeypatch: pytest.MonkeyPatch) -> S3Endpoint:
    use_endpoint_credentials(s3_endpoint, monkeypatch)
    return s3_endpoint


@pytest.fixture
def raw(s3: S3Endpoint) -> Any:
    """Another program's view of the store: a plain boto3 client."""
    return client_for(s3)


def make(
    request: pytest.FixtureRequest, s3: S3Endpoint, prefix: str = "", **options: str
) -> S3Bucket:
    name = create_bucket(request, s3)
    return S3Bucket.from_url("b", s3_url(s3, name, prefix, **options))


# -- URLs (no service needed) ----------------------------------------------------


def test_url_with_prefix_and_options() -> None:
    loc = S3Location.parse(
        "s3://lake/landing/bronze/?endpoint_url=http://127.0.0.1:8333&region=eu-west-1"
        "&path_style=true&multipart_threshold=16MiB&part_size=5MiB&max_concurrency=2"
    )
    assert loc == S3Location(
        bucket="lake",
        prefix="landing/bronze/",
        endpoint_url="http://127.0.0.1:8333",
        region="eu-west-1",
        path_style=True,
        multipart_threshold=16 * MiB,
        part_size=5 * MiB,
        max_concurrency=2,
    )
    assert S3Location.parse("s3://lake").prefix == ""
    assert S3Location.parse("s3://lake/x").describe() == "s3://lake/x/"


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("s3://key:secret@lake", "credentials never go in the URL"),
        ("s3://lake?endpoint=http://x", "unknown option 'endpoint'"),
        ("s3://lake?path_style=maybe", "path_style: expected true or false"),
        ("s3://lake?part_size=1MiB", "at least 5MiB"),
        ("s3://lake?multipart_threshold=lots", "expected a size"),
        ("s3:///prefix", "no bucket name"),
    ],
)
def test_bad_urls_are_config_errors(url: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message) as e:
        S3Bucket.from_url("bronze", url)
    assert "secret" not in str(e.value)


def test_from_url_makes_no_network_call(monkeypatch: pytest.MonkeyPatch) -> None:
    # Loading a pipeline (`sluiceway validate`) must work without credentials or network.
    bucket = S3Bucket.from_url("bronze", "s3://nowhere?endpoint_url=http://127.0.0.1:1")
    assert bucket.local_path("a.csv") is None
    assert "nowhere" in repr(bucket)


# -- against SeaweedFS ---------------------------------------------------------


def test_prefix_maps_keys_under_a_folder(
    request: pytest.FixtureRequest, s3: S3Endpoint, raw: Any
) -> None:
    name = create_bucket(request, s3)
    bronze = S3Bucket.from_url("bronze", s3_url(s3, name, "landing/bronze"))
    staging = S3Bucket.from_url("staging", s3_url(s3, name, "landing/staging"))
    bronze.put_bytes("in/a.csv", b"a")
    staging.put_bytes("in/a.parquet", b"b")
    raw.put_object(Bucket=name, Key="landing/bronze/folder/", Body=b"")  # a console "folder"
    keys = [o["Key"] for o in raw.list_objects_v2(Bucket=name)["Contents"]]
    assert keys == [
        "landing/bronze/folder/",
        "landing/bronze/in/a.csv",
        "landing/staging/in/a.parquet",
    ]
    assert [o.key for o in bronze.list()] == ["in/a.csv"]  # relative keys, no folder marker
    assert [o.key for o in staging.list("in/")] == ["in/a.parquet"]
    assert bronze.read_bytes("in/a.csv") == b"a"
    with pytest.raises(ObjectNotFound):
        bronze.head("in/a.parquet")
    bronze.delete("in/a.csv")
    assert list(bronze.list()) == []


def test_odd_keys_round_trip(request: pytest.FixtureRequest, s3: S3Endpoint) -> None:
    bucket = make(request, s3)
    keys = ["a b+c.csv", "ü/ñ.csv", "x%2Fy.csv", "q?=&.csv"]
    for key in keys:
        bucket.put_bytes(key, key.encode())
    assert sorted(o.key for o in bucket.list()) == sorted(keys)
    for key in keys:
        assert bucket.read_bytes(key) == key.encode()


def test_large_write_is_a_multipart_upload(
    request: pytest.FixtureRequest, s3: S3Endpoint, raw: Any
) -> None:
    bucket = make(request, s3, multipart_threshold="5MiB", part_size="5MiB")
    data = bytes(range(256)) * (11 * MiB // 256)  # 11 MiB: three parts
    with bucket.open_write("big.bin") as f:
        for i in range(0, len(data), MiB):
            f.write(data[i : i + MiB])
        with pytest.raises(ObjectNotFound):  # nothing is visible before the block ends
            bucket.head("big.bin")
    info = bucket.head("big.bin")
    assert info.size == len(data)
    assert info.etag.endswith("-3") and '"' not in info.etag  # S3's multipart ETag, kept
    assert [o.etag for o in bucket.list()] == [info.etag]  # the same identity when listed
    assert hashlib.md5(bucket.read_bytes("big.bin")).digest() == hashlib.md5(data).digest()
    small = bucket.put_bytes("small.bin", b"tiny")
    assert small.etag == hashlib.md5(b"tiny").hexdigest()  # single PUT: the content's MD5
    assert raw.list_multipart_uploads(Bucket=bucket.location.bucket).get("Uploads", []) == []


def test_large_conditional_write_is_refused_and_leaves_no_parts(
    request: pytest.FixtureRequest, s3: S3Endpoint, raw: Any
) -> None:
    bucket = make(request, s3, multipart_threshold="5MiB", part_size="5MiB")
    data = b"x" * (6 * MiB)
    bucket.put_bytes("once.bin", data, if_absent=True)
    assert bucket.head("once.bin").etag.endswith("-2")
    with pytest.raises(ObjectExists):
        bucket.put_bytes("once.bin", b"y" * (6 * MiB), if_absent=True)
    assert bucket.read_bytes("once.bin") == data
    assert raw.list_multipart_uploads(Bucket=bucket.location.bucket).get("Uploads", []) == []


def test_put_file_uploads_from_a_path(
    request: pytest.FixtureRequest, s3: S3Endpoint, tmp_path: Path
) -> None:
    bucket = make(request, s3, multipart_threshold="5MiB", part_size="5MiB")
    path = tmp_path / "part-0.parquet"
    path.write_bytes(b"z" * (6 * MiB))
    info = bucket.put_file("out/part-0.parquet", str(path))
    assert info.size == 6 * MiB and info.etag.endswith("-2")
    with pytest.raises(ValueError, match="invalid object key"):
        bucket.put_file("../escape", str(path))


def test_csv_reads_stream_without_downloading_the_object(
    request: pytest.FixtureRequest, s3: S3Endpoint
) -> None:
    bucket = make(request, s3)
    rows = 900_000  # about 16 MiB
    body = "id,name\n" + "".join(f"{i},name-{i:09d}\n" for i in range(rows))
    bucket.put_bytes("big.csv", body.encode())
    size = bucket.head("big.csv").size
    assert size > 15 * MiB
    with bucket.open_read("big.csv") as f:
        batches = read_csv_batches(f, name="big.csv", options=CsvOptions(block_size=64 * 1024))
        first = next(batches)
        # After the first batch only pyarrow's read-ahead has come over the wire.
        assert f.raw.tell() < 3 * MiB  # type: ignore[attr-defined]
        total = first.num_rows + sum(b.num_rows for b in batches)
        assert f.raw.tell() == size  # type: ignore[attr-defined]
    assert total == rows


def test_parquet_reads_seek_with_ranged_gets(
    request: pytest.FixtureRequest, s3: S3Endpoint
) -> None:
    bucket = make(request, s3)
    table = pa.table({"id": list(range(10_000)), "v": [str(i) for i in range(10_000)]})
    with bucket.open_write("t.parquet") as f:
        pq.write_table(table, f, row_group_size=1000)
    with bucket.open_read("t.parquet") as f:
        assert f.seekable()
        pf = pq.ParquetFile(f)  # reads the footer at the end first
        assert pf.metadata.num_row_groups == 10
        assert pf.read_row_group(7).column("id").to_pylist() == list(range(7000, 8000))
        assert pf.read().equals(table)


def test_a_reader_never_mixes_two_versions(request: pytest.FixtureRequest, s3: S3Endpoint) -> None:
    bucket = make(request, s3)
    bucket.put_bytes("k.bin", b"a" * (2 * MiB))
    with bucket.open_read("k.bin") as f:
        assert f.read(10) == b"a" * 10
        bucket.put_bytes("k.bin", b"b" * (2 * MiB))  # replaced mid-read
        assert f.read(1000) == b"a" * 1000  # the open response still streams the first version
        f.seek(MiB + 12345)  # past the buffer: a new GET, pinned to that version by If-Match
        with pytest.raises(ObjectNotFound, match="replaced by a new version"):
            f.read(10)


def test_a_dropped_connection_resumes_where_it_stopped(
    request: pytest.FixtureRequest, s3: S3Endpoint
) -> None:
    bucket = make(request, s3)
    data = bytes(range(256)) * 4096
    bucket.put_bytes("blob", data)
    with bucket.open_read("blob") as f:
        head = f.read(100_000)
        f.raw._body.close()  # type: ignore[attr-defined]  # the connection goes away
        rest = f.read()
    assert head + rest == data


def test_missing_bucket_and_missing_credentials_say_what_to_do(
    s3: S3Endpoint, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    missing = S3Bucket.from_url("bronze", s3_url(s3, "no-such-bucket-here"))
    with pytest.raises(SluicewayError, match=r"does not exist.*create it first"):
        list(missing.list())
    for var in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_PROFILE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    anonymous = S3Bucket.from_url("bronze", s3_url(s3, "whatever"))
    with pytest.raises(SluicewayError, match=r"no AWS credentials found.*AWS_ACCESS_KEY_ID"):
        anonymous.head("a.csv")


def test_writer_close_does_not_publish_or_lose_data(
    request: pytest.FixtureRequest, s3: S3Endpoint
) -> None:
    # PyArrow closes the file it writes to; the upload belongs to the block's end.
    bucket = make(request, s3)
    with bucket.open_write("x.bin") as f:
        f.write(b"abc")
        f.close()
        with pytest.raises(ObjectNotFound):
            bucket.head("x.bin")
        f.write(b"def")
    assert bucket.read_bytes("x.bin") == b"abcdef"
    assert isinstance(bucket.open_read("x.bin"), io.BufferedReader)
