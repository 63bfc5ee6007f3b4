"""The peer's copy of datasets from the coordinator's store (``JobSpec.dataset``), fetched only
where a task reads them.

:class:`ChunkCache` keeps each dataset in its own folder, ``<folder>/datasets/<dataset digest>/``
(the task's ``ctx.data_dir``), every file at its full size as a *sparse* file: a chunk is fetched
when a read needs it, checked against its sha256 and its place in the file, and only then written
into place at its offset; the holes cost no disk. Beside it ``<digest>.manifest`` keeps the
manifest (its canonical JSON, which hashes to the digest) and ``<digest>.present`` the chunks
present (a bitmap per file, written atomically at most every second and when the cache closes),
so a restarted peer knows what it has; every present chunk is hashed again when the dataset is
opened: a tampered or truncated one is logged, forgotten and fetched again when next needed. Nothing is kept twice
(no chunk store beside the files).

:class:`StoreSource` is what a job's ``dml.Context`` reads through (``ctx.path`` fetches whole
files or folders, ``ctx.array`` gives a :class:`RowArray` that fetches only the chunks holding the
rows asked for, ``ctx.files`` lists the manifest); its counters are the job's. Past ``max_bytes``
the least recently used chunks of any dataset are evicted by punching their holes back
(``fallocate(FALLOC_FL_PUNCH_HOLE)``; where the file system cannot, the bytes are overwritten with
zeros and the space is only notionally freed), never a chunk being read right now nor one of a
file a live job fetched whole with ``ctx.path``: chunks rather than whole datasets, so a peer
whose cache is smaller than a dataset still keeps the rows of its own shards.

The bytes from the network are treated as hostile: a manifest must be valid
(:func:`dml.common.datasets.manifest_error`), hash to the digest it came with and be cut the way
``dml data put`` cuts files (every chunk but a file's last holds exactly ``chunk_bytes``, so a
row's chunk follows from its offset); a chunk must hash to its name and have the size of its
place; a ``.npy`` header must describe exactly the file's size.
"""
from __future__ import annotations

import collections
import contextlib
import ctypes
import ctypes.util
import fcntl
import io
import json
import logging
import os
import pathlib
import shutil
import tempfile
import threading
import time
import weakref
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
from numpy.lib import format as npformat

from dml.common.datasets import (CHUNK_BYTES, FileEntry, canonical, chunk_digest, digest_error, manifest_digest,
                                 manifest_error)
from dml.common.files import write_atomic

if TYPE_CHECKING:
    from dml.v1 import data_pb2

log = logging.getLogger(__name__)
_STRIPES = 64  # chunk locks: a chunk takes the one its key hashes to
RECORD_FORMAT = 1
SAVE_EVERY_S = 1.0  # a dataset's record of present chunks is written at most this often (and when it closes)
MAX_SLOTS = 64  # caches sharing one --cache-dir (each in its own peer-N/ folder)
MAX_HEADER_BYTES = 1 << 20  # a .npy header read for row access, at most (numpy's own limit is 10,000)

Fetch = Callable[[str], bytes]
ChunkKey = tuple[str, int, int]  # (dataset digest, file index in the manifest, chunk index in the file)


class DatasetError(Exception):
    """A dataset cannot be had here: the message says why (a manifest or chunk that fails its
    checks, a file cut in chunks of other sizes, a ``.npy`` header that lies)."""


class NotRowAddressable(DatasetError):
    """A ``.npy`` file whose rows cannot be fetched on their own (Fortran order, object dtype, a
    0-d array, an unknown format version): it is fetched whole instead."""


@dataclass(frozen=True)
class Manifest:
    """A dataset as the coordinator described it: its name, digest and files."""

    name: str
    digest: str
    files: tuple[FileEntry, ...]

    def check(self, chunk_bytes: int = CHUNK_BYTES) -> None:
        """Raises :class:`DatasetError` unless the files form a valid manifest that hashes to
        ``digest``, each cut in ``chunk_bytes`` chunks but its last."""
        if err := manifest_error(list(self.files)):
            raise DatasetError(f"dataset {self.name}: the coordinator's manifest is refused: {err}")
        got = manifest_digest(list(self.files))
        if got != self.digest:
            raise DatasetError(f"dataset {self.name}: the manifest hashes to {got}, not to its digest {self.digest[:80]}")
        for f in self.files:
            n = len(f.chunks)
            if n and not (n - 1) * chunk_bytes < f.size <= n * chunk_bytes:
                raise DatasetError(f"dataset {self.name}: {f.path!r} ({f.size} bytes in {n} chunks) is not cut in "
                                   f"chunks of {chunk_bytes} bytes as dml data put cuts files")


@dataclass
class Counters:
    """What a cache (or one job's reads of it) did: chunks and bytes fetched from the
    coordinator, chunks found present when asked for (hits), present chunks found damaged (then
    forgotten and fetched again), chunks evicted."""

    chunks_fetched: int = 0
    bytes_fetched: int = 0
    hits: int = 0
    damaged: int = 0
    evicted: int = 0

    def minus(self, before: Counters) -> Counters:
        """The counts since ``before``."""
        return Counters(*(getattr(self, k) - getattr(before, k) for k in self.__dataclass_fields__))


# -- holes ----------------------------------------------------------------------------------
_FALLOC_FL_KEEP_SIZE, _FALLOC_FL_PUNCH_HOLE = 0x01, 0x02
_libc: Any = None
_punch_ok = True


def punch_hole(fd: int, offset: int, length: int) -> bool:
    """Frees ``length`` bytes at ``offset`` of the file (they read as zeros after); True when
    the file system punched a hole, False when it could not and zeros were written instead."""
    global _libc, _punch_ok
    if _punch_ok:
        try:
            if _libc is None:
                _libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
                _libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
            if _libc.fallocate(fd, _FALLOC_FL_PUNCH_HOLE | _FALLOC_FL_KEEP_SIZE, offset, length) == 0:
                return True
            log.info("this file system cannot punch holes (%s): evicted chunks are overwritten with zeros",
                     os.strerror(ctypes.get_errno()))
        except (OSError, AttributeError) as e:
            log.info("no fallocate here (%s): evicted chunks are overwritten with zeros", e)
        _punch_ok = False
    os.pwrite(fd, bytes(length), offset)
    return False


# -- one dataset ----------------------------------------------------------------------------
class StoreDataset:
    """One dataset of the store in the cache: its sparse files and which chunks are present.
    Made by :meth:`ChunkCache.open`; thread-safe (its state is guarded by the cache's lock)."""

    def __init__(self, cache: ChunkCache, manifest: Manifest, root: pathlib.Path) -> None:
        self.cache = cache
        self.manifest = manifest
        self.root = root
        self.files = manifest.files
        self.index = {f.path: i for i, f in enumerate(manifest.files)}
        self.have = [np.zeros(len(f.chunks), dtype=np.bool_) for f in manifest.files]  # present chunks, per file
        self.fetch: Fetch | None = None
        self.verified = False  # present chunks hashed since this process opened it
        self._record_lock = threading.Lock()
        self._saved_at = -SAVE_EVERY_S
        self._made: set[int] = set()  # files made at their size by this process
        self._dirty = False

    @property
    def digest(self) -> str:
        """The dataset's digest."""
        return self.manifest.digest

    def file_path(self, i: int) -> pathlib.Path:
        """Where file ``i`` lives."""
        return _inside(self.root, self.files[i].path)

    def chunk_span(self, i: int, c: int) -> tuple[int, int]:
        """(offset, length) of chunk ``c`` of file ``i``."""
        cb = self.cache.chunk_bytes
        off = c * cb
        return off, min(cb, self.files[i].size - off)

    def chunks_of(self, i: int, start: int, stop: int) -> range:
        """The chunks of file ``i`` holding its bytes [start, stop)."""
        if stop <= start:
            return range(0)
        cb = self.cache.chunk_bytes
        return range(start // cb, (stop - 1) // cb + 1)

    def all_chunks(self, i: int) -> range:
        """Every chunk of file ``i``."""
        return range(len(self.files[i].chunks))

    def holds(self, i: int, chunks: Iterable[int]) -> bool:
        """Whether every one of ``chunks`` of file ``i`` is present."""
        idx = chunks if isinstance(chunks, np.ndarray) else np.fromiter(chunks, dtype=np.int64)
        with self.cache._lock:
            return bool(self.have[i][idx].all()) if idx.size else True

    def present(self) -> list[tuple[int, int]]:
        """The present chunks as (file, chunk), sorted (call under the cache's lock, or accept
        a snapshot)."""
        return [(i, int(c)) for i, h in enumerate(self.have) for c in np.flatnonzero(h)]

    def present_count(self) -> int:
        """How many chunks are present."""
        with self.cache._lock:
            return int(sum(int(h.sum()) for h in self.have))

    def ensure(self, i: int, chunks: Iterable[int], counters: Counters | None = None,
               cancelled: threading.Event | None = None) -> None:
        """Makes chunks ``chunks`` of file ``i`` present: fetched, checked and written into place
        unless they are. Concurrent calls for one chunk fetch it once. ``counters`` (a job's)
        counts as the cache's own do; ``cancelled`` stops between chunks."""
        cache = self.cache
        idx = chunks if isinstance(chunks, np.ndarray) else np.fromiter(chunks, dtype=np.int64)
        with cache._lock:  # the present ones in one go: the path every batch of a warm cache takes
            missing = idx[~self.have[i][idx]].tolist()
            hits = int(idx.size) - len(missing)
            if hits:
                cache.counters.hits += hits
                if counters is not None:
                    counters.hits += hits
                if cache.max_bytes:  # the order only matters for eviction
                    lru, d = cache._lru, self.digest
                    for c in idx.tolist():
                        if (d, i, c) in lru:
                            lru.move_to_end((d, i, c))
        for c in missing:
            if cancelled is not None and cancelled.is_set():
                return
            self._ensure_one(i, c, counters)

    def _ensure_one(self, i: int, c: int, counters: Counters | None) -> None:
        key = (self.digest, i, c)
        cache = self.cache
        with cache._chunk_locks[hash(key) % _STRIPES]:
            with cache._lock:
                if self.have[i][c]:  # fetched by another thread meanwhile
                    cache._hit_locked(key, counters)
                    return
            if self.fetch is None:
                raise DatasetError(f"dataset {self.manifest.name}: not opened for fetching")
            digest = self.files[i].chunks[c]
            off, length = self.chunk_span(i, c)
            data = self.fetch(digest)
            if len(data) > CHUNK_BYTES:
                raise DatasetError(f"chunk {digest[:12]} from the coordinator is {len(data)} bytes, over the "
                                   f"protocol's {CHUNK_BYTES}: refused")
            got = chunk_digest(data)
            if got != digest:
                raise DatasetError(f"chunk {digest[:12]} from the coordinator hashes to {got[:12]}: refused")
            if len(data) != length:
                raise DatasetError(f"chunk {c} of {self.files[i].path!r} holds {len(data)} bytes where its place in "
                                   f"the file ({self.files[i].size} bytes) holds {length}: refused")
            self.make_file(i)
            fd = os.open(self.file_path(i), os.O_WRONLY)
            try:
                os.pwrite(fd, data, off)
            finally:
                os.close(fd)
            with cache._lock:
                self.have[i][c] = True
                cache._added_locked(key, length, counters)
            self.save()
            cache._evict()

    def save(self, force: bool = False) -> None:
        """Writes the record of present chunks (atomically; the manifest beside it once): at
        most every :data:`SAVE_EVERY_S` unless ``force``d, so a fast fetch is not an fsync per
        chunk (a peer killed meanwhile forgets the last second's chunks, fetched again later)."""
        with self._record_lock:
            now = time.monotonic()
            if not force and now - self._saved_at < SAVE_EVERY_S:
                self._dirty = True
                return
            self._dirty, self._saved_at = False, now
            manifest = self.cache.manifest_path(self.digest)
            if not manifest.exists():
                write_atomic(manifest, canonical(list(self.files)))
            with self.cache._lock:
                bits = [np.packbits(h).tobytes().hex() for h in self.have]
            body = {"format": RECORD_FORMAT, "name": self.manifest.name, "present": bits}
            write_atomic(self.cache.record_path(self.digest), json.dumps(body, separators=(",", ":")).encode())

    def flush(self) -> None:
        """Writes the record if a throttled :meth:`save` left it behind."""
        with self._record_lock:
            dirty = self._dirty
        if dirty:
            self.save(force=True)

    def verify(self, counters: Counters | None = None) -> None:
        """Hashes every present chunk again; a damaged one is logged and forgotten (fetched
        again when next needed)."""
        with self.cache._lock:
            present = self.present()
        bad = []
        for i, c in present:
            off, length = self.chunk_span(i, c)
            try:
                with open(self.file_path(i), "rb") as f:
                    f.seek(off)
                    data = f.read(length)
            except (FileNotFoundError, NotADirectoryError, IsADirectoryError):
                data = b""
            if len(data) != length or chunk_digest(data) != self.files[i].chunks[c]:
                log.warning("dataset %s: cached chunk %d of %s is damaged (%d bytes that do not hash to its digest): "
                            "forgotten, it is fetched again when needed", self.manifest.name, c, self.files[i].path,
                            len(data))
                bad.append((i, c))
        with self.cache._lock:
            for i, c in bad:
                self.have[i][c] = False
                self.cache._forget_locked((self.digest, i, c))
                self.cache.counters.damaged += 1
                if counters is not None:
                    counters.damaged += 1
            self.verified = True
        if bad:
            self.save(force=True)

    def make_file(self, i: int) -> None:
        """Creates file ``i`` at its size (sparse) unless it is there at that size. Files are
        made when a read through ``ctx`` first needs them, so a task that reads ``ctx.data_dir``
        directly finds no file rather than one of zeros."""
        if i in self._made:
            return
        f = self.files[i]
        path = self.file_path(i)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o644)
        try:
            if os.fstat(fd).st_size != f.size:
                os.ftruncate(fd, f.size)
        finally:
            os.close(fd)
        self._made.add(i)

    def evict(self, i: int, c: int) -> None:
        """Frees chunk ``c`` of file ``i`` (the caller has forgotten it)."""
        off, length = self.chunk_span(i, c)
        try:
            fd = os.open(self.file_path(i), os.O_WRONLY)
        except FileNotFoundError:
            return
        try:
            punch_hole(fd, off, length)
        finally:
            os.close(fd)


# -- the cache --------------------------------------------------------------------------------
class ChunkCache:
    """Datasets of the store under ``folder`` (None: a temp dir made at first use and removed by
    :meth:`close`), at most ``max_bytes`` of present chunks in all (0: no limit). ``chunk_bytes``
    is how ``dml data put`` cuts files (tests use smaller ones). Thread-safe."""

    def __init__(self, folder: pathlib.Path | None = None, max_bytes: int = 0, chunk_bytes: int = CHUNK_BYTES) -> None:
        if max_bytes < 0:
            raise ValueError(f"max_bytes must be 0 (no limit) or positive, got {max_bytes}")
        if not 1 <= chunk_bytes <= CHUNK_BYTES:
            raise ValueError(f"chunk_bytes must be 1 to {CHUNK_BYTES}, got {chunk_bytes}")
        self.max_bytes = max_bytes
        self.chunk_bytes = chunk_bytes
        self.counters = Counters()
        self._folder = folder
        self._tmp: str | None = None
        self._lock = threading.RLock()  # guards everything below, the datasets' present sets and counters
        self._lru: collections.OrderedDict[ChunkKey, int] = collections.OrderedDict()  # key -> size, oldest first
        self._bytes = 0
        self._loaded = False
        self._datasets: dict[str, StoreDataset] = {}
        self._pins: collections.Counter[ChunkKey] = collections.Counter()  # chunks being read or held by a job
        self._chunk_locks = [threading.Lock() for _ in range(_STRIPES)]  # one fetch per chunk at a time
        self._open_locks: dict[str, threading.Lock] = {}
        self._closed = False
        self._lock_fd: weakref.finalize | None = None  # closes the folder's lock (held for the cache's life: _claim)

    # -- folders --------------------------------------------------------------------------
    @property
    def folder(self) -> pathlib.Path:
        """The cache's folder (made on first use), holding ``datasets/``."""
        with self._lock:
            return self._folder_locked()

    def _folder_locked(self) -> pathlib.Path:
        if self._closed:
            raise DatasetError("the dataset cache is closed (the peer is stopping)")
        if self._folder is None:
            self._tmp = tempfile.mkdtemp(prefix="dml-data-")
            self._folder = pathlib.Path(self._tmp)
        if not self._loaded:  # the records a previous run left: what it held (verified when opened)
            self._folder = self._claim(self._folder)
            (self._folder / "datasets").mkdir(parents=True, exist_ok=True)
            self._loaded = True
            for p in sorted((self._folder / "datasets").glob("*.present")):
                self._load_record(p)
        return self._folder

    def _claim(self, folder: pathlib.Path) -> pathlib.Path:
        """``folder``, or its first ``peer-N/`` subfolder no other live cache holds: a cache
        takes an exclusive lock on its folder for its life, since another one punching holes
        in files this one counts as present would have it read zeros. (Peers sharing a working
        directory, as ``dml local`` starts them, so each keep their own cache under it.)"""
        folder.mkdir(parents=True, exist_ok=True)
        for n in range(MAX_SLOTS):
            slot = folder if n == 0 else folder / f"peer-{n}"
            slot.mkdir(exist_ok=True)
            fd = os.open(slot / ".lock", os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                os.close(fd)
                continue
            self._lock_fd = weakref.finalize(self, os.close, fd)  # released with the cache, or by close()
            if n:
                log.info("dataset cache %s is in use by another peer: this one keeps its datasets in %s", folder, slot)
            return slot
        raise DatasetError(f"dataset cache {folder}: {MAX_SLOTS} peers use it already; give this one its own --cache-dir")

    def _load_record(self, path: pathlib.Path) -> None:
        digest = path.stem
        try:
            if err := digest_error(digest):
                raise DatasetError(err)
            body = json.loads(path.read_bytes())
            if body.get("format") != RECORD_FORMAT:
                raise DatasetError(f"format {body.get('format')!r}, not {RECORD_FORMAT}")
            files = tuple(FileEntry(str(f["path"]), int(f["size"]), tuple(str(c) for c in f["chunks"]))
                          for f in json.loads(self.manifest_path(digest).read_bytes())["files"])
            manifest = Manifest(str(body["name"]), digest, files)
            manifest.check(self.chunk_bytes)  # the manifest file hashes to the digest it is named by
            bits = body["present"]
            if not isinstance(bits, list) or len(bits) != len(files):
                raise DatasetError("present chunks for another number of files")
            have = []
            for f, hexbits in zip(files, bits):
                h = np.unpackbits(np.frombuffer(bytes.fromhex(hexbits), dtype=np.uint8))
                if h.size != -(-len(f.chunks) // 8) * 8 or h[len(f.chunks):].any():
                    raise DatasetError(f"present chunks of {f.path!r} do not fit its {len(f.chunks)} chunks")
                have.append(h[: len(f.chunks)].astype(np.bool_))
        except (OSError, ValueError, KeyError, TypeError, AttributeError, DatasetError) as e:
            log.warning("dataset cache record %s is unreadable (%s): forgetting that dataset", path, e)
            path.unlink(missing_ok=True)
            self.manifest_path(digest).unlink(missing_ok=True)
            shutil.rmtree(path.with_suffix(""), ignore_errors=True)
            return
        ds = StoreDataset(self, manifest, self._folder_locked() / "datasets" / digest)
        ds.have = have
        self._datasets[digest] = ds
        for i, c in ds.present():
            size = ds.chunk_span(i, c)[1]
            self._lru[(digest, i, c)] = size
            self._bytes += size

    def record_path(self, digest: str) -> pathlib.Path:
        """Where the record of dataset ``digest``'s present chunks is kept."""
        return self.folder / "datasets" / f"{digest}.present"

    def manifest_path(self, digest: str) -> pathlib.Path:
        """Where dataset ``digest``'s manifest is kept (its canonical JSON: it hashes to the digest)."""
        return self.folder / "datasets" / f"{digest}.manifest"

    def dataset_dir(self, digest: str) -> pathlib.Path:
        """Where the files of the dataset of ``digest`` are."""
        if err := digest_error(digest):
            raise DatasetError(f"dataset digest: {err}")
        return self.folder / "datasets" / digest

    @property
    def stored_bytes(self) -> int:
        """The bytes of present chunks, all datasets together."""
        with self._lock:
            self._folder_locked()
            return self._bytes

    def held(self) -> list[ChunkKey]:
        """The chunks present, least recently used first."""
        with self._lock:
            self._folder_locked()
            return list(self._lru)

    # -- opening ----------------------------------------------------------------------------
    def open(self, manifest: Manifest, fetch: Fetch, counters: Counters | None = None) -> StoreDataset:
        """The dataset of ``manifest`` in this cache (its folder made, its files made as reads
        need them), its present chunks hashed again the first time this process opens it; later
        chunks come from ``fetch(digest)``. Raises :class:`DatasetError` for a manifest that fails its checks."""
        manifest.check(self.chunk_bytes)
        root = self.dataset_dir(manifest.digest)
        with self._lock:
            lock = self._open_locks.setdefault(manifest.digest, threading.Lock())
        with lock:
            with self._lock:
                ds = self._datasets.get(manifest.digest)
                if ds is None or ds.files != manifest.files:
                    if ds is not None:  # a record that disagrees with the digest's own manifest
                        self._drop_locked(ds)
                    ds = StoreDataset(self, manifest, root)
                    self._datasets[manifest.digest] = ds
            ds.fetch = fetch
            if not ds.verified:
                root.mkdir(parents=True, exist_ok=True)
                ds.verify(counters)
                ds.save(force=True)
        return ds

    def _drop_locked(self, ds: StoreDataset) -> None:
        for i, c in ds.present():
            self._forget_locked((ds.digest, i, c))
            ds.have[i][c] = False

    # -- accounting (all under self._lock) ------------------------------------------------------
    def _hit_locked(self, key: ChunkKey, counters: Counters | None) -> None:
        self.counters.hits += 1
        if counters is not None:
            counters.hits += 1
        if key in self._lru:
            self._lru.move_to_end(key)

    def _added_locked(self, key: ChunkKey, size: int, counters: Counters | None) -> None:
        for c in (self.counters, counters):
            if c is not None:
                c.chunks_fetched += 1
                c.bytes_fetched += size
        self._bytes += size - self._lru.pop(key, 0)
        self._lru[key] = size

    def _forget_locked(self, key: ChunkKey) -> None:
        self._bytes -= self._lru.pop(key, 0)

    # -- pins and eviction ------------------------------------------------------------------------
    def pin(self, keys: Iterable[ChunkKey]) -> list[ChunkKey]:
        """Keeps ``keys`` from eviction until :meth:`unpin`; returns them."""
        keys = list(keys)
        with self._lock:
            self._pins.update(keys)
        return keys

    def unpin(self, keys: Iterable[ChunkKey]) -> None:
        """Undoes one :meth:`pin` of ``keys``, evicting what is over the limit now."""
        with self._lock:
            self._pins.subtract(keys)
            self._pins = +self._pins  # drop the zeros
        self._evict()

    def _evict(self) -> None:
        """Frees least recently used chunks while over the limit, never a pinned one."""
        if not self.max_bytes:
            return
        changed: set[str] = set()
        with self._lock:
            if self._bytes <= self.max_bytes:
                return
            for key in list(self._lru):
                if self._bytes <= self.max_bytes:
                    break
                if self._pins[key]:
                    continue
                digest, i, c = key
                ds = self._datasets.get(digest)
                self._forget_locked(key)
                self.counters.evicted += 1
                if ds is not None:
                    ds.have[i][c] = False
                    ds.evict(i, c)
                    changed.add(digest)
            over = self._bytes > self.max_bytes
        for digest in changed:
            self._datasets[digest].save()
        if over:
            log.info("the dataset cache holds %d bytes, over its %d: the rest is being read or held by a job",
                     self.stored_bytes, self.max_bytes)

    def close(self) -> None:
        """Writes what a throttled save left behind, releases the folder (its lock), and
        removes it if this cache made it as a temp dir. The cache is unusable after."""
        with self._lock:
            datasets = list(self._datasets.values())
        for ds in datasets:
            ds.flush()
        with self._lock:
            if self._lock_fd is not None:
                self._lock_fd()  # closes the lock's file, and the lock goes with it
                self._lock_fd = None
            self._loaded = False
            self._closed = True
            self._datasets.clear()
            self._lru.clear()
            self._bytes = 0
        if self._tmp is not None:
            shutil.rmtree(self._tmp, ignore_errors=True)


def _inside(root: pathlib.Path, rel: str) -> pathlib.Path:
    """``root / rel`` for a path that :func:`~dml.common.datasets.path_error` accepted, checked to
    stay under ``root`` all the same."""
    path = root.joinpath(*rel.split("/"))
    if not path.resolve().is_relative_to(root.resolve()):
        raise DatasetError(f"file path {rel!r} leaves the dataset folder")
    return path


# -- rows of a .npy file --------------------------------------------------------------------------
class RowArray:
    """A ``.npy`` file of a store dataset as a read-only array of rows: what ``ctx.array`` gives.
    It behaves like ``np.load(path, mmap_mode="r")`` for what tasks and dml do with it (``len``,
    ``shape``, ``dtype``, ``ndim``, ``x[i]``, ``x[a:b]``, ``x[int_array]``, ``x[rows, cols]``,
    ``np.asarray(x)``), and fetches the chunks holding the rows asked for before reading them
    (the header's chunk when it is opened). Raises :class:`NotRowAddressable` for files whose
    rows cannot be read on their own, :class:`DatasetError` for a header that lies."""

    def __init__(self, ds: StoreDataset, rel: str, counters: Counters | None = None) -> None:
        if rel not in ds.index:
            raise FileNotFoundError(f"dataset {ds.manifest.name} has no file {rel!r}")
        self._ds, self.rel, self._counters = ds, rel, counters
        self._fi = i = ds.index[rel]
        self._chunks = len(ds.files[i].chunks)
        size = ds.files[i].size
        if size == 0:
            raise DatasetError(f"{rel}: an empty file is no .npy array")
        ds.make_file(i)  # at its size before it is mapped, even where its header's chunk is present already
        head_len = min(size, ds.cache.chunk_bytes)
        keys = ds.cache.pin(self._keys([0]))  # the header's chunk, not evicted before it is read
        try:
            ds.ensure(i, [0], counters)
            with open(ds.file_path(i), "rb") as f:
                head = f.read(head_len)
        finally:
            ds.cache.unpin(keys)
        self.shape, self.dtype, self.offset = _parse_header(rel, head, size)
        self.ndim = len(self.shape)
        self.row_bytes = int(self.dtype.itemsize * int(np.prod(self.shape[1:], dtype=np.int64)))
        self.size = int(np.prod(self.shape, dtype=np.int64))
        self.nbytes = self.size * self.dtype.itemsize
        self.itemsize = self.dtype.itemsize
        # The file mapped (a plain ndarray view of the memmap: indexed without its subclass's overhead).
        self._arr = np.memmap(ds.file_path(i), dtype=self.dtype, mode="r", offset=self.offset,
                              shape=self.shape).view(np.ndarray) if self.size else np.zeros(self.shape, self.dtype)

    def __len__(self) -> int:
        return int(self.shape[0])

    def __repr__(self) -> str:
        return f"RowArray({self.rel!r}, shape={self.shape}, dtype={self.dtype})"

    def _keys(self, chunks: Iterable[int]) -> list[ChunkKey]:
        return [(self._ds.digest, self._fi, int(c)) for c in chunks]

    def rows_of(self, key: Any) -> np.ndarray:
        """The row numbers (sorted, unique, checked in range: else IndexError) that ``x[key]``
        reads."""
        return np.unique(self._rows(key))

    def _rows(self, key: Any) -> np.ndarray | range:
        """The row numbers ``x[key]`` reads (checked in range, else IndexError; in any order,
        repeats kept; a slice as a range)."""
        n = len(self)
        rows = key[0] if isinstance(key, tuple) and key else key
        if isinstance(rows, slice):
            return range(*rows.indices(n))
        if isinstance(rows, (int, np.integer)) and not isinstance(rows, bool):
            r = int(rows)
            if not -n <= r < n:
                raise IndexError(f"{self.rel}: row {r} is out of range for {n} rows")
            return range(r % n, r % n + 1)
        if rows is Ellipsis or rows is None or (isinstance(key, tuple) and not key):
            return range(n)
        a = np.asarray(rows)
        if a.dtype == np.bool_:
            if a.shape != (n,):
                raise IndexError(f"{self.rel}: a boolean index of shape {a.shape} for {n} rows")
            return np.flatnonzero(a)
        if not np.issubdtype(a.dtype, np.integer):
            raise IndexError(f"{self.rel}: rows must be indexed by ints, slices or int arrays, not {a.dtype}")
        a = a.astype(np.int64, copy=False).ravel()
        if not a.size:
            return a
        lo, hi = int(a.min()), int(a.max())
        if lo < -n or hi >= n:
            raise IndexError(f"{self.rel}: row {hi if hi >= n else lo} is out of range for {n} rows")
        return np.where(a < 0, a + n, a) if lo < 0 else a

    def chunks_of_rows(self, rows: np.ndarray | range) -> np.ndarray:
        """The chunks holding ``rows``, sorted and unique."""
        if not len(rows) or not self.row_bytes:
            return np.zeros(0, dtype=np.int64)
        cb = self._ds.cache.chunk_bytes
        if isinstance(rows, range):
            if rows.step == 1 or abs(rows.step) * self.row_bytes <= cb:  # every chunk between the ends
                lo, hi = min(rows[0], rows[-1]), max(rows[0], rows[-1])
                return np.arange((self.offset + lo * self.row_bytes) // cb,
                                 (self.offset + (hi + 1) * self.row_bytes - 1) // cb + 1)
            rows = np.arange(rows.start, rows.stop, rows.step, dtype=np.int64)
        starts = self.offset + rows * self.row_bytes
        first = starts // cb
        last = (starts + self.row_bytes - 1) // cb
        if self.row_bytes <= cb:  # a row spans at most two chunks: mark them
            need = np.zeros(self._chunks, dtype=np.bool_)
            need[first] = True
            need[last] = True
            return np.flatnonzero(need)
        return np.unique(np.concatenate([np.arange(f, l + 1) for f, l in zip(first.tolist(), last.tolist())]))

    def ensure_rows(self, rows: Any, counters: Counters | None = None, cancelled: threading.Event | None = None) -> None:
        """Fetches the chunks holding ``rows`` (any index :meth:`rows_of` takes) unless present."""
        chunks = self.chunks_of_rows(self._rows(rows))
        self._ds.ensure(self._fi, chunks, counters or self._counters, cancelled)

    def holds(self, rows: Any) -> bool:
        """Whether every chunk holding ``rows`` is present."""
        return self._ds.holds(self._fi, self.chunks_of_rows(self._rows(rows)))

    @contextlib.contextmanager
    def _reading(self, rows: np.ndarray | range) -> Iterator[None]:
        chunks = self.chunks_of_rows(rows)
        cache = self._ds.cache
        keys = cache.pin(self._keys(chunks.tolist())) if cache.max_bytes else []  # not evicted between ensure and read
        try:
            self._ds.ensure(self._fi, chunks, self._counters)
            yield
        finally:
            if keys:
                cache.unpin(keys)

    def __getitem__(self, key: Any) -> Any:
        rows = self._rows(key)
        with self._reading(rows):
            got = self._arr[key]
            if isinstance(rows, range) and isinstance(got, np.ndarray):  # basic indexing: a view of the file,
                return got.copy()  # copied while its chunks are held
            return got  # one element, or what advanced indexing copied already

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        with self._reading(range(len(self))):
            out = self._arr.copy()
        return out if dtype is None else out.astype(dtype, copy=False)

    def __iter__(self) -> Iterator[Any]:
        for r in range(len(self)):
            yield self[r]


def _parse_header(rel: str, head: bytes, size: int) -> tuple[tuple[int, ...], np.dtype, int]:
    """(shape, dtype, data offset) of the ``.npy`` file whose first bytes are ``head`` and whose
    size is ``size``."""
    f = io.BytesIO(head)
    try:
        version = npformat.read_magic(f)
        if version == (1, 0):
            shape, fortran, dtype = npformat.read_array_header_1_0(f, max_header_size=MAX_HEADER_BYTES)
        elif version == (2, 0):
            shape, fortran, dtype = npformat.read_array_header_2_0(f, max_header_size=MAX_HEADER_BYTES)
        else:
            raise NotRowAddressable(f"{rel}: .npy format version {version} is not read by rows")
    except NotRowAddressable:
        raise
    except (ValueError, EOFError, SyntaxError, TypeError) as e:
        raise DatasetError(f"{rel}: not a .npy file whose header fits its first chunk: {e}") from None
    offset = f.tell()
    if dtype.hasobject:
        raise NotRowAddressable(f"{rel}: an array of Python objects is not read by rows")
    if not shape:
        raise NotRowAddressable(f"{rel}: a 0-d array has no rows")
    if fortran and len(shape) > 1:
        raise NotRowAddressable(f"{rel}: a Fortran-ordered array's rows are not contiguous")
    if any(d < 0 for d in shape):
        raise DatasetError(f"{rel}: the header's shape {shape} is negative")
    want = offset + int(np.prod(shape, dtype=object)) * dtype.itemsize
    if want != size:
        raise DatasetError(f"{rel}: the header says {shape} of {dtype} ({want} bytes with the header), "
                           f"the file holds {size}: refused")
    return tuple(int(d) for d in shape), dtype, offset


# -- what a job's ctx reads through ---------------------------------------------------------------
class StoreSource:
    """A store dataset as a job's ``dml.Context`` reads it (``ctx.path``, ``ctx.array``,
    ``ctx.files``), with the job's own :class:`Counters`. ``root`` is its ``ctx.data_dir``.
    Files fetched whole by :meth:`path` stay pinned (never evicted) until :meth:`close`, or
    until the source is garbage-collected."""

    local = False

    def __init__(self, ds: StoreDataset, counters: Counters | None = None) -> None:
        self.dataset = ds
        self.root = ds.root
        self.counters = counters if counters is not None else Counters()
        self._lock = threading.Lock()
        self._arrays: dict[str, Any] = {}  # rel -> RowArray, or the whole file's memory map
        self._train: list[str] = []  # arrays opened for the training split, in order
        self._whole: set[int] = set()  # files fetched whole (pinned)
        self._pinned: list[ChunkKey] = []
        self._fallback_logged: set[str] = set()
        self._finalizer = weakref.finalize(self, ds.cache.unpin, self._pinned)

    def _rel(self, rel: str) -> str:
        rel = rel.strip("/")
        parts = [p for p in rel.split("/") if p not in ("", ".")]
        if ".." in parts:
            raise DatasetError(f"path {rel!r} leaves the dataset")
        return "/".join(parts)

    def files(self, prefix: str = "") -> list[str]:
        """The dataset's file paths starting with ``prefix``, sorted."""
        return sorted(f.path for f in self.dataset.files if f.path.startswith(prefix))

    def _fetch_whole(self, i: int) -> None:
        ds = self.dataset
        with self._lock:
            if i in self._whole:
                return
            self._whole.add(i)
        ds.make_file(i)  # an empty file has no chunk to make it
        keys = ds.cache.pin((ds.digest, i, c) for c in ds.all_chunks(i))
        with self._lock:
            self._pinned.extend(keys)
        ds.ensure(i, ds.all_chunks(i), self.counters)

    def path(self, rel: str) -> pathlib.Path:
        """``root / rel`` once the file ``rel``, or every file under folder ``rel`` (all for
        ""), is present (fetched whole). A path the dataset lacks is returned as it is."""
        rel = self._rel(rel)
        ds = self.dataset
        if rel in ds.index:
            self._fetch_whole(ds.index[rel])
        else:
            under = rel + "/" if rel else ""
            for f in ds.files:
                if f.path.startswith(under):
                    self._fetch_whole(ds.index[f.path])
        return self.root.joinpath(*rel.split("/")) if rel else self.root

    def array(self, rel: str, train: bool = False) -> Any:
        """The ``.npy`` file ``rel`` as rows (:class:`RowArray`), or, when its rows cannot be
        read on their own, the whole file fetched and memory-mapped (logged once). ``train``:
        opened for the training split, so a plan's shards are prefetched in it."""
        rel = self._rel(rel)
        with self._lock:
            got = self._arrays.get(rel)
        if got is None:
            try:
                got = RowArray(self.dataset, rel, self.counters)
            except NotRowAddressable as e:
                if rel not in self._fallback_logged:
                    self._fallback_logged.add(rel)
                    log.info("dataset %s: %s: fetching the whole file", self.dataset.manifest.name, e)
                got = np.load(self.path(rel), mmap_mode="r")
            with self._lock:
                got = self._arrays.setdefault(rel, got)
        with self._lock:
            if train and rel not in self._train:
                self._train.append(rel)
        return got

    def train_arrays(self, rows: int) -> list[RowArray]:
        """The row arrays opened for the training split that have ``rows`` rows (those a
        plan's sample indices index)."""
        with self._lock:
            arrays = [self._arrays[r] for r in self._train]
        return [a for a in arrays if isinstance(a, RowArray) and len(a) == rows]

    def prefetch(self, indices: np.ndarray, rows: int, cancelled: threading.Event | None = None) -> None:
        """Fetches the rows ``indices`` of every training array of ``rows`` rows (the peer's
        shards of a plan); stops between chunks once ``cancelled`` is set."""
        idx = np.asarray(indices, dtype=np.int64)
        if idx.size and (int(idx.min()) < 0 or int(idx.max()) >= rows):
            raise IndexError(f"shard indices outside the {rows} training samples")
        for a in self.train_arrays(rows):
            if cancelled is not None and cancelled.is_set():
                return
            a.ensure_rows(idx, self.counters, cancelled)

    def holds(self, indices: Any, rows: int | None = None) -> bool:
        """Whether every row ``indices`` of the training arrays (of ``rows`` rows; None: all of
        them) is present: a shard this peer caches."""
        with self._lock:
            arrays = [self._arrays[r] for r in self._train]
        arrays = [a for a in arrays if isinstance(a, RowArray) and (rows is None or len(a) == rows)]
        return bool(arrays) and all(a.holds(indices) for a in arrays)

    def close(self) -> None:
        """Releases the pins of the files fetched whole."""
        self._finalizer()


def manifest_of(resp: data_pb2.GetDatasetResponse) -> Manifest:
    """A GetDatasetResponse as a :class:`Manifest` (unchecked: :meth:`Manifest.check`)."""
    return Manifest(resp.dataset.name, resp.dataset.digest,
                    tuple(FileEntry(f.path, f.size, tuple(f.chunks)) for f in resp.files))
