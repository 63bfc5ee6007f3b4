"""The committed copy kept on disk (``dml-peer --committed-copy disk``): a peer's committed
parameters are read when a round starts over (a rollback), when it checks its own update and
when it serves a joiner, and written once per committed round. Between those they are cold, so
holding them as anonymous memory pins a model's worth of RAM that only a failure ever reads.
:class:`DiskCopy` keeps them in an unlinked file instead, written and read with positional I/O
(``pwrite``/``preadv``) and never mapped: the bytes live in the page cache, which the kernel
writes back and reclaims under memory pressure (a container's memory limit included) rather than
killing the peer, and they do not count in the peer's RSS. A read of a piece allocates only that
piece, so the guard's norm over the whole copy (``base[s:e]`` per piece) costs one piece of
memory. Anything else that needs the whole array gets it with ``np.asarray`` (one full read,
a transient model-sized array: the lossy codecs' base, an outer optimizer, a joiner's download).

The directory must be on a disk: on tmpfs the page cache is the memory, so :func:`check_dir`
refuses one. Rules and figures: docs/performance.md, "Memory"."""
from __future__ import annotations

import errno
import os
import pathlib
import tempfile
import threading
from typing import Any

import numpy as np

PIECE_BYTES = 8 << 20  # the most bytes one pwrite/preadv moves (a bounded kernel copy per call)
MEMORY_FS = ("tmpfs", "ramfs", "devtmpfs")


def fs_type(path: pathlib.Path) -> str:
    """The file system type of the mount holding ``path`` (/proc/self/mounts, longest mount
    point that is a prefix), or "" when it cannot be told."""
    try:
        mounts = pathlib.Path("/proc/self/mounts").read_text().splitlines()
    except OSError:
        return ""
    p = str(path.resolve())
    best, kind = -1, ""
    for line in mounts:
        parts = line.split()
        if len(parts) < 3:
            continue
        mnt = parts[1].replace("\\040", " ")
        if (p == mnt or p.startswith(mnt.rstrip("/") + "/")) and len(mnt) > best:
            best, kind = len(mnt), parts[2]
    return kind


def check_dir(path: pathlib.Path) -> str:
    """Why ``path`` cannot hold committed copies ("" when it can): it must be a writable
    directory on a disk, not on a memory file system."""
    if not path.is_dir():
        return f"{path} is not a directory"
    if not os.access(path, os.W_OK | os.X_OK):
        return f"{path} is not writable"
    kind = fs_type(path)
    if kind in MEMORY_FS:
        return (f"{path} is on {kind}, which keeps files in memory: a committed copy there saves nothing; "
                f"pass --committed-copy-dir on a disk")
    return ""


def usable_dir(preferred: pathlib.Path) -> pathlib.Path:
    """``preferred`` if it can hold committed copies (:func:`check_dir`), else :func:`default_dir`:
    for tools that would put the copies beside their own files (a benchmark's log dir, which
    ``mkdtemp`` may well have put on tmpfs)."""
    return preferred if not check_dir(preferred) else default_dir()


def default_dir() -> pathlib.Path:
    """/var/tmp (on a disk by convention, where /tmp is often tmpfs), else the temp dir."""
    var = pathlib.Path("/var/tmp")
    return var if var.is_dir() and os.access(var, os.W_OK | os.X_OK) else pathlib.Path(tempfile.gettempdir())


def _open_unlinked(directory: pathlib.Path) -> int:
    """A new read-write file in ``directory`` that has no name (it goes with its last fd)."""
    flag = getattr(os, "O_TMPFILE", 0)
    if flag:
        try:
            return os.open(directory, flag | os.O_RDWR, 0o600)
        except OSError:
            pass  # a file system without O_TMPFILE: a named file, unlinked at once
    fd, name = tempfile.mkstemp(prefix=".dml-committed-", dir=directory)
    os.unlink(name)
    return fd


class DiskCopy:
    """A 1-D float32 array kept in an unlinked file in ``directory``. It has the array's
    ``shape``, ``size``, ``dtype`` and ``nbytes``; ``a[s:e]`` reads that range into a new array,
    ``np.asarray(a)`` reads all of it. Thread-safe (positional I/O, no shared offset)."""

    ndim = 1

    def __init__(self, directory: pathlib.Path, size: int) -> None:
        if size < 0:
            raise ValueError(f"size must be >= 0, got {size}")
        self.dtype = np.dtype(np.float32)
        self.size = int(size)
        self.shape = (self.size,)
        self.nbytes = self.size * self.dtype.itemsize
        self._fd = _open_unlinked(directory)
        self._lock = threading.Lock()  # close against I/O in flight
        try:  # the blocks reserved now, so no later write meets a full disk halfway
            try:
                os.posix_fallocate(self._fd, 0, self.nbytes) if self.nbytes else None
            except OSError as e:
                if e.errno not in (errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
                    raise
                os.ftruncate(self._fd, self.nbytes)
        except BaseException:
            os.close(self._fd)
            raise

    @classmethod
    def of(cls, directory: pathlib.Path, src: np.ndarray) -> "DiskCopy":
        """A new copy holding ``src``'s values."""
        out = cls(directory, src.size)
        try:
            out.write(src)
        except BaseException:
            out.close()
            raise
        return out

    def _fdno(self) -> int:
        if self._fd < 0:
            raise ValueError("the committed copy's file is closed")
        return self._fd

    def write(self, src: np.ndarray) -> None:
        """Overwrites the whole copy with ``src`` (same size, float32)."""
        src = np.ascontiguousarray(src, dtype=np.float32).reshape(-1)
        if src.size != self.size:
            raise ValueError(f"a copy of {self.size} elements cannot hold {src.size}")
        view = memoryview(src).cast("B")
        with self._lock:
            fd = self._fdno()
            off = 0
            while off < self.nbytes:
                n = os.pwrite(fd, view[off : off + PIECE_BYTES], off)
                if n <= 0:
                    raise OSError(f"pwrite wrote {n} bytes at {off} of the committed copy")
                off += n

    def read_into(self, out: np.ndarray, start: int = 0) -> np.ndarray:
        """Fills ``out`` (contiguous float32) with elements ``start .. start + out.size``."""
        if out.dtype != np.float32 or not out.flags.c_contiguous:
            raise ValueError("read_into needs a contiguous float32 array")
        if not 0 <= start <= start + out.size <= self.size:
            raise ValueError(f"elements {start}..{start + out.size} are outside a copy of {self.size}")
        view = memoryview(out.reshape(-1)).cast("B")
        base = start * self.dtype.itemsize
        with self._lock:
            fd = self._fdno()
            got = 0
            while got < view.nbytes:
                n = os.preadv(fd, [view[got : got + PIECE_BYTES]], base + got)
                if n <= 0:
                    raise OSError(f"the committed copy ended at byte {base + got} of {self.nbytes}")
                got += n
        return out

    def __getitem__(self, key: Any) -> np.ndarray:
        if not isinstance(key, slice):
            raise TypeError("a committed copy on disk is read by slices (a[s:e]) or np.asarray(a)")
        start, stop, step = key.indices(self.size)
        if step != 1:
            raise TypeError("a committed copy on disk is read by contiguous slices")
        return self.read_into(np.empty(max(0, stop - start), dtype=np.float32), start)

    def __len__(self) -> int:
        return self.size

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        out = self.read_into(np.empty(self.size, dtype=np.float32))
        return out if dtype is None else out.astype(dtype, copy=False)

    def close(self) -> None:
        with self._lock:
            fd, self._fd = self._fd, -1
        if fd >= 0:
            os.close(fd)

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # interpreter shutdown
            pass

    def __repr__(self) -> str:
        return f"DiskCopy({self.size} float32{', closed' if self._fd < 0 else ''})"
