"""The peer's dataset cache (dml.peer.datacache): a store dataset kept as sparse files, only the
chunks holding the rows read fetched (``ctx.array``), whole files for ``ctx.path``; every chunk
checked on arrival and every present one hashed again when a dataset is opened (a tampered or
truncated one is forgotten and fetched again); what is present survives a restart; least
recently used chunks evicted past the limit, never one being read or held whole by a job; one
fetch per chunk for concurrent callers; manifests, chunks and ``.npy`` headers that lie refused.
Chunks are 256 bytes here (``chunk_bytes``) so a few kilobytes span many of them."""
from __future__ import annotations

import io
import json
import logging
import pathlib
import threading

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dml.common.datasets import CHUNK_BYTES, FileEntry, chunk_digest, manifest_digest
from dml.common.task import Context
from dml.peer.datacache import ChunkCache, Counters, DatasetError, Manifest, RowArray, StoreSource
from dml.peer.prefetch import Prefetcher

CB = 256


class Store:
    """A stand-in for the coordinator's GetChunk: serves chunks by digest and counts calls."""

    def __init__(self, chunks: dict[str, bytes] | None = None) -> None:
        self.chunks = dict(chunks or {})
        self.calls: list[str] = []
        self.lock = threading.Lock()

    def __call__(self, digest: str) -> bytes:
        with self.lock:
            self.calls.append(digest)
        return self.chunks[digest]


def npy(a: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, a)
    return buf.getvalue()


def dataset(files: dict[str, bytes], store: Store, name: str = "d") -> Manifest:
    """The manifest of ``files`` cut in CB-byte chunks, their chunks put into ``store``."""
    entries = []
    for path, data in sorted(files.items()):
        parts = [data[i : i + CB] for i in range(0, len(data), CB)]
        store.chunks.update({chunk_digest(p): p for p in parts})
        entries.append(FileEntry(path, len(data), tuple(chunk_digest(p) for p in parts)))
    return Manifest(name, manifest_digest(entries), tuple(entries))


X = np.arange(400 * 4, dtype=np.float32).reshape(400, 4)  # 16-byte rows: 16 rows a chunk
Y = (np.arange(400) % 3).astype(np.int64)


def source(tmp_path: pathlib.Path, store: Store, files: dict[str, bytes] | None = None, max_bytes: int = 0,
           cache: ChunkCache | None = None) -> StoreSource:
    m = dataset(files or {"x.npy": npy(X), "y.npy": npy(Y), "notes/a.txt": b"a" * 600, "notes/b.txt": b"b"}, store)
    cache = cache or ChunkCache(tmp_path / "cache", max_bytes=max_bytes, chunk_bytes=CB)
    counters = Counters()  # the job's, as peer.taskload passes them
    return StoreSource(cache.open(m, store, counters), counters)


def test_only_the_chunks_of_the_rows_read_are_fetched(tmp_path: pathlib.Path) -> None:
    store = Store()
    src = source(tmp_path, store)
    ctx = Context(data_dir=src.root, source=src)
    assert store.calls == []  # opening the dataset fetches nothing
    x = ctx.array("x.npy")
    assert isinstance(x, RowArray) and len(store.calls) == 1  # the header's chunk, at open
    assert (len(x), x.shape, x.dtype, x.ndim) == (400, (400, 4), np.float32, 2) and len(store.calls) == 1
    header = x.offset
    assert np.array_equal(x[np.array([3, 7])], X[[3, 7]]) and len(store.calls) == 1  # rows 3 and 7 share chunk 0
    assert np.array_equal(x[200], X[200]) and np.array_equal(x[-1], X[-1])
    want = {(header + r * 16) // CB for r in (3, 7, 200, 399)} | {0}
    assert len(store.calls) == len(want) == src.counters.chunks_fetched
    assert src.counters.bytes_fetched == sum(len(store.chunks[d]) for d in set(store.calls))
    assert src.counters.hits >= 1 and src.counters.damaged == 0
    file_chunks = len(src.dataset.files[src.dataset.index["x.npy"]].chunks)
    assert len(store.calls) < file_chunks / 5  # a small share of the file's 26 chunks
    assert src.root.joinpath("x.npy").stat().st_size == len(npy(X))  # full size, sparse
    assert np.array_equal(x[10:40], X[10:40]) and np.array_equal(x[5:50:7, 2], X[5:50:7, 2])
    assert np.array_equal(x[X[:, 0] > 1500], X[X[:, 0] > 1500])
    assert np.array_equal(np.asarray(x), X) and len(store.calls) == file_chunks  # all of it now, each once
    assert np.array_equal(x[:0], X[:0])


def test_out_of_range_rows_are_an_index_error_and_fetch_nothing(tmp_path: pathlib.Path) -> None:
    store = Store()
    src = source(tmp_path, store)
    x = src.array("x.npy")
    n = len(store.calls)
    for bad in (400, -401, [0, 400], np.array([5, -500])):
        with pytest.raises(IndexError, match="out of range"):
            x[bad]
    with pytest.raises(IndexError):
        x[np.array([0.5])]
    assert len(store.calls) == n


@settings(max_examples=25, deadline=None)
@given(rows=st.lists(st.integers(-400, 399), min_size=1, max_size=40))
def test_ctx_array_gives_the_same_rows_on_local_and_store_data(tmp_path_factory: pytest.TempPathFactory,
                                                               rows: list[int]) -> None:
    tmp = tmp_path_factory.mktemp("same")
    (tmp / "local").mkdir()
    np.save(tmp / "local" / "x.npy", X)
    local = Context(data_dir=tmp / "local").array("x.npy")
    assert isinstance(local, np.memmap)  # exactly np.load(mmap_mode="r")
    store = Store()
    src = source(tmp, store)
    stored = Context(data_dir=src.root, source=src).array("x.npy")
    idx = np.array(rows)
    assert np.array_equal(stored[idx], local[idx]) and stored[idx].dtype == local[idx].dtype
    assert np.array_equal(stored[rows[0]], local[rows[0]])
    assert stored.shape == local.shape and len(stored) == len(local)


def test_ctx_path_fetches_whole_files_and_folders_and_files_lists_them(tmp_path: pathlib.Path) -> None:
    store = Store()
    src = source(tmp_path, store)
    ctx = Context(data_dir=src.root, source=src)
    assert ctx.files() == ["notes/a.txt", "notes/b.txt", "x.npy", "y.npy"] and ctx.files("notes/") == ctx.files()[:2]
    assert store.calls == [] and list(src.root.iterdir()) == []  # no file before a read needs it: never one of zeros
    assert ctx.path("notes", "b.txt").read_bytes() == b"b" and len(store.calls) == 1
    folder = ctx.path("notes")
    assert (folder / "a.txt").read_bytes() == b"a" * 600 and len(store.calls) == 1 + 3
    assert ctx.path("absent.csv") == src.root / "absent.csv" and len(store.calls) == 4
    for escape in ("../x.npy", "notes/../../etc/passwd"):
        with pytest.raises(DatasetError, match="leaves the dataset"):
            ctx.path(escape)
    assert np.array_equal(np.load(ctx.path("y.npy")), Y)
    ctx.path()  # the whole dataset
    assert len(store.calls) == sum(len(f.chunks) for f in src.dataset.files)  # each chunk once
    # Local data: a path, a walk that lists only what the prefix can match.
    local = tmp_path / "local"
    (local / "imgs" / "cat").mkdir(parents=True)
    (local / "imgs" / "cat" / "1.png").write_bytes(b"1")
    (local / "imgs" / "dog.png").write_bytes(b"2")
    (local / "other.txt").write_bytes(b"3")
    lctx = Context(data_dir=local)
    assert lctx.files() == ["imgs/cat/1.png", "imgs/dog.png", "other.txt"]
    assert lctx.files("imgs/") == ["imgs/cat/1.png", "imgs/dog.png"] and lctx.files("imgs/d") == ["imgs/dog.png"]
    assert lctx.path("imgs", "dog.png") == local / "imgs" / "dog.png"


def test_two_threads_asking_for_one_chunk_fetch_it_once(tmp_path: pathlib.Path) -> None:
    release = threading.Event()
    store = Store()
    src = source(tmp_path, store)
    x = src.array("x.npy")  # the header's chunk (chunk 0) present

    def slow(digest: str) -> bytes:
        store.calls.append(digest)
        assert release.wait(10)
        return store.chunks[digest]

    src.dataset.fetch = slow
    got: list[np.ndarray] = []
    threads = [threading.Thread(target=lambda: got.append(x[300])) for _ in range(2)]
    for t in threads:
        t.start()
    threads[0].join(0.2)  # lets the second reach the lock meanwhile (the outcome must not depend on it)
    release.set()
    for t in threads:
        t.join(10)
        assert not t.is_alive()
    assert len(got) == 2 and all(np.array_equal(g, X[300]) for g in got)
    assert len(store.calls) == 2 and src.counters.chunks_fetched == 2  # the header's chunk, then row 300's once


def test_a_restarted_peer_finds_what_it_has(tmp_path: pathlib.Path) -> None:
    store = Store()
    src = source(tmp_path, store)
    rows = np.arange(0, 400, 50)
    assert np.array_equal(src.array("x.npy")[rows], X[rows])
    src.path("notes/a.txt")
    fetched = len(store.calls)
    src.dataset.cache.close()  # the peer stops
    again = source(tmp_path, store)  # a new cache on the same folder: the record says what is there
    assert again.counters.damaged == 0
    assert np.array_equal(again.array("x.npy", train=True)[rows], X[rows]) and again.path("notes/a.txt").read_bytes() == b"a" * 600
    assert len(store.calls) == fetched and again.counters.chunks_fetched == 0 and again.counters.hits > 0
    assert again.holds(rows) and not again.holds([1, 399])  # rows 0 and 350 present, 399's chunk never fetched


@pytest.mark.parametrize("damage", ["tampered", "truncated"])
def test_a_damaged_present_chunk_is_found_at_open_and_fetched_again(tmp_path: pathlib.Path, damage: str,
                                                                   caplog: pytest.LogCaptureFixture) -> None:
    store = Store()
    src = source(tmp_path, store)
    x = src.array("x.npy")
    assert np.array_equal(x[100], X[100])
    path = src.root / "x.npy"
    off = (x.offset + 100 * 16) // CB * CB
    if damage == "tampered":
        with open(path, "r+b") as f:
            f.seek(off)
            f.write(b"tampered")
    else:
        with open(path, "r+b") as f:
            f.truncate(off + 10)
    calls = len(store.calls)
    src.dataset.cache.close()
    with caplog.at_level(logging.WARNING):
        again = source(tmp_path, store)
    assert again.counters.damaged == 1 and "damaged" in caplog.text
    assert np.array_equal(again.array("x.npy")[100], X[100])
    assert len(store.calls) == calls + 1 and again.counters.chunks_fetched == 1
    assert path.stat().st_size == len(npy(X))


def test_chunks_that_lie_are_refused_and_never_written(tmp_path: pathlib.Path) -> None:
    store = Store()
    src = source(tmp_path, store)
    x = src.array("x.npy")
    d = src.dataset.files[src.dataset.index["x.npy"]].chunks[10]
    store.chunks[d] = b"something else"
    with pytest.raises(DatasetError, match="hashes to"):
        x[(10 * CB - x.offset) // 16 + 1]
    assert not src.dataset.holds(src.dataset.index["x.npy"], [10])
    d11 = src.dataset.files[src.dataset.index["x.npy"]].chunks[11]
    store.chunks[d11] = b"\0" * (CHUNK_BYTES + 1)  # over what any chunk may hold: refused before it is hashed
    with pytest.raises(DatasetError, match="over the protocol's"):
        x[(11 * CB - x.offset) // 16 + 1]
    # A chunk that hashes right but does not fit its place: a manifest not cut as dml data put cuts.
    short = b"short chunk"
    lie = Manifest("d", manifest_digest([FileEntry("f", 2 * CB, (chunk_digest(short), chunk_digest(short)))]),
                   (FileEntry("f", 2 * CB, (chunk_digest(short), chunk_digest(short))),))
    ds = ChunkCache(tmp_path / "c2", chunk_bytes=CB).open(lie, Store({chunk_digest(short): short}))
    with pytest.raises(DatasetError, match="its place in the file"):
        StoreSource(ds).path("f")


def test_manifests_that_lie_are_refused_and_leave_nothing(tmp_path: pathlib.Path) -> None:
    store = Store()
    good = dataset({"f": b"1234"}, store)
    cache = ChunkCache(tmp_path, chunk_bytes=CB)
    with pytest.raises(DatasetError, match="hashes to"):
        cache.open(Manifest("d", "0" * 64, good.files), store)
    escape = (FileEntry("../escape", 4, good.files[0].chunks),)
    with pytest.raises(DatasetError, match="not allowed"):
        cache.open(Manifest("d", manifest_digest(list(escape)), escape), store)
    uneven = (FileEntry("f", 3 * CB, good.files[0].chunks * 2),)  # two chunks cannot hold 3 CB
    with pytest.raises(DatasetError, match="not cut in chunks"):
        cache.open(Manifest("d", manifest_digest(list(uneven)), uneven), store)
    loose = (FileEntry("f", 8, good.files[0].chunks * 2),)  # 8 bytes in two chunks: not cut at CB
    with pytest.raises(DatasetError, match="not cut in chunks"):
        cache.open(Manifest("d", manifest_digest(list(loose)), loose), store)
    assert not any(p.is_file() for p in tmp_path.rglob("*")) and store.calls == []
    assert not (tmp_path.parent / "escape").exists()


def test_a_header_that_lies_about_its_size_is_refused(tmp_path: pathlib.Path) -> None:
    store = Store()
    raw = npy(X)
    liar = raw.replace(b"(400, 4)", b"(900, 4)")  # the same length of header, claiming more rows
    src = source(tmp_path, store, {"x.npy": liar, "junk.npy": b"not a numpy file at all"})
    with pytest.raises(DatasetError, match="the file holds"):
        src.array("x.npy")
    with pytest.raises(DatasetError, match="not a .npy file"):
        src.array("junk.npy")
    with pytest.raises(FileNotFoundError):
        src.array("absent.npy")


def test_fortran_order_and_objects_are_fetched_whole(tmp_path: pathlib.Path, caplog: pytest.LogCaptureFixture) -> None:
    store = Store()
    fortran = np.asfortranarray(X)
    src = source(tmp_path, store, {"f.npy": npy(fortran), "x.npy": npy(X)})
    with caplog.at_level(logging.INFO):
        got = src.array("f.npy")
    assert isinstance(got, np.memmap) and np.array_equal(got, X) and "Fortran" in caplog.text
    file_chunks = len(src.dataset.files[src.dataset.index["f.npy"]].chunks)
    assert src.counters.chunks_fetched == file_chunks
    assert src.array("f.npy") is got  # opened once


def test_least_recently_used_chunks_are_punched_out_never_those_being_read(tmp_path: pathlib.Path) -> None:
    store = Store()
    src = source(tmp_path, store, max_bytes=4 * CB)
    x = src.array("x.npy")
    for r in range(0, 400, 16):  # every chunk in turn: at most 4 stay
        assert np.array_equal(x[r], X[r])
        assert src.dataset.cache.stored_bytes <= 4 * CB
    assert src.dataset.cache.counters.evicted > 0
    assert np.array_equal(x[np.arange(400)], X)  # a read of more than the limit: all pinned while it reads
    assert src.dataset.cache.stored_bytes <= 4 * CB
    path = src.root / "x.npy"
    assert path.stat().st_blocks * 512 <= 8 * 4096  # the holes are punched back (a few pages at most)
    # A file fetched whole by ctx.path is held while its job reads it.
    src.path("notes/a.txt")
    for r in range(0, 400, 16):
        x[r]
    assert src.dataset.holds(src.dataset.index["notes/a.txt"], range(3))
    src.close()
    x[0], x[399]
    assert not src.dataset.holds(src.dataset.index["notes/a.txt"], range(3))


def test_prefetch_fetches_the_plan_rows_of_the_training_arrays(tmp_path: pathlib.Path) -> None:
    store = Store()
    src = source(tmp_path, store)
    ctx = Context(data_dir=src.root, source=src, split="train")
    x, y = ctx.array("x.npy"), ctx.array("y.npy")
    shard = np.arange(100, 164)  # four of x's chunks (16 rows each), one or two of y's
    assert not src.holds(shard)
    pre = Prefetcher()
    try:
        pre.submit("j1", src, shard, 400)
        assert pre.wait_done(1, 30) and pre.failed == ""
        assert src.holds(shard) and x.holds(shard) and y.holds(shard) and not src.holds([0, 399])
        calls = len(store.calls)
        assert np.array_equal(x[shard], X[shard]) and np.array_equal(y[shard], Y[shard]) and len(store.calls) == calls
        pre.submit("j1", src, shard, 400)  # the same shards again: nothing to do
        assert pre.done == 1
        with pytest.raises(IndexError):
            src.prefetch(np.array([400]), 400)
        pre.cancel("j1")
        assert pre.join(10) and pre.job_id == ""
    finally:
        pre.cancel()
        pre.join(10)


def test_a_cache_folder_in_use_by_another_cache_is_not_shared(tmp_path: pathlib.Path) -> None:
    """Two live caches on one folder (peers started in one working directory): the second keeps
    its datasets in peer-1/, so neither punches holes in files the other counts as present."""
    store = Store()
    first = source(tmp_path, store, max_bytes=4 * CB)
    second = source(tmp_path, store, max_bytes=4 * CB)
    assert first.root.parent.parent == tmp_path / "cache" and second.root.parent.parent == tmp_path / "cache" / "peer-1"
    x1, x2 = first.array("x.npy"), second.array("x.npy")
    for r in range(0, 400, 16):  # each evicts its own chunks only
        assert np.array_equal(x1[r], X[r]) and np.array_equal(x2[r], X[r])
    second.dataset.cache.close()
    first.dataset.cache.close()
    assert source(tmp_path, store).root.parent.parent == tmp_path / "cache"  # free again


@pytest.mark.parametrize("damage", ["garbage", "manifest", "bits"])
def test_a_damaged_record_forgets_its_dataset_and_fetches_it_again(tmp_path: pathlib.Path, damage: str,
                                                                  caplog: pytest.LogCaptureFixture) -> None:
    store = Store()
    src = source(tmp_path, store)
    assert np.array_equal(src.array("x.npy")[5], X[5])
    cache = src.dataset.cache
    digest = src.dataset.digest
    record, manifest = cache.record_path(digest), cache.manifest_path(digest)
    cache.close()
    if damage == "garbage":
        record.write_bytes(b"{not json")
    elif damage == "manifest":  # no longer hashes to the digest it is named by
        manifest.write_bytes(manifest.read_bytes().replace(b'"x.npy"', b'"z.npy"'))
    else:  # a bit set past the file's last chunk
        body = json.loads(record.read_bytes())
        body["present"][0] = "ff" * (len(bytes.fromhex(body["present"][0])) + 1)
        record.write_text(json.dumps(body))
    calls = len(store.calls)
    with caplog.at_level(logging.WARNING):
        again = source(tmp_path, store)
    assert "unreadable" in caplog.text and again.dataset.present_count() == 0
    assert np.array_equal(again.array("x.npy")[5], X[5]) and len(store.calls) == calls + 1

