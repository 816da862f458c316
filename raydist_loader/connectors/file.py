"""Layer 1 (connectors): Local or shared-filesystem store: ``file:///abs/dir`` or a bare path."""

from __future__ import annotations

import fcntl
import os
import tempfile
import threading
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from urllib.parse import unquote, urlsplit

from ..errors import BackendError, ConfigError, NotFoundError
from .base import Buffer, Connector, check_key, refuse_options, short_read

_IOV_MAX = 1024  # Linux limit on buffers per preadv
_UMASK = os.umask(0o022)
os.umask(_UMASK)


def url_to_path(url: str) -> Path:
    """``file:///a/b`` or ``/a/b`` or ``rel/dir`` -> an absolute Path."""
    if url.startswith("file://"):
        parts = urlsplit(url)
        if parts.netloc not in ("", "localhost"):
            raise ConfigError(
                f"file URL {url!r} has no absolute path (it reads {parts.netloc!r} as a host name): use "
                f"file:///absolute/path (three slashes), or give the directory as a plain path "
                f"({parts.netloc}{parts.path})"
            )
        return Path(unquote(parts.path))
    return Path(url).expanduser().resolve()


class FileConnector(Connector):
    """Objects are files under a root directory; writes go to a temp file that is renamed into place."""

    schemes = ("file",)
    packs_files = True
    coalesce_gap = 256 << 10
    default_concurrency = 4
    max_request_bytes = 32 << 20

    def __init__(self, url: str, **options: object):
        super().__init__(url)
        refuse_options("file://", options)
        self.root = url_to_path(url)
        self._fds: dict[str, int] = {}
        self._lock = threading.Lock()

    def _path(self, key: str) -> Path:
        return self.root / check_key(key)

    def _fd(self, key: str) -> int:
        fd = self._fds.get(key)
        if fd is None:
            with self._lock:
                fd = self._fds.get(key)
                if fd is None:
                    try:
                        fd = os.open(self._path(key), os.O_RDONLY)
                    except FileNotFoundError:
                        raise NotFoundError(f"{key!r} does not exist in {self.describe()}") from None
                    self._fds[key] = fd
        return fd

    def readinto(self, key: str, offset: int, buf: memoryview) -> None:
        self.readv(key, offset, [buf])

    def read(self, key: str) -> bytes:
        """The file as one open sees it: a publish replaces it by rename, so this is one version, whole (never
        through a cached descriptor, which would keep serving the replaced file)."""
        try:
            return self._path(key).read_bytes()
        except (FileNotFoundError, NotADirectoryError):
            raise NotFoundError(f"{key!r} does not exist in {self.describe()}") from None
        except OSError as e:
            raise BackendError(f"cannot read {key!r} in {self.describe()}: {e}") from None

    def readv(self, key: str, offset: int, bufs: Sequence[memoryview]) -> None:
        """One ``preadv`` system call fills all the buffers (repeated only after a short read)."""
        fd = self._fd(key)
        want = sum(len(b) for b in bufs)
        done, pending = 0, list(bufs)
        while pending:
            n = os.preadv(fd, pending[:_IOV_MAX], offset + done)
            if n == 0:
                raise short_read(key, offset, want, done, self.describe())
            done += n
            while pending and n >= len(pending[0]):
                n -= len(pending.pop(0))
            if n:
                pending[0] = pending[0][n:]

    def write(self, key: str, data: Buffer | Iterable[Buffer]) -> None:
        path = self._path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        blocks = [data] if isinstance(data, (bytes, bytearray, memoryview)) else data
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        try:
            os.fchmod(fd, 0o666 & ~_UMASK)  # mkstemp makes 0600: workers running as another user must read it
            with os.fdopen(fd, "wb") as f:
                for block in blocks:
                    f.write(block)
                f.flush()
                os.fsync(f.fileno())  # durable before the rename makes it visible (the manifest goes last)
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        self._forget(key)

    def compare_and_swap(self, key: str, expected: bytes | None, data: Buffer) -> bool:
        """Read, compare and rename into place under an exclusive ``flock`` of the key's directory (or, where the
        file system cannot lock a directory, as NFS, of a hidden ``.<name>.lock.tmp`` file beside the key, which
        listings skip): writers through this method take turns."""
        path = self._path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX)  # released when fd closes
            except OSError:
                os.close(fd)
                fd = -1
                fd = os.open(path.parent / f".{path.name}.lock.tmp", os.O_RDWR | os.O_CREAT, 0o666 & ~_UMASK)
                fcntl.lockf(fd, fcntl.LOCK_EX)
            if self._current(key) != expected:
                return False
            self.write(key, data)
            return True
        finally:
            if fd >= 0:
                os.close(fd)

    def list(self, prefix: str = "") -> Iterator[str]:
        base = self.root / prefix.rsplit("/", 1)[0] if "/" in prefix else self.root
        if not base.is_dir():
            return
        keys = []
        for dirpath, dirnames, filenames in os.walk(base):
            dirnames[:] = [d for d in dirnames if not d.startswith(".")]
            rel = Path(dirpath).relative_to(self.root).as_posix()
            for name in filenames:
                if name.startswith(".") and name.endswith(".tmp"):
                    continue
                key = name if rel == "." else f"{rel}/{name}"
                if key.startswith(prefix):
                    keys.append(key)
        yield from sorted(keys)

    def stat(self, key: str) -> int | None:
        try:
            return self._path(key).stat().st_size
        except FileNotFoundError:
            return None
        except NotADirectoryError:
            return None
        except OSError as e:
            raise BackendError(f"cannot stat {key!r} in {self.describe()}: {e}") from None

    def modified(self, keys: Sequence[str]) -> list[float | None]:
        out: list[float | None] = []
        for key in keys:
            try:
                out.append(self._path(key).stat().st_mtime)
            except (FileNotFoundError, NotADirectoryError):
                out.append(None)
        return out

    def delete(self, key: str) -> None:
        """Remove the file, and the directories under the root that this leaves empty (a removed version leaves
        no empty directory behind)."""
        self._forget(key)
        path = self._path(key)
        path.unlink(missing_ok=True)
        for parent in path.parents:
            if parent == self.root or self.root not in parent.parents:
                break
            try:
                parent.rmdir()
            except OSError:  # not empty (or already gone): stop climbing
                break

    def _forget(self, key: str) -> None:
        with self._lock:
            fd = self._fds.pop(key, None)
        if fd is not None:
            os.close(fd)

    def close(self) -> None:
        with self._lock:
            fds, self._fds = list(self._fds.values()), {}
        for fd in fds:
            os.close(fd)
