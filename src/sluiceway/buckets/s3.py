"""A bucket on S3 or an S3-compatible store (SeaweedFS, MinIO, …), through boto3.

The URL names where the objects are, never who may read them::

    s3://BUCKET[/PREFIX][?endpoint_url=http://127.0.0.1:8333&region=us-east-1&path_style=true]

Credentials come from boto3's standard chain (``AWS_ACCESS_KEY_ID`` /
``AWS_SECRET_ACCESS_KEY`` / ``AWS_SESSION_TOKEN``, ``AWS_PROFILE`` and
``~/.aws/config``, SSO, the instance or task role), so the pipeline file can be
committed and the same file runs on a laptop and in AWS. A URL with a user or
password in it is refused.

Query options (all optional):

``endpoint_url``
    an S3-compatible endpoint; without it, AWS S3.
``region``
    the signing region (default: the chain's, e.g. ``AWS_DEFAULT_REGION``).
``path_style``
    ``true`` for ``http://host/bucket/key`` addressing, which most
    S3-compatible stores need; AWS uses virtual-hosted style.
``multipart_threshold``, ``part_size``
    objects of this size or more are written in parts of ``part_size``
    (default 8 MiB each; S3's minimum part is 5 MiB). Sizes take ``KiB``,
    ``MiB`` or ``GiB``.
``max_concurrency``
    parts uploaded at once (default 4).

``PREFIX`` maps the bucket's keys under a folder of the S3 bucket: with
``s3://lake/landing/bronze`` the key ``in/a.csv`` is the S3 object
``landing/bronze/in/a.csv``. Several pipeline buckets can share one S3 bucket
this way.

How the bucket contract is kept on S3:

- *Nobody sees half an object*: S3 publishes an object only when its PUT or
  its multipart upload completes. ``open_write`` first spools the data to a
  temporary file (in memory up to a few MiB, then on disk: memory stays flat)
  and uploads only when the block exits cleanly; an exception uploads nothing,
  and a failed multipart upload is aborted, so no parts are left to pay for.
- *Conditional put* is S3's ``If-None-Match: *`` (on the PUT, or on
  CompleteMultipartUpload for large objects): a lost race is ObjectExists.
- *Streaming reads*: ``open_read`` returns a buffered reader over the GET's
  body, so the CSV reader pulls the object as it parses it. It can also seek
  (for Parquet footers and zip directories): a seek re-opens the GET at the
  new offset with a ``Range`` header, pinned to the first response's ETag by
  ``If-Match`` so a reader never mixes two versions. A connection dropped
  mid-object is resumed the same way.
- *Identity*: the ETag without its quotes, which for single-part uploads is
  the MD5 of the content. Multipart objects keep S3's
  ``<md5 of part md5s>-<parts>`` form: it is still a stable version identity,
  just not the content's MD5. (A local bucket hashes with xxh3 instead: an
  ETag is only compared within its own bucket.)
- *Keys* follow the same rules as on a local bucket (no empty, ``.`` or
  ``..`` segments, no leading ``/``) for every object Sluiceway writes, so a
  pipeline that runs on S3 also runs on directories. Keys ending in ``/``
  (the "folders" consoles create) are not objects and are never listed.
"""

from __future__ import annotations

import contextlib
import io
import logging
import re
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import IO, Any, BinaryIO
from urllib.parse import parse_qs, urlsplit

from .. import faults
from ..aws_clients import session as boto_session
from ..aws_clients import watch_client
from ..errors import ConfigError, SluicewayError
from .base import Bucket, ObjectExists, ObjectInfo, ObjectNotFound

log = logging.getLogger("sluiceway.buckets.s3")

MiB = 1 << 20
DEFAULT_PART_SIZE = 8 * MiB
MIN_PART_SIZE = 5 * MiB  # S3 refuses smaller parts (except the last one)
# open_write keeps this much in memory before its spool file moves to disk.
SPOOL_IN_MEMORY = 4 * MiB
READ_BUFFER = 256 * 1024
# A forward seek this short reads through instead of opening a new GET.
SEEK_READ_THROUGH = 64 * 1024
READ_RETRIES = 3

_SIZE_RE = re.compile(r"^\s*(\d+)\s*(b|kib|kb|mib|mb|gib|gb)?\s*$", re.IGNORECASE)
_SIZE_UNITS = {None: 1, "b": 1, "kib": 1024, "kb": 1024, "mib": MiB, "mb": MiB}
_SIZE_UNITS.update({"gib": 1 << 30, "gb": 1 << 30})
_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}
OPTIONS = ("endpoint_url", "region", "path_style", "multipart_threshold", "part_size")
OPTIONS += ("max_concurrency",)


def check_key(key: str, bucket: str) -> None:
    """Refuse keys a local bucket could not hold: the same pipeline must run on both."""
    parts = key.split("/")
    if not key or key.startswith("/") or any(p in ("", ".", "..") for p in parts):
        raise ValueError(f"invalid object key {key!r} for bucket {bucket!r}")


def _size(value: str, what: str) -> int:
    m = _SIZE_RE.match(value)
    if m is None:
        raise ValueError(f"{what}: expected a size such as 8MiB, got {value!r}")
    return int(m.group(1)) * _SIZE_UNITS[m.group(2).lower() if m.group(2) else None]


def _etag(raw: str) -> str:
    return raw.strip('"')


def _error_code(exc: Exception) -> str:
    response = getattr(exc, "response", None) or {}
    return str(response.get("Error", {}).get("Code", ""))


def _status(exc: Exception) -> int:
    response = getattr(exc, "response", None) or {}
    return int(response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0) or 0)


_NOT_FOUND = {"404", "NoSuchKey", "NotFound"}
_PRECONDITION = {"412", "PreconditionFailed"}


@dataclass(frozen=True)
class S3Location:
    """A parsed ``s3://`` URL: where the objects are and how to write them."""

    bucket: str
    prefix: str = ""
    endpoint_url: str | None = None
    region: str | None = None
    path_style: bool = False
    multipart_threshold: int = DEFAULT_PART_SIZE
    part_size: int = DEFAULT_PART_SIZE
    max_concurrency: int = 4

    @classmethod
    def parse(cls, url: str) -> S3Location:
        """Parse an ``s3://`` URL; ValueError names the first problem."""
        parts = urlsplit(url)
        if parts.scheme.lower() != "s3":
            raise ValueError(f"expected an s3:// URL, got {url!r}")
        if parts.username is not None or parts.password is not None:
            raise ValueError(
                "credentials never go in the URL: set AWS_ACCESS_KEY_ID and "
                "AWS_SECRET_ACCESS_KEY (or AWS_PROFILE) in the environment"
            )
        if not parts.hostname:
            raise ValueError(f"no bucket name in {url!r} (expected s3://BUCKET[/PREFIX])")
        query = parse_qs(parts.query, keep_blank_values=True)
        unknown = sorted(set(query) - set(OPTIONS))
        if unknown:
            raise ValueError(f"unknown option {unknown[0]!r} (known: {', '.join(OPTIONS)})")
        opts = {k: v[-1] for k, v in query.items()}
        prefix = parts.path.strip("/")
        kwargs: dict[str, Any] = {
            "bucket": parts.netloc,
            "prefix": f"{prefix}/" if prefix else "",
            "endpoint_url": opts.get("endpoint_url") or None,
            "region": opts.get("region") or None,
        }
        if "path_style" in opts:
            flag = opts["path_style"].lower()
            if flag not in _TRUE | _FALSE:
                raise ValueError(f"path_style: expected true or false, got {opts['path_style']!r}")
            kwargs["path_style"] = flag in _TRUE
        for name in ("multipart_threshold", "part_size"):
            if name in opts:
                kwargs[name] = _size(opts[name], name)
        if kwargs.get("part_size", MIN_PART_SIZE) < MIN_PART_SIZE:
            raise ValueError("part_size: S3 parts are at least 5MiB")
        if "max_concurrency" in opts:
            if not opts["max_concurrency"].isdigit() or int(opts["max_concurrency"]) < 1:
                raise ValueError("max_concurrency: expected a whole number of at least 1")
            kwargs["max_concurrency"] = int(opts["max_concurrency"])
        return cls(**kwargs)

    def describe(self) -> str:
        """Where the objects are, for logs and as the identity of the place (no secrets)."""
        where = f"s3://{self.bucket}/{self.prefix}"
        return f"{where} at {self.endpoint_url}" if self.endpoint_url else where


class _SpoolWriter:
    """What ``open_write`` hands out: writes go to the spool; ``close`` does not publish.

    Writers such as PyArrow's close the file they were given when they are
    done, which must neither lose the spool nor upload anything: the upload
    belongs to the end of the ``with`` block.
    """

    def __init__(self, spool: IO[bytes]) -> None:
        self._spool = spool
        self._size = 0

    def write(self, data: bytes | bytearray | memoryview) -> int:
        n = self._spool.write(data)
        self._size += n
        return n

    def flush(self) -> None:
        pass

    def writable(self) -> bool:
        return True

    def readable(self) -> bool:
        return False

    def seekable(self) -> bool:
        return False

    def tell(self) -> int:
        return self._size

    @property
    def closed(self) -> bool:
        return False

    def close(self) -> None:
        pass

    @property
    def size(self) -> int:
        return self._size


class _S3Reader(io.RawIOBase):
    """The body of one object version as a seekable raw stream.

    Reads pull from the open GET response; a seek (or a dropped connection)
    re-opens it at the new offset with ``Range`` and ``If-Match``, so every
    byte comes from the version the first GET returned. If that version was
    replaced meanwhile, reading raises ObjectNotFound: the new version has an
    event of its own.
    """

    def __init__(self, bucket: S3Bucket, key: str, response: dict[str, Any]) -> None:
        super().__init__()
        self._bucket = bucket
        self._key = key
        self._body: Any = response["Body"]
        self._etag = str(response["ETag"])
        self._size = int(response["ContentLength"])
        self._pos = 0
        self.name = f"s3://{bucket.location.bucket}/{bucket.location.prefix}{key}"

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        if whence == io.SEEK_SET:
            target = offset
        elif whence == io.SEEK_CUR:
            target = self._pos + offset
        elif whence == io.SEEK_END:
            target = self._size + offset
        else:
            raise ValueError(f"invalid whence {whence}")
        if target < 0:
            raise OSError(f"negative seek position {target}")
        if target == self._pos:
            return target
        if self._body is not None and 0 < target - self._pos <= SEEK_READ_THROUGH:
            skip = bytearray(target - self._pos)
            while self._pos < target:
                if not self.readinto(memoryview(skip)[: target - self._pos]):
                    break
            return self._pos
        self._drop()
        self._pos = target
        return target

    def _drop(self) -> None:
        if self._body is not None:
            with contextlib.suppress(Exception):
                self._body.close()
            self._body = None

    def _reopen(self) -> None:
        self._body = self._bucket._get(self._key, offset=self._pos, if_match=self._etag)["Body"]

    def _read(self, n: int) -> bytes:
        from botocore.exceptions import BotoCoreError
        from urllib3.exceptions import HTTPError

        for attempt in range(READ_RETRIES):
            if self._body is None:
                self._reopen()
            try:
                data: bytes = self._body.read(n)
            except (BotoCoreError, HTTPError, OSError) as exc:
                self._drop()
                if attempt == READ_RETRIES - 1:
                    raise SluicewayError(
                        f"{self.name}: reading failed at byte {self._pos}: {exc}"
                    ) from exc
                log.warning("%s: read failed at byte %d (%s); resuming", self.name, self._pos, exc)
                continue
            if data:
                return data
            # The stream ended before the object did: resume with a ranged GET.
            self._drop()
        raise SluicewayError(f"{self.name}: the connection kept ending at byte {self._pos}")

    def readinto(self, buffer: Any) -> int:
        if self.closed:
            raise ValueError("read from a closed reader")
        view = memoryview(buffer).cast("B")
        want = min(len(view), self._size - self._pos)
        if want <= 0:
            return 0
        data = self._read(want)
        view[: len(data)] = data
        self._pos += len(data)
        return len(data)

    def readall(self) -> bytes:
        chunks = []
        while self._pos < self._size:
            data = self._read(min(MiB, self._size - self._pos))
            self._pos += len(data)
            chunks.append(data)
        return b"".join(chunks)

    def close(self) -> None:
        self._drop()
        super().close()


class S3Bucket(Bucket):
    """Objects in an S3 bucket (under an optional prefix); see the module docstring."""

    def __init__(self, name: str, location: S3Location, *, client: Any = None) -> None:
        self.name = name
        self.location = location
        self._client = client
        self._client_lock = threading.Lock()

    @classmethod
    def from_url(cls, name: str, url: str) -> S3Bucket:
        """The factory ``backends.BUCKETS`` names; makes no network call."""
        try:
            location = S3Location.parse(url)
        except ValueError as e:
            from ..connections import redact

            raise ConfigError([f"bucket {name} ({redact(url.split('?')[0])}): {e}"]) from None
        return cls(name, location)

    def __repr__(self) -> str:
        return f"S3Bucket({self.name!r}, {self.location.describe()!r})"

    # -- the client ------------------------------------------------------------

    @property
    def client(self) -> Any:
        """The boto3 client, made on first use (so loading a pipeline needs no credentials).

        boto3 clients are thread-safe once made; making one is not, hence the lock.
        """
        if self._client is None:
            with self._client_lock:
                if self._client is None:
                    from botocore.config import Config

                    loc = self.location
                    config = Config(
                        s3={"addressing_style": "path" if loc.path_style else "auto"},
                        retries={"mode": "standard", "max_attempts": 5},
                        max_pool_connections=max(10, 2 * loc.max_concurrency),
                    )
                    self._client = watch_client(
                        boto_session().client(
                            "s3",
                            endpoint_url=loc.endpoint_url,
                            region_name=loc.region,
                            config=config,
                        ),
                        "s3",
                        self.location.describe(),
                    )
        return self._client

    @property
    def transfer_config(self) -> Any:
        from boto3.s3.transfer import TransferConfig

        loc = self.location
        return TransferConfig(
            multipart_threshold=loc.multipart_threshold,
            multipart_chunksize=loc.part_size,
            max_concurrency=loc.max_concurrency,
        )

    @contextmanager
    def _errors(self, key: str | None = None) -> Iterator[None]:
        """S3's errors as the bucket contract's, and the rest with what to do next."""
        from botocore.exceptions import ClientError, NoCredentialsError

        where = f"{self.name}/{key}" if key is not None else self.name
        try:
            yield
        except NoCredentialsError:
            raise SluicewayError(
                f"bucket {self.name} ({self.location.describe()}): no AWS credentials found; "
                "set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, or AWS_PROFILE"
            ) from None
        except ClientError as e:
            code = _error_code(e)
            if code == "NoSuchBucket":
                raise SluicewayError(
                    f"bucket {self.name}: the S3 bucket {self.location.bucket!r} does not exist "
                    f"({self.location.describe()}); create it first"
                ) from None
            if code in _NOT_FOUND:
                raise ObjectNotFound(f"{where}: no such object") from None
            raise

    def _s3_key(self, key: str) -> str:
        if not key:
            raise ValueError(f"invalid object key {key!r} for bucket {self.name!r}")
        return self.location.prefix + key

    def _get(self, key: str, *, offset: int = 0, if_match: str | None = None) -> dict[str, Any]:
        """A GET from ``offset``, optionally pinned to one version (If-Match)."""
        args: dict[str, Any] = {"Bucket": self.location.bucket, "Key": self._s3_key(key)}
        if offset:
            args["Range"] = f"bytes={offset}-"
        if if_match is not None:
            args["IfMatch"] = if_match
        from botocore.exceptions import ClientError

        try:
            with self._errors(key):
                return dict(self.client.get_object(**args))
        except ClientError as e:
            if _error_code(e) in _PRECONDITION or _status(e) == 412:
                raise ObjectNotFound(
                    f"{self.name}/{key}: replaced by a new version while it was being read"
                ) from None
            raise

    # -- the interface -----------------------------------------------------------

    def head(self, key: str) -> ObjectInfo:
        with self._errors(key):
            r = self.client.head_object(Bucket=self.location.bucket, Key=self._s3_key(key))
        return ObjectInfo(
            key=key,
            size=int(r["ContentLength"]),
            etag=_etag(r["ETag"]),
            mtime=float(int(r["LastModified"].timestamp())),
        )

    def open_read(self, key: str) -> BinaryIO:
        # The first GET is made here, so a missing object fails now, not mid-parse.
        raw = _S3Reader(self, key, self._get(key))
        return io.BufferedReader(raw, buffer_size=READ_BUFFER)  # type: ignore[return-value]

    @contextmanager
    def open_write(self, key: str, *, if_absent: bool = False) -> Iterator[BinaryIO]:
        check_key(key, self.name)
        # Nothing reaches S3 before the block ends: an exception inside it (or
        # a crash) leaves no object and no parts behind.
        with tempfile.SpooledTemporaryFile(
            max_size=SPOOL_IN_MEMORY, prefix="sluiceway-s3-"
        ) as spool:
            writer = _SpoolWriter(spool)  # type: ignore[arg-type]
            yield writer  # type: ignore[misc]
            spool.seek(0)
            faults.point("before_publish")
            self._upload(spool, key, writer.size, if_absent=if_absent)  # type: ignore[arg-type]

    def _upload(self, f: IO[bytes], key: str, size: int, *, if_absent: bool) -> None:
        s3_key = self._s3_key(key)
        bucket = self.location.bucket
        if size >= self.location.multipart_threshold:
            if if_absent:
                self._multipart_if_absent(f, key, size)
            else:
                with self._errors(key):
                    # s3transfer uploads the parts in parallel and aborts on failure.
                    self.client.upload_fileobj(f, bucket, s3_key, Config=self.transfer_config)
            return
        args: dict[str, Any] = {"Bucket": bucket, "Key": s3_key, "Body": f, "ContentLength": size}
        if if_absent:
            args["IfNoneMatch"] = "*"
        self._conditional(key, lambda: self.client.put_object(**args), rewind=f)

    def _conditional(self, key: str, call: Any, *, rewind: IO[bytes] | None = None) -> Any:
        """Run a write that may carry If-None-Match; a lost race is ObjectExists.

        S3 answers 409 ConditionalRequestConflict while another conditional
        write of the same key is in flight; AWS says to retry, and the retry
        then sees the winner's object (412) or wins itself.
        """
        from botocore.exceptions import ClientError

        for attempt in range(6):
            try:
                with self._errors(key):
                    return call()
            except ClientError as e:
                code, status = _error_code(e), _status(e)
                if code in _PRECONDITION or status == 412:
                    raise ObjectExists(f"{self.name}/{key} already exists") from None
                if (code == "ConditionalRequestConflict" or status == 409) and attempt < 5:
                    time.sleep(0.05 * 2**attempt)
                    if rewind is not None:
                        rewind.seek(0)
                    continue
                raise
        raise AssertionError("unreachable")

    def _multipart_if_absent(self, f: IO[bytes], key: str, size: int) -> None:
        """A multipart upload completed with If-None-Match: * (s3transfer cannot pass it)."""
        bucket, s3_key = self.location.bucket, self._s3_key(key)
        with self._errors(key):
            upload_id = self.client.create_multipart_upload(Bucket=bucket, Key=s3_key)["UploadId"]
        try:
            parts = []
            number = 1
            while chunk := f.read(self.location.part_size):
                with self._errors(key):
                    r = self.client.upload_part(
                        Bucket=bucket, Key=s3_key, UploadId=upload_id, PartNumber=number, Body=chunk
                    )
                parts.append({"ETag": r["ETag"], "PartNumber": number})
                number += 1
            self._conditional(
                key,
                lambda: self.client.complete_multipart_upload(
                    Bucket=bucket,
                    Key=s3_key,
                    UploadId=upload_id,
                    MultipartUpload={"Parts": parts},
                    IfNoneMatch="*",
                ),
            )
        except BaseException:
            with contextlib.suppress(Exception):
                self.client.abort_multipart_upload(Bucket=bucket, Key=s3_key, UploadId=upload_id)
            raise

    def put_file(self, key: str, path: str) -> ObjectInfo:
        """Upload a finished local file (multipart above the threshold); the file stays."""
        check_key(key, self.name)
        with self._errors(key):
            self.client.upload_file(
                path, self.location.bucket, self._s3_key(key), Config=self.transfer_config
            )
        return self.head(key)

    def list(self, prefix: str = "", *, start_after: str | None = None) -> Iterator[ObjectInfo]:
        """Objects under ``prefix`` in key order, a page (1000 keys) at a time.

        ``start_after`` (a key of this bucket) skips every key up to and
        including it on the server: the poller's cheap mode for append-only
        key layouts.
        """
        args: dict[str, Any] = {
            "Bucket": self.location.bucket,
            "Prefix": self.location.prefix + prefix,
        }
        if start_after is not None:
            args["StartAfter"] = self.location.prefix + start_after
        cut = len(self.location.prefix)
        with self._errors():
            pages = self.client.get_paginator("list_objects_v2").paginate(**args)
            for page in pages:
                for obj in page.get("Contents", ()):
                    s3_key: str = obj["Key"]
                    if s3_key.endswith("/"):
                        continue  # a "folder" marker, not an object
                    yield ObjectInfo(
                        key=s3_key[cut:],
                        size=int(obj["Size"]),
                        etag=_etag(obj["ETag"]),
                        mtime=float(int(obj["LastModified"].timestamp())),
                    )

    def delete(self, key: str) -> None:
        with self._errors(key):
            self.client.delete_object(Bucket=self.location.bucket, Key=self._s3_key(key))

    def local_path(self, key: str) -> str | None:
        """Never: objects live behind the S3 API (callers fall back to ``open_read``)."""
        return None
