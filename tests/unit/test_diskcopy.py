"""``--committed-copy disk`` (peer.diskcopy): the committed parameters in an unlinked file, read
and written with positional I/O, never mapped; the parameter store keeping its committed
snapshot there (promotion rewrites the one file, a failed write drops the snapshot rather than
keep a half-written one); a trainer restoring from it; the guard's norm over it; and the flags
that choose it, refusing a directory on tmpfs."""
from __future__ import annotations

import os
import pathlib

import numpy as np
import pytest

from dml.aggregation.averaging import digest
from dml.aggregation.guard import update_norm
from dml.peer import cli as peer_cli
from dml.peer import diskcopy
from dml.peer.diskcopy import DiskCopy
from dml.peer.params import ParamStore, Snapshot, Start
from tests.unit.test_params import FakeTrainer, finish_round, served


def values(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal(n).astype(np.float32)


def test_a_copy_reads_back_the_bytes_written_whole_and_by_slices(tmp_path) -> None:
    src = values(3 * (diskcopy.PIECE_BYTES // 4) + 17)  # more than one pwrite/preadv piece
    c = DiskCopy.of(tmp_path, src)
    assert (c.shape, c.size, c.dtype, c.nbytes, len(c)) == (src.shape, src.size, np.float32, src.nbytes, src.size)
    assert np.asarray(c).tobytes() == src.tobytes()
    assert c[5:1_000_003].tobytes() == src[5:1_000_003].tobytes()
    assert c[src.size - 3 :].tobytes() == src[-3:].tobytes() and c[7:7].size == 0
    out = np.empty(10, np.float32)
    assert c.read_into(out, 100) is out and out.tobytes() == src[100:110].tobytes()
    src2 = values(src.size, 1)
    c.write(src2)
    assert np.asarray(c).tobytes() == src2.tobytes()
    assert list(tmp_path.iterdir()) == [], "the file has no name: it goes with the process"


def test_a_copy_refuses_what_it_cannot_hold_or_serve(tmp_path) -> None:
    c = DiskCopy.of(tmp_path, values(100))
    with pytest.raises(ValueError, match="cannot hold 99"):
        c.write(values(99))
    with pytest.raises(ValueError, match="outside"):
        c.read_into(np.empty(10, np.float32), 95)
    with pytest.raises(ValueError, match="contiguous float32"):
        c.read_into(np.empty(10, np.float64))
    with pytest.raises(TypeError, match="contiguous slices"):
        c[::2]
    with pytest.raises(TypeError, match="slices"):
        c[3]
    c.close()
    with pytest.raises(ValueError, match="closed"):
        c[0:1]
    c.close()  # twice is fine


def _resident_mb() -> float:
    for line in pathlib.Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


@pytest.mark.skipif(not pathlib.Path("/proc/self/status").exists(), reason="needs Linux /proc")
def test_writing_and_reading_the_copy_by_pieces_keeps_it_out_of_the_processes_memory(tmp_path) -> None:
    """The point of the file: 64 MB written, read back piece by piece and normed, and the
    process's resident memory does not grow by anything near the copy (a mapping would)."""
    src = values(16 << 20)
    before = _resident_mb()
    c = DiskCopy.of(tmp_path, src)
    norm = update_norm(src, c)  # the guard's pass over the whole copy, one piece at a time
    grew = _resident_mb() - before
    assert norm == 0.0
    assert grew < 16, f"resident memory grew {grew:.1f} MB for a 64 MB copy on disk"


def test_the_guards_norm_over_a_copy_on_disk_equals_the_one_in_memory(tmp_path) -> None:
    base, params = values(300_001, 1), values(300_001, 2)
    assert update_norm(params, DiskCopy.of(tmp_path, base)) == update_norm(params, base)
    params[12345] = np.nan
    assert np.isnan(update_norm(params, DiskCopy.of(tmp_path, base)))


def started_on_disk(tmp_path: pathlib.Path) -> tuple[ParamStore, FakeTrainer, Snapshot]:
    store, trainer = ParamStore(tmp_path), FakeTrainer(n=1000, value=1.0)
    init = trainer.params()
    store.start("j", trainer, Snapshot("j", 0, init, digest(init)))  # type: ignore[arg-type]
    return store, trainer, store.committed


def test_the_store_keeps_its_committed_snapshot_in_one_file_it_rewrites(tmp_path) -> None:
    store, trainer, init = started_on_disk(tmp_path)
    assert isinstance(init.params, DiskCopy)
    assert served(store.serve("j", 0)) == (0, init.digest, np.full(1000, 1.0, np.float32).tobytes())
    dig = finish_round(trainer, store, 1, 2.0)
    assert store.begin(1, dig) == Start(ready=True, in_place=True, dropped=False, promoted=True)
    got = store.committed
    assert got is not None and got.round == 1 and got.digest == dig and not got.live
    assert got.params is init.params, "promotion rewrote the one file: no new file per round"
    trainer.flat[:] = 3.0  # the next round trains; the committed copy stays
    assert np.array_equal(np.asarray(got.params), np.full(1000, 2.0, np.float32)) and digest(np.asarray(got.params)) == dig
    assert served(store.serve("j", 0)) == (1, dig, np.full(1000, 2.0, np.float32).tobytes())
    # A downloaded round (a joiner catching up) goes to the file too.
    down = np.full(1000, 7.0, np.float32)
    assert store.adopt("j", 5, down, digest(down))
    assert store.committed.params is init.params and np.array_equal(np.asarray(store.committed.params), down)


def test_a_failed_write_drops_the_committed_snapshot_rather_than_keep_it_half_written(tmp_path, monkeypatch) -> None:
    store, trainer, init = started_on_disk(tmp_path)
    dig = finish_round(trainer, store, 1, 2.0)

    def broken(self, src) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(DiskCopy, "write", broken)
    with pytest.raises(OSError, match="No space"):
        store.begin(1, dig)
    assert store.committed is None, "nothing a digest no longer matches is served or restored from"
    # The round's own result (the live buffer) is still whole, and still served as round 1.
    assert served(store.serve("j", 1)) == (1, dig, np.full(1000, 2.0, np.float32).tobytes())
    assert store.serve("j", 0).round == 1


def test_a_restore_from_disk_checks_the_digest_and_drops_a_copy_that_read_back_wrong(tmp_path) -> None:
    store, trainer, init = started_on_disk(tmp_path)
    trainer.flat[:] = 5.0  # a round that will not commit
    assert store.restore_into(trainer) and np.array_equal(trainer.flat, np.full(1000, 1.0, np.float32))
    # What a lost writeback reads back as: the file's blocks as they were (zeros here), no error.
    os.pwrite(init.params._fdno(), bytes(400), 0)
    trainer.flat[:] = 5.0
    assert not store.restore_into(trainer), "parameters that are not the committed ones were trained from"
    assert store.committed is None and store.serve("j", 0) is None, "the bad copy is never served or restored"
    with pytest.raises(ValueError, match="no committed snapshot"):
        store.restore_into(trainer)


def test_a_copy_that_cannot_be_written_at_start_leaves_no_trainer_and_no_old_round(tmp_path, monkeypatch) -> None:
    store, trainer, _ = started_on_disk(tmp_path)
    finish_round(trainer, store, 1, 2.0)  # the old job's tentative round

    def broken(*a, **k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(DiskCopy, "of", broken)
    other = FakeTrainer(n=500, value=3.0)
    with pytest.raises(OSError, match="No space"):
        store.start("k", other, Snapshot("k", 0, other.params(), digest(other.params())))  # type: ignore[arg-type]
    assert store.trainer_for("j") is None and store.trainer_for("k") is None and store.committed is None
    assert store.begin(1, "") == Start(ready=False, in_place=False, dropped=False, promoted=False), \
        "the old job's tentative round is promoted into nothing"


def test_a_trainer_restores_its_parameters_from_a_copy_on_disk(tmp_path) -> None:
    from dml.common.tasks import get_task
    from dml.peer.trainer import Trainer

    trainer = Trainer(get_task("digits"), seed=3, lr=0.1)
    committed = DiskCopy.of(tmp_path, trainer.params())
    trainer.flat[: trainer.numel] += 1.0  # a round that will not commit
    trainer.set_params(committed)
    assert trainer.params().tobytes() == np.asarray(committed).tobytes()
    with pytest.raises(ValueError, match="count mismatch"):
        trainer.set_params(DiskCopy.of(tmp_path, values(3)))


def test_the_flags_choose_the_directory_and_refuse_memory_file_systems(tmp_path, monkeypatch, capsys) -> None:
    base = ["--coordinator", "127.0.0.1:1", "--device", "cpu"]
    assert peer_cli.build_config(base)[0].committed_copy_dir is None
    monkeypatch.setenv("DML_COMMITTED_COPY", "disk")  # the environment chooses as the flags do
    monkeypatch.setenv("DML_COMMITTED_COPY_DIR", str(tmp_path))
    assert peer_cli.build_config(base)[0].committed_copy_dir == tmp_path.resolve()
    monkeypatch.setenv("DML_COMMITTED_COPY", "dsk")
    with pytest.raises(SystemExit) as e:
        peer_cli.build_config(base)
    assert e.value.code == 2 and "choose memory or disk, got 'dsk'" in capsys.readouterr().err
    monkeypatch.delenv("DML_COMMITTED_COPY")
    monkeypatch.delenv("DML_COMMITTED_COPY_DIR")
    cfg, _ = peer_cli.build_config([*base, "--committed-copy", "disk", "--committed-copy-dir", str(tmp_path)])
    assert cfg.committed_copy_dir == tmp_path.resolve()
    monkeypatch.setattr(diskcopy, "fs_type", lambda p: "tmpfs")
    for argv, why in (([*base, "--committed-copy", "disk", "--committed-copy-dir", str(tmp_path)], "is on tmpfs"),
                      ([*base, "--committed-copy", "disk", "--committed-copy-dir", str(tmp_path / "no")], "not a directory"),
                      ([*base, "--committed-copy-dir", str(tmp_path)], "is for --committed-copy disk")):
        with pytest.raises(SystemExit) as e:
            peer_cli.build_config(argv)
        assert e.value.code == 2 and why in capsys.readouterr().err


def test_tools_put_copies_beside_their_files_unless_those_are_on_tmpfs(tmp_path, monkeypatch) -> None:
    assert diskcopy.usable_dir(tmp_path) == tmp_path
    monkeypatch.setattr(diskcopy, "fs_type", lambda p: "tmpfs" if p == tmp_path else "ext4")
    assert diskcopy.usable_dir(tmp_path) == diskcopy.default_dir()
    assert diskcopy.usable_dir(tmp_path / "missing") == diskcopy.default_dir()


@pytest.mark.skipif(not pathlib.Path("/proc/self/mounts").exists(), reason="needs Linux /proc")
def test_fs_type_names_the_mount_holding_a_path(tmp_path) -> None:
    assert diskcopy.fs_type(pathlib.Path("/proc/self")) == "proc"
    assert diskcopy.fs_type(tmp_path) != ""
    if os.path.isdir("/dev/shm") and diskcopy.fs_type(pathlib.Path("/dev/shm")) == "tmpfs":
        assert "is on tmpfs" in diskcopy.check_dir(pathlib.Path("/dev/shm"))
