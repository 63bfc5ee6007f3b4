"""One coordinator per state dir: an exclusive ``flock`` on ``STATE_DIR/coordinator.lock``.

The lock is held for the process's life and the kernel drops it when the process dies, so a
``kill -9`` never leaves a stale lock: the next coordinator takes it at once. The file's content
names the holder (pid, host, address once bound, start time) for the message a second coordinator
prints; the lock, not the content, is the truth (after a crash the content names the last holder).
"""
from __future__ import annotations

import datetime
import fcntl
import json
import logging
import os
import pathlib
import socket
from dataclasses import asdict, dataclass

log = logging.getLogger(__name__)

LOCK_NAME = "coordinator.lock"


@dataclass(frozen=True)
class Holder:
    """Who holds a state dir, as its lock file records it (fields empty or 0 when unknown)."""

    pid: int = 0
    host: str = ""
    address: str = ""
    started: str = ""

    def describe(self) -> str:
        """``pid 1234 on host h, serving 127.0.0.1:50051, since <time>``, as far as known."""
        if not self.pid:
            return "holder not recorded yet"
        parts = [f"pid {self.pid}" + (f" on {self.host}" if self.host else "")]
        parts.append(f"address {self.address}" if self.address else "not yet bound")
        if self.started:
            parts.append(f"since {self.started}")
        return ", ".join(parts)


class StateDirLocked(Exception):
    """Another process holds the state dir's lock."""

    def __init__(self, state_dir: pathlib.Path, holder: Holder) -> None:
        self.state_dir = state_dir
        self.holder = holder
        super().__init__(f"state dir {state_dir} is held by another dml coordinator ({holder.describe()})")


def read_holder(path: pathlib.Path) -> Holder:
    """The holder a lock file records; an empty :class:`Holder` when it is missing or unreadable."""
    try:
        body = json.loads(path.read_text() or "{}")
        return Holder(pid=int(body.get("pid", 0)), host=str(body.get("host", "")),
                      address=str(body.get("address", "")), started=str(body.get("started", "")))
    except (OSError, ValueError, TypeError, AttributeError):
        return Holder()


class StateDirLock:
    """The exclusive lock on one state dir. :meth:`acquire`, then :meth:`record` the address once
    bound; :meth:`release` (or process death) frees it."""

    def __init__(self, state_dir: pathlib.Path) -> None:
        self.state_dir = state_dir
        self.path = state_dir / LOCK_NAME
        self._fd: int | None = None
        self._holder = Holder()

    def acquire(self) -> StateDirLock:
        """Takes the lock without waiting, creating the state dir if needed, and records this
        process as the holder; raises :class:`StateDirLocked` naming the holder if it is taken."""
        self.state_dir.mkdir(parents=True, exist_ok=True)
        # Not inherited across exec (Python's default), so a child process cannot keep it alive.
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise StateDirLocked(self.state_dir, read_holder(self.path)) from None
        except BaseException:
            os.close(fd)
            raise
        self._fd = fd
        started = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
        self._holder = Holder(pid=os.getpid(), host=socket.gethostname(), started=started)
        self._write()
        log.info("locked state dir %s", self.state_dir)
        return self

    def record(self, address: str) -> None:
        """Records the address this holder serves on (call once bound)."""
        if self._fd is None:
            raise RuntimeError(f"{self.path} is not held")
        self._holder = Holder(pid=self._holder.pid, host=self._holder.host, address=address, started=self._holder.started)
        self._write()

    def _write(self) -> None:
        assert self._fd is not None
        data = json.dumps(asdict(self._holder)).encode() + b"\n"
        os.ftruncate(self._fd, 0)
        os.pwrite(self._fd, data, 0)

    @property
    def held(self) -> bool:
        """Whether this object holds the lock."""
        return self._fd is not None

    def release(self) -> None:
        """Frees the lock (idempotent). The file stays: unlinking a lock file races with the next
        locker, which could lock a file no longer in the directory."""
        if self._fd is None:
            return
        fd, self._fd = self._fd, None
        try:
            fcntl.flock(fd, fcntl.LOCK_UN)
        finally:
            os.close(fd)
        log.debug("released state dir %s", self.state_dir)
