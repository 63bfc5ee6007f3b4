"""The coordinator's dataset store (coordinator/datastore.py) and the manifest rules both sides
share (common/datasets.py): digests checked on arrival and before serving, atomic files,
idempotent commits, refcounted removal, limits, hostile names, paths, digests and sizes."""
from __future__ import annotations

import json
import pathlib

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dml.common import datasets
from dml.common.datasets import CHUNK_BYTES, FileEntry, chunk_digest
from dml.common.spec import InvalidSpec, JobSpec, validate
from dml.coordinator.datastore import BadData, Conflict, DataStore, Dataset, Missing, OverLimit


def _put(store: DataStore, *blobs: bytes) -> list[str]:
    out = []
    for b in blobs:
        d = chunk_digest(b)
        store.put_chunk(d, b)
        out.append(d)
    return out


def test_chunks_are_checked_kept_once_and_served_checked(tmp_path: pathlib.Path) -> None:
    s = DataStore(tmp_path)
    d = chunk_digest(b"hello")
    assert s.missing([d, d]) == [d]
    assert s.put_chunk(d, b"hello") is True
    assert s.put_chunk(d, b"hello") is False  # idempotent: nothing written again
    assert s.missing([d]) == [] and s.get_chunk(d) == b"hello"
    assert sorted(p.name for p in (tmp_path / "chunks").iterdir()) == [d]  # no temp file left
    with pytest.raises(BadData, match="sha256"):
        s.put_chunk(chunk_digest(b"other"), b"hello")
    (tmp_path / "chunks" / d).write_bytes(b"jello")  # damaged on disk: never served
    with pytest.raises(Missing, match="damaged"):
        s.get_chunk(d)
    with pytest.raises(Missing):
        s.get_chunk(chunk_digest(b"never"))


def test_a_chunk_write_that_fails_leaves_nothing_and_can_be_sent_again(tmp_path: pathlib.Path,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    import dml.common.files

    s = DataStore(tmp_path)
    d = chunk_digest(b"payload")

    def broken(*_: object) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(dml.common.files.os, "replace", broken)
    with pytest.raises(OSError):
        s.put_chunk(d, b"payload")
    assert list((tmp_path / "chunks").iterdir()) == [] and s.missing([d]) == [d] and s.stored_bytes == 0
    monkeypatch.undo()
    assert s.put_chunk(d, b"payload") and s.stored_bytes == 7


@pytest.mark.parametrize("digest", ["", "../../etc/passwd", "A" * 64, "0" * 63, "0" * 65, "0" * 63 + "\n", "/" + "0" * 63, "g" * 64])
def test_malformed_digests_are_refused_before_the_disk_is_touched(tmp_path: pathlib.Path, digest: str) -> None:
    s = DataStore(tmp_path)
    for call in (lambda: s.put_chunk(digest, b"x"), lambda: s.get_chunk(digest), lambda: s.missing([digest])):
        with pytest.raises(BadData, match="malformed"):
            call()
    assert list((tmp_path / "chunks").iterdir()) == []


def test_empty_and_oversized_chunks_and_too_many_questions_are_refused(tmp_path: pathlib.Path) -> None:
    s = DataStore(tmp_path)
    big = b"\0" * (CHUNK_BYTES + 1)
    with pytest.raises(BadData, match="1 to"):
        s.put_chunk(chunk_digest(big), big)
    with pytest.raises(BadData, match="1 to"):
        s.put_chunk(chunk_digest(b""), b"")
    with pytest.raises(BadData, match="at most"):
        s.missing([chunk_digest(b"x")] * (datasets.MAX_DIGESTS_PER_CALL + 1))


def test_a_commit_needs_every_chunk_and_the_sizes_they_hold(tmp_path: pathlib.Path) -> None:
    s = DataStore(tmp_path)
    a, b = _put(s, b"aaaa", b"bb")
    lacking = chunk_digest(b"not uploaded")
    with pytest.raises(Conflict, match="1 chunks"):
        s.commit("ds", [FileEntry("x.bin", 16, (a, lacking))])
    with pytest.raises(BadData, match="hold 6 bytes"):
        s.commit("ds", [FileEntry("x.bin", 7, (a, b))])
    ds, new = s.commit("ds", [FileEntry("x.bin", 6, (a, b)), FileEntry("empty", 0, ())], now_ms=5)
    assert new and ds.bytes == 6 and ds.digest == datasets.manifest_digest(list(ds.files))
    # The same manifest again (files in another order): nothing changes; other content: refused.
    again, new = s.commit("ds", [FileEntry("empty", 0, ()), FileEntry("x.bin", 6, (a, b))])
    assert not new and again == ds
    with pytest.raises(Conflict, match="other content"):
        s.commit("ds", [FileEntry("x.bin", 4, (a,))])
    assert [d.name for d in s.list()] == ["ds"] and s.has("ds") and s.get("ds") == ds


def test_datasets_and_chunks_survive_a_restart_and_a_damaged_manifest_is_left_out(tmp_path: pathlib.Path) -> None:
    s = DataStore(tmp_path)
    a, b = _put(s, b"one", b"two")
    ds, _ = s.commit("kept", [FileEntry("f", 3, (a,))], now_ms=7)
    s.commit("broken", [FileEntry("g", 3, (b,))])
    (tmp_path / "chunks" / ".leftover.1234.tmp").write_bytes(b"half a write")
    m = tmp_path / "datasets" / "broken.json"
    d = json.loads(m.read_bytes())
    d["files"][0]["size"] = 4  # the digest no longer matches its files
    m.write_text(json.dumps(d))
    s2 = DataStore(tmp_path)
    assert s2.list() == [ds]
    assert s2.missing([a, b]) == []  # both chunks are still held (b can be committed again)
    assert s2.stored_bytes == 6
    assert not (tmp_path / "chunks" / ".leftover.1234.tmp").exists()


def test_remove_deletes_only_the_chunks_no_other_dataset_names(tmp_path: pathlib.Path) -> None:
    s = DataStore(tmp_path)
    shared, own, other = _put(s, b"shared", b"own", b"other")
    s.commit("a", [FileEntry("f", 9, (shared, own))])
    s.commit("b", [FileEntry("f", 11, (shared, other))])
    ds, gone = s.remove("a")
    assert ds.name == "a" and gone == 1
    assert s.missing([shared, own, other]) == [own]
    assert not (tmp_path / "datasets" / "a.json").exists()
    assert DataStore(tmp_path).list() == s.list()  # the removal is on disk
    _, gone = s.remove("b")
    assert gone == 2 and list((tmp_path / "chunks").iterdir()) == [] and s.stored_bytes == 0
    with pytest.raises(Missing, match="no dataset a"):
        s.remove("a")


def test_limits_refuse_with_over_limit(tmp_path: pathlib.Path) -> None:
    s = DataStore(tmp_path, max_dataset_bytes=5, max_store_bytes=8)
    a, b = _put(s, b"abcd", b"efgh")
    with pytest.raises(OverLimit, match="--max-data-bytes"):
        s.put_chunk(chunk_digest(b"i"), b"i")
    with pytest.raises(OverLimit, match="--max-dataset-bytes"):
        s.commit("big", [FileEntry("f", 8, (a, b))])
    assert s.commit("small", [FileEntry("f", 4, (a,))])[1]
    with pytest.raises(ValueError):
        DataStore(tmp_path, max_dataset_bytes=0)


@pytest.mark.parametrize("name", ["", "..", ".hidden", "a/b", "../x", "a\\b", "-rf", "x" * 65, "name\n", "ü"])
def test_hostile_dataset_names_are_refused(tmp_path: pathlib.Path, name: str) -> None:
    s = DataStore(tmp_path)
    (a,) = _put(s, b"x")
    with pytest.raises(BadData, match="dataset name"):
        s.commit(name, [FileEntry("f", 1, (a,))])
    with pytest.raises(BadData, match="dataset name"):
        s.get(name)
    if name:  # "" in a job spec means no dataset
        with pytest.raises(InvalidSpec, match="dataset name"):
            validate(JobSpec(dataset=name))
    assert list((tmp_path / "datasets").iterdir()) == []


@pytest.mark.parametrize("path", ["/etc/passwd", "../up", "a/../../b", "a//b", "./a", "a/", "c:\\x", "a\x00b", "x" * 256])
def test_hostile_file_paths_are_refused(path: str) -> None:
    d = chunk_digest(b"x")
    assert datasets.manifest_error([FileEntry(path, 1, (d,))])


def test_manifests_that_do_not_add_up_are_refused() -> None:
    d = chunk_digest(b"x")
    for files in ([], [FileEntry("a", 1, (d,)), FileEntry("a", 1, (d,))],  # no file; one path twice
                  [FileEntry("a", 1, (d,)), FileEntry("a/b", 1, (d,))],  # a file and a folder
                  [FileEntry("a", CHUNK_BYTES + 1, (d,))], [FileEntry("a", 1, ())], [FileEntry("a", 0, (d,))],
                  [FileEntry("a", -1, ())], [FileEntry("a", 1, ("NOTHEX",))]):
        assert datasets.manifest_error(files), files
    assert not datasets.manifest_error([FileEntry("dir/a.npy", 1, (d,)), FileEntry("dir/b", 0, ())])


file_entries = st.lists(st.builds(FileEntry, st.from_regex(r"[a-z]{1,8}(/[a-z]{1,8})?", fullmatch=True),
                                  st.integers(0, 10), st.just(())), max_size=6, unique_by=lambda f: f.path)


@settings(max_examples=50, deadline=None)
@given(file_entries, st.randoms())
def test_the_digest_is_of_the_content_not_the_order_the_files_came_in(files: list[FileEntry], rnd) -> None:
    shuffled = list(files)
    rnd.shuffle(shuffled)
    assert datasets.manifest_digest(shuffled) == datasets.manifest_digest(files)
    if files:
        changed = [FileEntry(files[0].path, files[0].size + 1, files[0].chunks)] + files[1:]
        assert datasets.manifest_digest(changed) != datasets.manifest_digest(files)


def test_a_manifest_file_round_trips_and_a_forged_one_is_refused() -> None:
    d = chunk_digest(b"x")
    files = (FileEntry("a", 1, (d,)),)
    ds = Dataset("n", datasets.manifest_digest(list(files)), 3, files)
    assert Dataset.from_json(ds.to_json()) == ds
    bad = json.loads(ds.to_json())
    bad["name"] = "../n"
    with pytest.raises(ValueError):
        Dataset.from_json(json.dumps(bad).encode())


def test_the_coordinator_flags_set_the_limits(monkeypatch: pytest.MonkeyPatch) -> None:
    from dml.coordinator import cli as coord_cli

    cfg = coord_cli.build_config(["--max-dataset-bytes", str(3 << 40), "--max-data-bytes", "1000"])
    assert (cfg.max_dataset_bytes, cfg.max_data_bytes) == (3 << 40, 1000)
    monkeypatch.setenv("DML_MAX_DATASET_BYTES", "77")
    assert coord_cli.build_config([]).max_dataset_bytes == 77
    with pytest.raises(SystemExit):
        coord_cli.build_config(["--max-data-bytes", "0"])
