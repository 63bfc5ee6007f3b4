"""The peer's dataset cache (dml.peer.datacache): chunks checked on arrival and on every read
back (a tampered or truncated file is deleted and fetched again), least recently used chunks
evicted past the limit but never those of the dataset being assembled, one fetch per chunk for
concurrent callers, and datasets assembled once under their digest with every size checked."""
from __future__ import annotations

import pathlib
import threading

import pytest

from dml.common.datasets import CHUNK_BYTES, FileEntry, chunk_digest, manifest_digest
from dml.peer.datacache import ChunkCache, DatasetError, Manifest


class Store:
    """A stand-in for the coordinator's GetChunk: serves chunks by digest and counts calls."""

    def __init__(self, *blobs: bytes) -> None:
        self.chunks = {chunk_digest(b): b for b in blobs}
        self.calls: list[str] = []
        self.lock = threading.Lock()

    def __call__(self, digest: str) -> bytes:
        with self.lock:
            self.calls.append(digest)
        return self.chunks[digest]


def _manifest(name: str, files: dict[str, list[bytes]]) -> Manifest:
    entries = tuple(FileEntry(p, sum(map(len, parts)), tuple(chunk_digest(b) for b in parts))
                    for p, parts in sorted(files.items()))
    return Manifest(name, manifest_digest(list(entries)), entries)


def test_a_chunk_is_fetched_once_then_read_from_the_cache(tmp_path: pathlib.Path) -> None:
    store = Store(b"alpha")
    cache = ChunkCache(tmp_path)
    d = chunk_digest(b"alpha")
    assert cache.get(d, store) == b"alpha" and cache.get(d, store) == b"alpha"
    assert store.calls == [d]
    assert (cache.counters.chunks_fetched, cache.counters.bytes_fetched, cache.counters.hits) == (1, 5, 1)
    assert (tmp_path / "chunks" / d).read_bytes() == b"alpha"
    assert ChunkCache(tmp_path).get(d, store) == b"alpha" and store.calls == [d]  # a restart keeps it


@pytest.mark.parametrize("damage", ["tampered", "truncated", "emptied"])
def test_a_damaged_cache_file_is_detected_deleted_and_fetched_again(tmp_path: pathlib.Path, damage: str,
                                                                    caplog: pytest.LogCaptureFixture) -> None:
    store = Store(b"precious bytes")
    cache = ChunkCache(tmp_path)
    d = chunk_digest(b"precious bytes")
    cache.get(d, store)
    path = tmp_path / "chunks" / d
    path.write_bytes({"tampered": b"precious bytez", "truncated": b"precious", "emptied": b""}[damage])
    assert cache.get(d, store) == b"precious bytes"
    assert store.calls == [d, d] and cache.counters.damaged == 1 and cache.counters.hits == 0
    assert path.read_bytes() == b"precious bytes" and "damaged" in caplog.text


def test_chunks_from_the_network_that_lie_or_are_too_big_are_refused(tmp_path: pathlib.Path) -> None:
    cache = ChunkCache(tmp_path)
    d = chunk_digest(b"what was asked")
    with pytest.raises(DatasetError, match="hashes to"):
        cache.get(d, lambda _: b"something else")
    huge = b"\0" * (CHUNK_BYTES + 1)
    with pytest.raises(DatasetError, match="over the protocol's"):
        cache.get(chunk_digest(huge), lambda _: huge)
    with pytest.raises(DatasetError, match="malformed"):
        cache.get("../../etc/passwd", lambda _: b"x")
    assert list((tmp_path / "chunks").iterdir()) == [] and cache.stored_bytes == 0
    assert cache.counters.chunks_fetched == 0


def test_least_recently_used_chunks_go_first_past_the_limit(tmp_path: pathlib.Path) -> None:
    a, b, c = b"a" * 10, b"b" * 10, b"c" * 10
    store = Store(a, b, c)
    cache = ChunkCache(tmp_path, max_bytes=25)
    da, db, dc = map(chunk_digest, (a, b, c))
    cache.get(da, store)
    cache.get(db, store)
    cache.get(da, store)  # a is now the most recently used
    cache.get(dc, store)  # 30 bytes: b goes
    assert cache.held() == [da, dc] and cache.stored_bytes == 20 and cache.counters.evicted == 1
    assert sorted(p.name for p in (tmp_path / "chunks").iterdir()) == sorted([da, dc])
    assert ChunkCache(tmp_path, max_bytes=25).held() == [da, dc]  # the order survives a restart


def test_the_chunks_of_the_dataset_being_assembled_are_never_evicted(tmp_path: pathlib.Path) -> None:
    p0, p1, p2, old = (bytes([i]) * 100 for i in range(4))
    store = Store(p0, p1, p2, old)
    cache = ChunkCache(tmp_path, max_bytes=150)
    cache.get(chunk_digest(old), store)
    m = _manifest("big", {"x.bin": [p0, p1], "y.bin": [p0, p2]})  # y needs p0 again after p1 passed the limit
    folder = cache.materialise(m, store)
    assert (folder / "x.bin").read_bytes() == p0 + p1 and (folder / "y.bin").read_bytes() == p0 + p2
    # While it was assembled its chunks stayed (300 bytes, over the limit) and p0 was read back
    # from the cache; the old chunk went at once; afterwards the cache is back under its limit.
    assert store.calls == [chunk_digest(b) for b in (old, p0, p1, p2)] and cache.counters.hits == 1
    assert chunk_digest(old) not in cache.held() and cache.stored_bytes <= 150


def test_two_threads_asking_for_one_chunk_fetch_it_once(tmp_path: pathlib.Path) -> None:
    release = threading.Event()
    calls: list[str] = []

    def slow(digest: str) -> bytes:
        calls.append(digest)
        assert release.wait(10)
        return b"shared"

    cache = ChunkCache(tmp_path)
    d = chunk_digest(b"shared")
    got: list[bytes] = []
    threads = [threading.Thread(target=lambda: got.append(cache.get(d, slow))) for _ in range(2)]
    for t in threads:
        t.start()
    threads[0].join(0.2)  # lets the second reach the lock meanwhile (the outcome must not depend on it)
    release.set()
    for t in threads:
        t.join(10)
        assert not t.is_alive()
    assert got == [b"shared", b"shared"] and calls == [d]
    assert cache.counters.chunks_fetched == 1 and cache.counters.hits == 1


def test_a_dataset_is_assembled_once_under_its_digest_and_reused(tmp_path: pathlib.Path) -> None:
    x = b"\x93NUMPY" + b"1" * 50
    store = Store(x, b"a,b\n1,2\n", b"tail")
    m = _manifest("tab", {"arrays/x.npy": [x], "t.csv": [b"a,b\n1,2\n", b"tail"], "empty": []})
    cache = ChunkCache(tmp_path)
    folder = cache.materialise(m, store)
    assert folder == tmp_path / "datasets" / m.digest
    assert (folder / "arrays" / "x.npy").read_bytes() == x and (folder / "t.csv").read_bytes() == b"a,b\n1,2\ntail"
    assert (folder / "empty").read_bytes() == b""
    calls = len(store.calls)
    again = ChunkCache(tmp_path)  # a restarted peer
    assert again.materialise(m, store) == folder and len(store.calls) == calls
    assert again.counters.chunks_fetched == 0 and again.counters.hits == 0
    (folder / "t.csv").write_bytes(b"short")  # a damaged copy is assembled again, from the cache
    assert again.materialise(m, store) == folder and (folder / "t.csv").read_bytes() == b"a,b\n1,2\ntail"
    assert len(store.calls) == calls and again.counters.hits == 3
    assert sorted(p.name for p in (tmp_path / "datasets").iterdir()) == [m.digest]  # no temp folder left


def test_manifests_that_lie_are_refused_and_leave_nothing(tmp_path: pathlib.Path) -> None:
    store = Store(b"1234")
    cache = ChunkCache(tmp_path)
    good = _manifest("d", {"f": [b"1234"]})
    with pytest.raises(DatasetError, match="hashes to"):
        cache.materialise(Manifest("d", "0" * 64, good.files), store)
    escape = (FileEntry("../escape", 4, good.files[0].chunks),)
    with pytest.raises(DatasetError, match="not allowed"):
        cache.materialise(Manifest("d", manifest_digest(list(escape)), escape), store)
    wrong = (FileEntry("f", 3, good.files[0].chunks),)  # the chunk holds 4 bytes, the manifest says 3
    with pytest.raises(DatasetError, match="its manifest says 3"):
        cache.materialise(Manifest("d", manifest_digest(list(wrong)), wrong), store)
    assert list((tmp_path / "datasets").iterdir()) == []
    assert not (tmp_path.parent / "escape").exists()
