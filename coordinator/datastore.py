"""The coordinator's dataset store: content-addressed chunks and the manifests of committed
datasets, under ``STATE_DIR/data``.

- ``chunks/<sha256>``: one chunk's bytes (at most :data:`~dml.common.datasets.CHUNK_BYTES`),
  checked against its name on arrival and again before it is served, written atomically (a
  synced temp file renamed into place, the folder synced), so a crash leaves the whole chunk or
  none. A chunk no dataset names yet is kept: it is part of an upload under way, which a repeat
  of ``dml data put`` resumes (also after a restart).
- ``datasets/<name>.json``: a committed dataset's manifest (format 1: name, digest, created,
  files), written atomically once every chunk it names is here. Loaded at start; a damaged one
  is logged and left out.

``remove`` deletes the manifest, then every chunk of it that no other manifest names. Limits:
``max_dataset_bytes`` (one dataset's files) and ``max_store_bytes`` (every chunk on disk,
committed or not), both :class:`OverLimit` (RESOURCE_EXHAUSTED). One lock guards the manifests
and the byte count; chunk writes happen under it too (one 4 MiB write each), so a removal never
races a commit over a chunk they share.
"""
from __future__ import annotations

import json
import logging
import os
import pathlib
import threading
import time
from dataclasses import dataclass

from dml.common import datasets
from dml.common.datasets import FileEntry
from dml.common.files import write_atomic

log = logging.getLogger(__name__)

FORMAT = 1
DEFAULT_MAX_DATASET_BYTES = 1 << 40  # 1 TiB
DEFAULT_MAX_STORE_BYTES = 2 << 40


class OverLimit(Exception):
    """Over one of the store's size limits (RESOURCE_EXHAUSTED)."""


class BadData(ValueError):
    """A chunk, digest, name or manifest that the store refuses (INVALID_ARGUMENT)."""


class Missing(KeyError):
    """An unknown dataset or a chunk the store does not hold (NOT_FOUND)."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else "not found"


class Conflict(Exception):
    """A dataset name already committed with other content, or chunks a commit lacks
    (FAILED_PRECONDITION)."""


@dataclass(frozen=True)
class Dataset:
    """A committed dataset."""

    name: str
    digest: str
    created_ms: int
    files: tuple[FileEntry, ...]

    @property
    def bytes(self) -> int:
        """Its files' bytes in all."""
        return sum(f.size for f in self.files)

    @property
    def chunks(self) -> set[str]:
        """The digests of the chunks it names."""
        return {d for f in self.files for d in f.chunks}

    def to_json(self) -> bytes:
        """Its manifest file."""
        return json.dumps({"format": FORMAT, "name": self.name, "digest": self.digest,
                           "created_unix_ms": self.created_ms,
                           "files": [f.to_dict() for f in sorted(self.files, key=lambda f: f.path)]},
                          separators=(",", ":")).encode()

    @staticmethod
    def from_json(data: bytes) -> Dataset:
        """A manifest file read back; ValueError when it is damaged (a digest that does not
        match its files, a bad name or file)."""
        d = json.loads(data)
        if d.get("format") != FORMAT:
            raise ValueError(f"manifest format {d.get('format')!r}, this coordinator reads {FORMAT}")
        files = tuple(FileEntry(str(f["path"]), int(f["size"]), tuple(str(c) for c in f["chunks"])) for f in d["files"])
        name = str(d["name"])
        if err := datasets.name_error(name) or datasets.manifest_error(list(files)):
            raise ValueError(err)
        digest = datasets.manifest_digest(list(files))
        if digest != d["digest"]:
            raise ValueError(f"manifest digest {str(d['digest'])[:16]} does not match its files ({digest[:16]})")
        return Dataset(name, digest, int(d["created_unix_ms"]), files)


class DataStore:
    """Datasets under ``folder`` (``STATE_DIR/data``)."""

    def __init__(self, folder: pathlib.Path, max_dataset_bytes: int = DEFAULT_MAX_DATASET_BYTES,
                 max_store_bytes: int = DEFAULT_MAX_STORE_BYTES) -> None:
        if max_dataset_bytes < 1 or max_store_bytes < 1:
            raise ValueError("the dataset store's limits must be at least 1 byte")
        self.folder = folder
        self.chunk_dir = folder / "chunks"
        self.manifest_dir = folder / "datasets"
        self.max_dataset_bytes = max_dataset_bytes
        self.max_store_bytes = max_store_bytes
        self._lock = threading.Lock()
        self.chunk_dir.mkdir(parents=True, exist_ok=True)
        self.manifest_dir.mkdir(parents=True, exist_ok=True)
        self._datasets: dict[str, Dataset] = {}
        self._sizes: dict[str, int] = {}  # chunk digest -> its bytes on disk
        self._total = 0  # their sum
        for p in self.chunk_dir.iterdir():
            if not datasets.digest_error(p.name) and p.is_file():
                self._sizes[p.name] = p.stat().st_size
                self._total += self._sizes[p.name]
            elif p.name.startswith(".") and p.name.endswith(".tmp"):
                p.unlink(missing_ok=True)  # a write a crash interrupted
        for p in sorted(self.manifest_dir.glob("*.json")):
            try:
                ds = Dataset.from_json(p.read_bytes())
                if p.name != f"{ds.name}.json":
                    raise ValueError(f"it names dataset {ds.name!r}")
            except (OSError, ValueError, KeyError, TypeError) as e:
                log.error("dataset manifest %s is damaged, left out: %s", p, e)
                continue
            self._datasets[ds.name] = ds
        if self._datasets or self._sizes:
            log.info("dataset store: %d datasets, %d chunks (%d bytes) in %s", len(self._datasets), len(self._sizes),
                     sum(self._sizes.values()), folder)

    # -- chunks ------------------------------------------------------------------------------
    def _chunk_path(self, digest: str) -> pathlib.Path:
        if err := datasets.digest_error(digest):
            raise BadData(err)
        return self.chunk_dir / digest

    @property
    def stored_bytes(self) -> int:
        """Bytes of every chunk on disk, committed or not."""
        with self._lock:
            return self._total

    def missing(self, digests: list[str], dataset_bytes: int = 0) -> list[str]:
        """Those of ``digests`` the store does not hold, in order, each once (BadData for a
        malformed one, or too many at once; OverLimit when ``dataset_bytes``, the size of the
        dataset to come, is over ``max_dataset_bytes``)."""
        self._check_size("the dataset to upload", dataset_bytes)
        if len(digests) > datasets.MAX_DIGESTS_PER_CALL:
            raise BadData(f"ask about at most {datasets.MAX_DIGESTS_PER_CALL} chunks at once, not {len(digests)}")
        for d in digests:
            self._chunk_path(d)
        with self._lock:
            return [d for d in dict.fromkeys(digests) if d not in self._sizes]

    def put_chunk(self, digest: str, data: bytes) -> bool:
        """Keeps a chunk; False when it was held already (nothing written). BadData for a
        malformed digest, an empty or oversized chunk, or bytes whose sha256 is not ``digest``;
        OverLimit past ``max_store_bytes``; OSError when it cannot be written."""
        path = self._chunk_path(digest)
        if not 1 <= len(data) <= datasets.CHUNK_BYTES:
            raise BadData(f"a chunk holds 1 to {datasets.CHUNK_BYTES} bytes, this one {len(data)}")
        got = datasets.chunk_digest(data)
        if got != digest:
            raise BadData(f"chunk bytes have sha256 {got}, not {digest}: damaged in transit?")
        with self._lock:
            if digest in self._sizes:
                return False
            if self._total + len(data) > self.max_store_bytes:
                raise OverLimit(f"the dataset store holds {self._total} bytes; this chunk would pass its limit of "
                                f"{self.max_store_bytes} (dml-coordinator --max-data-bytes)")
            write_atomic(path, data, sync_folder=True)
            self._sizes[digest] = len(data)
            self._total += len(data)
        return True

    def get_chunk(self, digest: str) -> bytes:
        """A chunk's bytes, checked against its digest (Missing when it is not held, or damaged:
        logged, never served; BadData for a malformed digest)."""
        path = self._chunk_path(digest)
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            raise Missing(f"no chunk {digest} in the dataset store") from None
        if datasets.chunk_digest(data) != digest:
            log.error("chunk %s in %s does not match its digest; not serving it", digest[:12], path)
            raise Missing(f"chunk {digest} is damaged on the coordinator")
        return data

    # -- datasets ----------------------------------------------------------------------------
    def commit(self, name: str, files: list[FileEntry], now_ms: int | None = None) -> tuple[Dataset, bool]:
        """Records dataset ``name`` made of ``files``; returns it and whether it is new (False:
        the same content was committed under this name already, nothing written). BadData for
        a bad name or manifest, or a file whose chunks' bytes are not its size; Conflict for
        chunks not held (the message counts them) or a name taken by other content; OverLimit
        past ``max_dataset_bytes``; OSError when the manifest cannot be written."""
        if err := datasets.name_error(name) or datasets.manifest_error(files):
            raise BadData(err)
        total = sum(f.size for f in files)
        self._check_size(f"dataset {name}", total)
        digest = datasets.manifest_digest(files)
        with self._lock:
            old = self._datasets.get(name)
            if old is not None:
                if old.digest == digest:
                    return old, False
                raise Conflict(f"dataset {name} exists with other content (digest {old.digest[:16]}); "
                               f"remove it first (dml data rm {name})")
            lacking = {d for f in files for d in f.chunks if d not in self._sizes}
            if lacking:
                raise Conflict(f"dataset {name} names {len(lacking)} chunks the store does not hold "
                               f"(upload them first: PutChunk)")
            for f in files:
                have = sum(self._sizes[d] for d in f.chunks)
                if have != f.size:
                    raise BadData(f"{f.path}: its chunks hold {have} bytes, the manifest says {f.size}")
            ds = Dataset(name, digest, int(time.time() * 1000) if now_ms is None else now_ms,
                         tuple(sorted(files, key=lambda f: f.path)))
            write_atomic(self.manifest_dir / f"{name}.json", ds.to_json(), sync_folder=True)
            self._datasets[name] = ds
        log.info("dataset %s committed: %d files, %d bytes, digest %s", name, len(files), total, digest[:12])
        return ds, True

    def _check_size(self, what: str, size: int) -> None:
        if size > self.max_dataset_bytes:
            raise OverLimit(f"{what} is {size} bytes, over this coordinator's limit of "
                            f"{self.max_dataset_bytes} (dml-coordinator --max-dataset-bytes)")

    def get(self, name: str) -> Dataset:
        """The committed dataset ``name`` (Missing when there is none; BadData for a bad name)."""
        if err := datasets.name_error(name):
            raise BadData(err)
        with self._lock:
            ds = self._datasets.get(name)
        if ds is None:
            raise Missing(f"no dataset {name} on this coordinator (dml data ls)")
        return ds

    def has(self, name: str) -> bool:
        """Whether a dataset ``name`` is committed."""
        with self._lock:
            return name in self._datasets

    def list(self) -> list[Dataset]:
        """Every committed dataset, by name."""
        with self._lock:
            return sorted(self._datasets.values(), key=lambda d: d.name)

    def remove(self, name: str) -> tuple[Dataset, int]:
        """Removes dataset ``name``: its manifest, then each of its chunks no other dataset names.
        Returns it and the chunks deleted. Missing when there is none; OSError when the manifest
        cannot be deleted (nothing is removed then)."""
        ds = self.get(name)
        with self._lock:
            (self.manifest_dir / f"{name}.json").unlink(missing_ok=True)
            del self._datasets[name]
            _sync(self.manifest_dir)
            kept = {d for other in self._datasets.values() for d in other.chunks}
            gone = 0
            for d in ds.chunks - kept:
                try:
                    (self.chunk_dir / d).unlink(missing_ok=True)
                except OSError as e:  # the manifest is gone: a leftover chunk only costs space
                    log.warning("cannot delete chunk %s of dataset %s: %s", d[:12], name, e)
                    continue
                self._total -= self._sizes.pop(d, 0)
                gone += 1
            _sync(self.chunk_dir)
        log.info("dataset %s removed (%d chunks deleted)", name, gone)
        return ds, gone


def _sync(folder: pathlib.Path) -> None:
    """Makes the deletions in ``folder`` durable."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
