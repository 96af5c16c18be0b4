"""A bucket that is a local directory: the embedded default.

Writes go to a hidden directory inside the bucket and are published with a
single ``rename`` (or ``link`` for conditional puts), so a reader or a
directory watcher never sees half a file. ETags are the xxh3-128 hash of the
content, so the identity of an input is the same whichever way it arrived;
they are computed while writing, or once per (size, mtime, inode) for files
dropped in by other programs.

Not the MD5 S3 gives single-part uploads: a dropped file's event can only be
raised once its ETag is known, and MD5 runs at about 0.6 GB/s on one core,
which put 1.4-1.8 s before the event of a 1 GB file, longer than reading it
(xxh3 takes 0.07 s, about the time to read it from the page cache). An ETag
is only ever compared with ETags of the same bucket, and S3 itself promises
no more than an opaque version identity (multipart and KMS-encrypted objects
have no MD5 ETag either).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import stat
import tempfile
import threading
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO, Protocol

import xxhash

from .. import faults
from .base import Bucket, ObjectExists, ObjectInfo, ObjectNotFound

TMP_DIR = ".sluiceway-tmp"
# Names other programs use while a file is still being written; never inputs.
PARTIAL_SUFFIXES = (".part", ".tmp", ".crdownload", ".partial", "~")


def is_ignored_name(name: str) -> bool:
    """Hidden files and in-progress downloads are not objects."""
    return name.startswith(".") or name.endswith(PARTIAL_SUFFIXES)


def _pid_alive(pid: int) -> bool:
    """Whether ``pid`` still runs; a zombie (exited, not yet reaped) does not."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True  # no /proc (not Linux): trust the signal check
    return stat.rsplit(")", 1)[-1].split()[0] != "Z"


def file_etag(path: str | os.PathLike[str]) -> str:
    """The ETag of a file: the xxh3-128 of its content, as hex."""
    with open(path, "rb", buffering=0) as f:
        return hashlib.file_digest(f, xxhash.xxh3_128).hexdigest()


class EtagCache(Protocol):
    """Somewhere to keep ETags across restarts (the state database)."""

    def cached_etag(self, path: str, size: int, mtime_ns: int, ino: int) -> str | None: ...

    def store_etag(self, path: str, size: int, mtime_ns: int, ino: int, etag: str) -> None: ...


class _HashingWriter:
    """Passes writes through to a file while computing the ETag on the way.

    Inline: xxh3 hashes at memory speed, far faster than the write it rides on.
    """

    def __init__(self, f: BinaryIO) -> None:
        self._f = f
        self._digest = xxhash.xxh3_128()

    def write(self, data: bytes | bytearray | memoryview) -> int:
        self._digest.update(data)
        return self._f.write(data)

    def flush(self) -> None:
        self._f.flush()

    def writable(self) -> bool:
        return True

    def readable(self) -> bool:
        return False

    def seekable(self) -> bool:
        return False

    def tell(self) -> int:
        return self._f.tell()

    @property
    def closed(self) -> bool:
        return self._f.closed

    def close(self) -> None:
        # The bucket closes the real file when it publishes; writers such as
        # PyArrow's call close() themselves, which must not end the upload.
        pass

    def hexdigest(self) -> str:
        return self._digest.hexdigest()


class LocalBucket(Bucket):
    """Objects as files under ``root``; ``/`` in keys becomes directories."""

    def __init__(
        self,
        name: str,
        root: str | os.PathLike[str],
        *,
        etag_cache: EtagCache | None = None,
        fsync: bool = True,
    ) -> None:
        self.name = name
        # False (``durability: process``): a published object is in the page
        # cache, which outlives any process but not the OS.
        self.fsync = fsync
        self.etag_cache = etag_cache
        self.root = Path(root).resolve()
        self.root.mkdir(parents=True, exist_ok=True)
        self._root_text = str(self.root)
        self._tmp = self.root / TMP_DIR
        self._tmp_text = str(self._tmp)
        self._etags: dict[tuple[str, int, int, int], str] = {}
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return f"LocalBucket({self.name!r}, {str(self.root)!r})"

    # -- keys and paths ------------------------------------------------------

    def path_of(self, key: str) -> str:
        """The file of ``key``; a string, since every object read or written
        goes through here, and pathlib's parsing cost more than the checks."""
        parts = key.split("/")
        if (
            not key
            or key.startswith("/")
            or any(p in ("", ".", "..") for p in parts)
            or parts[0] == TMP_DIR
        ):
            raise ValueError(f"invalid object key {key!r} for bucket {self.name!r}")
        return os.path.join(self._root_text, *parts)

    def key_of(self, path: str | os.PathLike[str]) -> str | None:
        """The key of a file inside the bucket, or None if it is not an object."""
        text = os.path.abspath(path)
        prefix = self._root_text + os.sep
        if text.startswith(prefix) and ".." not in os.fspath(path).split(os.sep):
            # The common case (the watcher, once per change): decided on the
            # string, plus an lstat per part below the root, instead of
            # resolving every part of the whole path.
            parts = text[len(prefix) :].split(os.sep)
            if any(is_ignored_name(p) for p in parts):
                return None
            here = self._root_text
            for part in parts:
                here = os.path.join(here, part)
                if os.path.islink(here):
                    break  # may point anywhere: resolve it below
            else:
                return "/".join(parts)
        try:
            rel = Path(path).resolve().relative_to(self.root)
        except ValueError:
            return None
        parts = list(rel.parts)
        if not parts or any(is_ignored_name(p) for p in parts):  # TMP_DIR is hidden too
            return None
        return "/".join(parts)

    def local_path(self, key: str) -> str | None:
        return self.path_of(key)

    # -- the interface -------------------------------------------------------

    def _info(self, key: str, path: str | Path, st: os.stat_result) -> ObjectInfo:
        cache_key = (str(path), st.st_size, st.st_mtime_ns, st.st_ino)
        with self._lock:
            etag = self._etags.get(cache_key)
        if etag is None and self.etag_cache is not None:
            etag = self.etag_cache.cached_etag(*cache_key)
        if etag is None:
            etag = file_etag(path)
            self._remember(cache_key, etag)
        return ObjectInfo(key=key, size=st.st_size, etag=etag, mtime=st.st_mtime)

    def _remember(self, cache_key: tuple[str, int, int, int], etag: str) -> None:
        with self._lock:
            self._etags[cache_key] = etag
        if self.etag_cache is not None:
            self.etag_cache.store_etag(*cache_key, etag)

    def head(self, key: str) -> ObjectInfo:
        path = self.path_of(key)
        try:
            st = os.stat(path)
        except FileNotFoundError:
            raise ObjectNotFound(f"{self.name}/{key}: no such object") from None
        if not stat.S_ISREG(st.st_mode):
            raise ObjectNotFound(f"{self.name}/{key}: not an object")
        return self._info(key, path, st)

    def open_read(self, key: str) -> BinaryIO:
        try:
            return open(self.path_of(key), "rb")
        except (FileNotFoundError, IsADirectoryError):
            raise ObjectNotFound(f"{self.name}/{key}: no such object") from None

    @contextmanager
    def open_write(self, key: str, *, if_absent: bool = False) -> Iterator[BinaryIO]:
        target = self.path_of(key)
        tmp = f"{self._tmp_text}{os.sep}{os.getpid()}-{uuid.uuid4().hex}.tmp"
        published = False
        try:
            f = open(tmp, "wb")  # noqa: SIM115 - closed below, on every path
        except FileNotFoundError:  # the first write (or the directory was removed)
            self._tmp.mkdir(exist_ok=True)
            f = open(tmp, "wb")  # noqa: SIM115
        writer = _HashingWriter(f)
        try:
            yield writer  # type: ignore[misc]
            f.flush()
            if self.fsync:
                os.fsync(f.fileno())
            # Rename and link keep the inode and mtime: the cache key is known now.
            st = os.fstat(f.fileno())
            f.close()
            faults.point("before_publish")
            try:
                self._publish(tmp, target, key, if_absent)
            except FileNotFoundError:  # a new directory: create it, then publish
                os.makedirs(os.path.dirname(target), exist_ok=True)
                self._publish(tmp, target, key, if_absent)
            # A rename leaves no aside-file to remove; a link (if_absent) does.
            published = not if_absent
            self._remember((target, st.st_size, st.st_mtime_ns, st.st_ino), writer.hexdigest())
        finally:
            if not f.closed:
                # Closing flushes; on a full disk that fails again, and the
                # aside-file must still go.
                with contextlib.suppress(OSError):
                    f.close()
            if not published:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(tmp)

    def _publish(self, tmp: str, target: str, key: str, if_absent: bool) -> None:
        if if_absent:
            try:
                os.link(tmp, target)
            except FileExistsError:
                raise ObjectExists(f"{self.name}/{key} already exists") from None
        else:
            os.replace(tmp, target)

    def scratch_dir(self) -> tempfile.TemporaryDirectory[str]:
        # Inside the bucket, so put_file is a rename on the same filesystem.
        self._tmp.mkdir(exist_ok=True)
        return tempfile.TemporaryDirectory(prefix=f"{os.getpid()}-scratch-", dir=self._tmp)

    def sweep(self) -> int:
        """Remove what writers that died (SIGKILL, power loss) left aside.

        Every temporary name starts with its writer's pid; entries of pids
        that no longer run are garbage. Readers never saw them, since they
        were never published, so removing them changes nothing visible.
        """
        removed = 0
        try:
            entries = list(self._tmp.iterdir())
        except FileNotFoundError:
            return 0
        for entry in entries:
            pid_text = entry.name.split("-", 1)[0]
            if pid_text.isdigit() and _pid_alive(int(pid_text)):
                continue
            if entry.is_dir():
                shutil.rmtree(entry, ignore_errors=True)
            else:
                entry.unlink(missing_ok=True)
            removed += 1
        return removed

    def put_file(self, key: str, path: str) -> ObjectInfo:
        target = self.path_of(key)
        os.makedirs(os.path.dirname(target), exist_ok=True)
        if self.fsync:
            with open(path, "rb") as f:
                os.fsync(f.fileno())
        try:
            os.replace(path, target)
        except OSError:  # another filesystem: copy through open_write
            return super().put_file(key, path)
        return self.head(key)

    def list(self, prefix: str = "") -> Iterator[ObjectInfo]:
        keys: list[tuple[str, Path]] = []
        for dirpath, dirnames, filenames in os.walk(self.root):
            dirnames[:] = [d for d in dirnames if not is_ignored_name(d)]
            for fn in filenames:
                if is_ignored_name(fn):
                    continue
                path = Path(dirpath, fn)
                key = "/".join(path.relative_to(self.root).parts)
                if key.startswith(prefix):
                    keys.append((key, path))
        for key, path in sorted(keys):
            try:
                st = path.stat()
            except FileNotFoundError:
                continue
            yield self._info(key, path, st)

    def delete(self, key: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path_of(key))
