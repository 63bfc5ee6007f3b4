"""The peer's copy of datasets from the coordinator's store (``JobSpec.dataset``).

:class:`ChunkCache` keeps chunks on the peer's disk under their sha256 (``<folder>/chunks/``),
least recently used first out when they pass ``max_bytes``; every chunk is checked against its
digest when it arrives and again whenever it is read back, so a tampered or truncated cache file
is found, deleted, logged and fetched again. :meth:`ChunkCache.materialise` assembles a
dataset's files from its manifest under ``<folder>/datasets/<dataset digest>/`` (content
addressed: a second job on the same dataset, or a restarted peer, finds it there and fetches
nothing); that folder is the task's ``ctx.data_dir``. Whole files for now: every peer fetches
every file, not only its shard's rows.

The bytes from the network are treated as hostile: a manifest must be valid
(:func:`dml.common.datasets.manifest_error`) and hash to the digest it came with, a chunk may
hold at most :data:`~dml.common.datasets.CHUNK_BYTES` and must hash to its name, and every
assembled file must have its manifest's size.
"""
from __future__ import annotations

import collections
import logging
import os
import pathlib
import shutil
import tempfile
import threading
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from dml.common.datasets import CHUNK_BYTES, FileEntry, chunk_digest, digest_error, manifest_digest, manifest_error
from dml.common.files import write_atomic

if TYPE_CHECKING:
    from dml.v1 import data_pb2

log = logging.getLogger(__name__)
_STRIPES = 64  # chunk locks: a digest takes the one its first hex digits name


class DatasetError(Exception):
    """A dataset cannot be materialised here: the message says why (a manifest or chunk that
    fails its checks, a file of the wrong size)."""


@dataclass(frozen=True)
class Manifest:
    """A dataset as the coordinator described it: its name, digest and files."""

    name: str
    digest: str
    files: tuple[FileEntry, ...]

    def check(self) -> None:
        """Raises :class:`DatasetError` unless the files form a valid manifest that hashes to
        ``digest``."""
        if err := manifest_error(list(self.files)):
            raise DatasetError(f"dataset {self.name}: the coordinator's manifest is refused: {err}")
        got = manifest_digest(list(self.files))
        if got != self.digest:
            raise DatasetError(f"dataset {self.name}: the manifest hashes to {got}, not to its digest {self.digest[:80]}")


@dataclass
class Counters:
    """What a cache did: chunks and bytes fetched from the coordinator, chunks read from the
    cache instead (hits), and cache files found damaged (then deleted and fetched again)."""

    chunks_fetched: int = 0
    bytes_fetched: int = 0
    hits: int = 0
    damaged: int = 0
    evicted: int = 0

    def minus(self, before: Counters) -> Counters:
        """The counts since ``before``."""
        return Counters(*(getattr(self, k) - getattr(before, k) for k in self.__dataclass_fields__))


class ChunkCache:
    """Content-addressed chunks and the datasets assembled from them under ``folder`` (None: a
    temp dir made at first use and removed by :meth:`close`), at most ``max_bytes`` of chunks
    (0: no limit). Thread-safe: one fetch per chunk however many threads ask for it."""

    def __init__(self, folder: pathlib.Path | None = None, max_bytes: int = 0) -> None:
        if max_bytes < 0:
            raise ValueError(f"max_bytes must be 0 (no limit) or positive, got {max_bytes}")
        self.max_bytes = max_bytes
        self.counters = Counters()
        self._folder = folder
        self._tmp: str | None = None
        self._lock = threading.Lock()  # guards everything below and counters
        self._lru: collections.OrderedDict[str, int] = collections.OrderedDict()  # digest -> size, oldest first
        self._bytes = 0
        self._loaded = False
        self._pins: collections.Counter[str] = collections.Counter()  # digest -> datasets being materialised with it
        self._chunk_locks = [threading.Lock() for _ in range(_STRIPES)]  # one fetch per digest at a time
        self._dataset_locks: dict[str, threading.Lock] = {}

    # -- folders --------------------------------------------------------------------------
    @property
    def folder(self) -> pathlib.Path:
        """The cache's folder (made on first use), holding ``chunks/`` and ``datasets/``."""
        with self._lock:
            return self._folder_locked()

    def _folder_locked(self) -> pathlib.Path:
        if self._folder is None:
            self._tmp = tempfile.mkdtemp(prefix="dml-data-")
            self._folder = pathlib.Path(self._tmp)
        if not self._loaded:  # the folders, and the chunks a previous run left (oldest access first)
            (self._folder / "chunks").mkdir(parents=True, exist_ok=True)
            (self._folder / "datasets").mkdir(parents=True, exist_ok=True)
            found = []
            for p in (self._folder / "chunks").iterdir():
                if digest_error(p.name) == "":
                    try:
                        st = p.stat()
                    except FileNotFoundError:
                        continue
                    found.append((st.st_mtime_ns, p.name, st.st_size))
            for _, name, size in sorted(found):
                self._lru[name] = size
                self._bytes += size
            self._loaded = True
        return self._folder

    def chunk_path(self, digest: str) -> pathlib.Path:
        """Where chunk ``digest`` is kept (whether or not it is there)."""
        if err := digest_error(digest):
            raise DatasetError(err)
        return self.folder / "chunks" / digest

    @property
    def stored_bytes(self) -> int:
        """The bytes of chunks held now."""
        with self._lock:
            self._folder_locked()
            return self._bytes

    def held(self) -> list[str]:
        """The digests held, least recently used first."""
        with self._lock:
            self._folder_locked()
            return list(self._lru)

    # -- chunks ---------------------------------------------------------------------------
    def get(self, digest: str, fetch: Callable[[str], bytes]) -> bytes:
        """Chunk ``digest``: from the cache when it is there and still hashes to its name, else
        ``fetch(digest)``-ed, checked (at most CHUNK_BYTES, hashing to ``digest``: else
        :class:`DatasetError`) and kept. Concurrent calls for one digest fetch it once."""
        path = self.chunk_path(digest)
        with self._chunk_locks[int(digest[:8], 16) % _STRIPES]:
            data = self._read(digest, path)
            if data is not None:
                return data
            data = fetch(digest)
            if len(data) > CHUNK_BYTES:
                raise DatasetError(f"chunk {digest[:12]} from the coordinator is {len(data)} bytes, over the "
                                   f"protocol's {CHUNK_BYTES}: refused")
            got = chunk_digest(data)
            if got != digest:
                raise DatasetError(f"chunk {digest[:12]} from the coordinator hashes to {got[:12]}: refused")
            write_atomic(path, data)
            with self._lock:
                self.counters.chunks_fetched += 1
                self.counters.bytes_fetched += len(data)
                self._bytes += len(data) - self._lru.pop(digest, 0)
                self._lru[digest] = len(data)
                self._evict_locked()
            return data

    def _read(self, digest: str, path: pathlib.Path) -> bytes | None:
        """The cached chunk when it is there and intact; a damaged one is deleted (None)."""
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            with self._lock:
                self._bytes -= self._lru.pop(digest, 0)
            return None
        if chunk_digest(data) == digest:
            try:
                os.utime(path)  # the LRU order survives a restart
            except FileNotFoundError:
                pass
            with self._lock:
                self.counters.hits += 1
                if digest in self._lru:
                    self._lru.move_to_end(digest)
                elif path.exists():  # written by another process sharing the folder (not evicted meanwhile)
                    self._lru[digest] = len(data)
                    self._bytes += len(data)
            return data
        log.warning("cached chunk %s is damaged (%d bytes that do not hash to its name): deleted, fetching it again",
                    path, len(data))
        path.unlink(missing_ok=True)
        with self._lock:
            self.counters.damaged += 1
            self._bytes -= self._lru.pop(digest, 0)
        return None

    def _evict_locked(self) -> None:
        """Deletes least recently used chunks while over the limit, never a pinned one (a chunk
        of a dataset being materialised now)."""
        if not self.max_bytes or self._bytes <= self.max_bytes:
            return
        for digest in list(self._lru):
            if self._bytes <= self.max_bytes:
                break
            if self._pins[digest]:
                continue
            size = self._lru.pop(digest)
            (self._folder_locked() / "chunks" / digest).unlink(missing_ok=True)
            self._bytes -= size
            self.counters.evicted += 1
        if self._bytes > self.max_bytes:
            log.info("the dataset cache holds %d bytes, over its %d: the rest is in use by a dataset being "
                     "materialised", self._bytes, self.max_bytes)

    # -- datasets -------------------------------------------------------------------------
    def dataset_dir(self, digest: str) -> pathlib.Path:
        """Where the dataset of ``digest`` is assembled."""
        if err := digest_error(digest):
            raise DatasetError(f"dataset digest: {err}")
        return self.folder / "datasets" / digest

    def materialise(self, manifest: Manifest, fetch: Callable[[str], bytes]) -> pathlib.Path:
        """The folder holding ``manifest``'s files, each of its size: reused when a previous
        call assembled it, else built from its chunks (cache first, ``fetch`` for the rest) in a
        temp folder renamed into place. Raises :class:`DatasetError` for a manifest, chunk or
        file that fails its checks."""
        manifest.check()
        dest = self.dataset_dir(manifest.digest)
        with self._lock:
            lock = self._dataset_locks.setdefault(manifest.digest, threading.Lock())
        with lock:
            if dest.is_dir():
                if _sizes_match(dest, manifest.files):
                    return dest
                log.warning("dataset %s at %s does not hold its files at their sizes: assembling it again",
                            manifest.name, dest)
                shutil.rmtree(dest, ignore_errors=True)
            digests = {d for f in manifest.files for d in f.chunks}
            with self._lock:
                self._pins.update(digests)
            tmp = dest.with_name(f".{dest.name}.{uuid.uuid4().hex}")
            try:
                tmp.mkdir()
                for f in manifest.files:
                    _assemble(tmp, f, lambda d: self.get(d, fetch))
                try:
                    os.rename(tmp, dest)
                except OSError:
                    if not _sizes_match(dest, manifest.files):  # not another process's copy that got there first
                        raise
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
                with self._lock:
                    self._pins.subtract(digests)
                    self._pins = +self._pins  # drop the zeros
                    self._evict_locked()
            return dest

    def close(self) -> None:
        """Removes the temp folder, if this cache made one."""
        if self._tmp is not None:
            shutil.rmtree(self._tmp, ignore_errors=True)


def _inside(root: pathlib.Path, rel: str) -> pathlib.Path:
    """``root / rel`` for a path that :func:`~dml.common.datasets.path_error` accepted, checked to
    stay under ``root`` all the same."""
    path = root.joinpath(*rel.split("/"))
    if not path.resolve().is_relative_to(root.resolve()):
        raise DatasetError(f"file path {rel!r} leaves the dataset folder")
    return path


def _assemble(root: pathlib.Path, f: FileEntry, chunk: Callable[[str], bytes]) -> None:
    """Writes file ``f`` under ``root`` from its chunks; DatasetError unless it has its size."""
    path = _inside(root, f.path)
    path.parent.mkdir(parents=True, exist_ok=True)
    written = 0
    with open(path, "xb") as out:
        for d in f.chunks:
            data = chunk(d)
            written += len(data)
            if written > f.size:
                break
            out.write(data)
        out.flush()
        os.fsync(out.fileno())
    if written != f.size:
        raise DatasetError(f"file {f.path!r}: its chunks hold {'more than ' if written > f.size else ''}{written} bytes, "
                           f"its manifest says {f.size}")


def _sizes_match(root: pathlib.Path, files: tuple[FileEntry, ...]) -> bool:
    """Whether every file of the manifest is under ``root`` at its size."""
    for f in files:
        try:
            if _inside(root, f.path).stat().st_size != f.size:
                return False
        except (FileNotFoundError, NotADirectoryError):
            return False
    return True


def manifest_of(resp: data_pb2.GetDatasetResponse) -> Manifest:
    """A GetDatasetResponse as a :class:`Manifest` (unchecked: :meth:`Manifest.check`)."""
    return Manifest(resp.dataset.name, resp.dataset.digest,
                    tuple(FileEntry(f.path, f.size, tuple(f.chunks)) for f in resp.files))
