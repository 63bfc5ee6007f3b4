"""Shared-memory slots: the data plane between ring neighbours on one host.

Over loopback TCP every byte is copied twice by the kernel (into a socket buffer and out of it)
with a system call and protocol work per packet: measured here, 4.4 GB/s between two processes,
where one ``memcpy`` runs at 11 GB/s. When both neighbours can map the same file in
``/dev/shm``, the frames' payloads travel through it instead: the sender copies a payload into a
slot, and the receiver copies it out (or reads it in place). The TCP stream stays, carrying the
20-byte frame headers one way and one credit byte per consumed slot the other way, so the
failure semantics do not change at all: a dead neighbour is a broken stream, progress is bounded
by the idle timeout, and the end is the receiver's one-byte acknowledgement.

Set-up (see :mod:`peer.dataplane`): the receiver creates the file (mode 0600, random name) when
it issues the stream's token, writes a random nonce at its start and names it in its
``OpenDataPlane`` answer; the sender maps it and checks the nonce, which proves both sides see
the same memory (a peer on another host, or in a container with its own ``/dev/shm``, finds no
such file, or another one, and streams over TCP instead). The receiver unlinks the file as soon
as the sender's hello says it mapped it, or when the token expires unused, so nothing is left
behind in ``/dev/shm`` once both have it mapped, even if they are killed.

A file's name carries its creator's pid (``dml-PID-RANDOM``): a receiver killed while an offer
was open leaves its file behind, and the next peer to start on the host removes the files whose
owner is gone (:func:`remove_orphans`).
"""
from __future__ import annotations

import logging
import mmap
import os
import pathlib
import re
import secrets
from collections.abc import Callable

SHM_DIR = pathlib.Path("/dev/shm")
HEADER_BYTES = 64  # the nonce, padded to a cache line
NONCE_BYTES = 16
SLOTS = 4  # frames in flight per stream (a credit each)
MAX_SLOT_BYTES = 16 << 20
CREDIT = b"\x01"
_NAME_RE = re.compile(r"^dml-(\d+)-[0-9a-f]+$")

log = logging.getLogger(__name__)


def available() -> bool:
    """Whether this host has a writable /dev/shm."""
    return SHM_DIR.is_dir() and os.access(SHM_DIR, os.W_OK)


def owner_pid(name: str) -> int | None:
    """The pid of the process that created the dml shared-memory file ``name`` (None: not one)."""
    m = _NAME_RE.fullmatch(name)
    return int(m.group(1)) if m else None


def pid_alive(pid: int) -> bool:
    """Whether process ``pid`` exists (someone else's counts: it may be using its file)."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_orphans(directory: pathlib.Path = SHM_DIR, alive: Callable[[int], bool] = pid_alive) -> list[pathlib.Path]:
    """Removes this user's dml shared-memory files whose creator is gone; returns them."""
    removed: list[pathlib.Path] = []
    try:
        entries = list(os.scandir(directory))
    except OSError:
        return removed
    uid = os.getuid()
    for e in entries:
        pid = owner_pid(e.name)
        if pid is None or pid == os.getpid() or alive(pid):
            continue
        try:
            if e.stat(follow_symlinks=False).st_uid != uid or not e.is_file(follow_symlinks=False):
                continue
            os.unlink(e.path)
        except OSError:
            continue
        removed.append(pathlib.Path(e.path))
    if removed:
        log.info("removed %d shared-memory files in %s left by processes that are gone", len(removed), directory)
    return removed


class SharedSlots:
    """``SLOTS`` slots of ``slot_bytes`` in one shared mapping; frame ``i`` uses slot ``i % SLOTS``."""

    def __init__(self, path: pathlib.Path, mm: mmap.mmap, slot_bytes: int, owner: bool) -> None:
        self.path = path
        self._mm = mm
        self.slot_bytes = slot_bytes
        self._owner = owner
        self.view = memoryview(mm)

    @property
    def nonce(self) -> bytes:
        """The random bytes the creator wrote at the start."""
        return bytes(self.view[:NONCE_BYTES])

    @classmethod
    def create(cls, slot_bytes: int) -> SharedSlots:
        """A new file in /dev/shm, private to this user, sized for ``SLOTS`` slots."""
        if not 0 < slot_bytes <= MAX_SLOT_BYTES:
            raise ValueError(f"slot size must be 1..{MAX_SLOT_BYTES} bytes, got {slot_bytes}")
        path = SHM_DIR / f"dml-{os.getpid()}-{secrets.token_hex(12)}"
        size = HEADER_BYTES + SLOTS * slot_bytes
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.ftruncate(fd, size)
            mm = mmap.mmap(fd, size)
        except BaseException:
            os.close(fd)
            path.unlink(missing_ok=True)
            raise
        os.close(fd)
        slots = cls(path, mm, slot_bytes, owner=True)
        slots.view[:NONCE_BYTES] = secrets.token_bytes(NONCE_BYTES)
        return slots

    @classmethod
    def attach(cls, path: str, nonce: bytes, slot_bytes: int) -> SharedSlots:
        """Maps a file another process created; OSError or ValueError unless it is the one it
        described (same size and nonce): then the caller streams over TCP instead."""
        p = pathlib.Path(path)
        if p.parent != SHM_DIR or not p.name.startswith("dml-"):
            raise ValueError(f"not a dml shared-memory file: {path!r}")
        if not 0 < slot_bytes <= MAX_SLOT_BYTES or len(nonce) != NONCE_BYTES:
            raise ValueError("bad shared-memory geometry")
        size = HEADER_BYTES + SLOTS * slot_bytes
        fd = os.open(p, os.O_RDWR)
        try:
            if os.fstat(fd).st_size != size:
                raise ValueError(f"{path} has the wrong size")
            mm = mmap.mmap(fd, size)
        finally:
            os.close(fd)
        slots = cls(p, mm, slot_bytes, owner=False)
        if slots.nonce != nonce:
            slots.close()
            raise ValueError(f"{path} is not the file the receiver offered")
        return slots

    def slot(self, frame: int, nbytes: int) -> memoryview:
        """Frame ``frame``'s slot, its first ``nbytes`` bytes; ValueError if it does not fit."""
        if not 0 <= nbytes <= self.slot_bytes:
            raise ValueError(f"a payload of {nbytes} bytes does not fit a {self.slot_bytes}-byte slot")
        start = HEADER_BYTES + (frame % SLOTS) * self.slot_bytes
        return self.view[start : start + nbytes]

    def unlink(self) -> None:
        """Removes the file's name (mappings stay valid); the creator calls it once attached."""
        if self._owner:
            self.path.unlink(missing_ok=True)

    def close(self) -> None:
        """Unlinks (the creator). The mapping itself goes when the last reference does: a
        thread may still be copying out of a slot when another closes the stream, and an
        explicit unmap under it would crash the process."""
        self.unlink()
