"""The bucket interface: objects under keys, as S3 has them.

Kept small on purpose: every backend (a local directory, S3, an
S3-compatible store) implements these few calls and passes the same contract
tests, and everything else in Sluiceway is written against this file only.
"""

from __future__ import annotations

import abc
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import BinaryIO

from ..errors import SluicewayError


class ObjectNotFound(SluicewayError):
    """The key does not exist (any more): the event is stale, not retryable."""


class ObjectExists(SluicewayError):
    """A conditional put found the key already there."""


@dataclass(frozen=True)
class ObjectInfo:
    """What a listing or head returns: enough to identify one object version."""

    key: str
    size: int
    etag: str
    mtime: float


class Bucket(abc.ABC):
    """A flat namespace of keys with atomic, all-or-nothing writes."""

    name: str

    @abc.abstractmethod
    def head(self, key: str) -> ObjectInfo:
        """Metadata of ``key``; raises ObjectNotFound."""

    @abc.abstractmethod
    def open_read(self, key: str) -> BinaryIO:
        """A streaming reader; never loads the whole object in memory."""

    @abc.abstractmethod
    def open_write(self, key: str, *, if_absent: bool = False) -> AbstractContextManager[BinaryIO]:
        """A writer whose object appears only when the block exits cleanly.

        Readers never see a half-written object: the data goes aside and is
        published in one step at the end. An exception inside the block
        discards it. With ``if_absent`` the publish fails with ObjectExists
        if the key is already there (S3's ``If-None-Match: *``).
        """

    @abc.abstractmethod
    def list(self, prefix: str = "") -> Iterator[ObjectInfo]:
        """Every object whose key starts with ``prefix``, in key order."""

    @abc.abstractmethod
    def delete(self, key: str) -> None:
        """Remove ``key``; deleting a missing key is not an error."""

    def put_bytes(self, key: str, data: bytes, *, if_absent: bool = False) -> ObjectInfo:
        with self.open_write(key, if_absent=if_absent) as f:
            f.write(data)
        return self.head(key)

    def read_bytes(self, key: str) -> bytes:
        with self.open_read(key) as f:
            return f.read()

    def put_file(self, key: str, path: str) -> ObjectInfo:
        """Publish a finished local file as ``key`` (the file may be moved away)."""
        with open(path, "rb") as src, self.open_write(key) as dst:
            shutil.copyfileobj(src, dst, 1 << 20)
        return self.head(key)

    def scratch_dir(self) -> AbstractContextManager[str]:
        """A private directory for files about to be published with ``put_file``."""
        return tempfile.TemporaryDirectory(prefix="sluiceway-")

    def local_path(self, key: str) -> str | None:
        """A filesystem path for ``key`` when the bucket has one (fast paths)."""
        return None
