"""Task code bundles (dml.common.taskcode) and the coordinator's code store: deterministic packing,
the client's early checks, the bounds every side enforces, and safe extraction."""
from __future__ import annotations

import io
import os
import pathlib
import stat
import zipfile

import pytest

from dml.common import taskcode
from dml.common.spec import InvalidSpec, JobSpec, task_kind, validate
from dml.common.taskcode import BundleError, BundleTooLarge, CodeRef
from dml.coordinator.codestore import CodeStore, OverLimit

TASK_SRC = "import dml\n\ntask = None  # a dml.Task on a peer\n"


def _write(root: pathlib.Path, files: dict[str, str]) -> None:
    for name, text in files.items():
        p = root / name
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(text)


# -- packing ---------------------------------------------------------------------------------
def test_same_code_gives_the_same_bytes_whatever_the_files_dates_and_modes(tmp_path: pathlib.Path) -> None:
    a, b = tmp_path / "a" / "mypkg", tmp_path / "b" / "mypkg"
    files = {"__init__.py": "from .core import task\n", "core.py": TASK_SRC, "sub/util.py": "X = 1\n"}
    _write(a, files)
    _write(b, dict(reversed(list(files.items()))))  # made in another order
    os.utime(b / "core.py", (1_000_000, 1_000_000))
    os.chmod(b / "core.py", 0o755)
    (b / "__pycache__").mkdir()
    (b / "__pycache__" / "core.cpython-311.pyc").write_bytes(b"junk")
    (b / ".hidden").write_text("secret")
    one, two = taskcode.pack_path(f"{a}/"), taskcode.pack_path(str(b))
    assert one.data == two.data and one.digest == two.digest == taskcode.digest_of(one.data)
    assert one.ref == CodeRef("mypkg", True) and str(one.ref) == "mypkg/"
    names = [i.filename for i in zipfile.ZipFile(io.BytesIO(one.data)).infolist()]
    assert names == ["mypkg/__init__.py", "mypkg/core.py", "mypkg/sub/util.py"]  # sorted, no cache, no dotfiles
    for info in zipfile.ZipFile(io.BytesIO(one.data)).infolist():
        assert info.date_time == (1980, 1, 1, 0, 0, 0) and info.external_attr >> 16 == stat.S_IFREG | 0o644
    (b / "core.py").write_text(TASK_SRC + "# changed\n")
    assert taskcode.pack_path(str(b)).digest != one.digest


def test_a_file_is_packed_alone_under_its_name_and_a_name_picks_the_task(tmp_path: pathlib.Path) -> None:
    _write(tmp_path, {"mytask.py": "other = 1\n", "neighbour.py": "x = 1\n"})
    b = taskcode.pack_path(f"{tmp_path}/mytask.py:other")
    assert str(b.ref) == "mytask.py:other" and b.ref == CodeRef("mytask", False, "other")
    assert zipfile.ZipFile(io.BytesIO(b.data)).namelist() == ["mytask.py"]
    assert taskcode.parse_ref(str(b.ref)) == b.ref
    validate(JobSpec(task=str(b.ref), task_digest=b.digest))
    assert task_kind(str(b.ref), b.digest) == "code" and task_kind("pkg.mod:task") == "module"


@pytest.mark.parametrize("files,arg,message", [
    ({}, "missing.py", "missing.py: no such file or directory"),
    ({"bad.py": "task = (\n  1,\n"}, "bad.py", "line"),
    ({"bad.py": "def f(:\n    pass\n"}, "bad.py", "bad.py, line 1: SyntaxError"),
    ({"notask.py": "model = 1\n"}, "notask.py", "defines no 'task'"),
    ({"t.py": "task = 1\n"}, "t.py:other", "defines no 'other'"),
    ({"pkg/core.py": TASK_SRC}, "pkg/", "is not a Python package"),
    ({"pkg/__init__.py": TASK_SRC, "pkg/broken.py": "x = = 1\n"}, "pkg", "broken.py, line 1"),
    ({"json.py": TASK_SRC}, "json.py", "rename the task"),
    ({"my-task.py": TASK_SRC}, "my-task.py", "not a Python module name"),
    ({"data.csv": "1,2\n"}, "data.csv", "ends in .py"),
])
def test_bad_task_code_is_refused_at_packing_with_what_to_fix(tmp_path: pathlib.Path, files: dict[str, str],
                                                                arg: str, message: str) -> None:
    _write(tmp_path, files)
    with pytest.raises(BundleError, match=message.replace("(", r"\(")):
        taskcode.pack_path(str(tmp_path / arg) + ("/" if arg.endswith("/") else ""))


def test_a_task_bound_by_an_import_or_a_star_import_passes_the_early_check(tmp_path: pathlib.Path) -> None:
    _write(tmp_path, {"a/__init__.py": "from .m import task\n", "a/m.py": TASK_SRC,
                      "b/__init__.py": "from .m import *\n", "b/m.py": TASK_SRC,
                      "c.py": "def task():\n    pass\n"})
    for arg in ("a", "b"):
        taskcode.pack_path(f"{tmp_path / arg}/")
    taskcode.pack_path(str(tmp_path / "c.py"))


def test_limits_on_size_and_file_count(tmp_path: pathlib.Path) -> None:
    big = tmp_path / "big"
    _write(big, {"__init__.py": TASK_SRC})
    (big / "weights.bin").write_bytes(os.urandom(taskcode.MAX_BUNDLE_BYTES + 1))  # random: does not compress
    with pytest.raises(BundleTooLarge, match="MiB compressed, over the 4.0 MiB limit"):
        taskcode.pack_path(f"{big}/")
    many = tmp_path / "many"
    _write(many, {"__init__.py": TASK_SRC, **{f"m{i}.py": "" for i in range(taskcode.MAX_FILES)}})
    with pytest.raises(BundleTooLarge, match="more than 256 files"):
        taskcode.pack_path(f"{many}/")


def test_is_path_tells_files_from_module_references() -> None:
    assert taskcode.is_path("mytask.py") and taskcode.is_path("x/mytask.py:other") and taskcode.is_path("./pkg")
    assert taskcode.is_path("pkg/") and taskcode.is_path("pkg/:model")
    for ref in ("digits", "synthetic:10M", "mypkg.tasks:task", "mod:task"):
        assert not taskcode.is_path(ref)


def test_a_code_spec_must_carry_a_digest_and_a_reference_peers_can_import() -> None:
    d = "ab" * 32
    with pytest.raises(InvalidSpec, match="no task code came with the job"):
        validate(JobSpec(task="mytask.py"))
    with pytest.raises(InvalidSpec, match="names no task code"):
        validate(JobSpec(task="mytask", task_digest=d))
    with pytest.raises(InvalidSpec, match="built-in task"):
        validate(JobSpec(task="digits", task_digest=d))
    with pytest.raises(InvalidSpec, match="rename the task"):
        validate(JobSpec(task="os.py", task_digest=d))


# -- checking and extracting hostile bundles -------------------------------------------------
def _zip(entries: list[tuple[str, bytes]], **kw: object) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        for name, data in entries:
            info = zipfile.ZipInfo(name)
            info.external_attr = kw.get("mode", (stat.S_IFREG | 0o644) << 16)  # type: ignore[assignment]
            z.writestr(info, data)
    return buf.getvalue()


REF = CodeRef("mytask", False)


@pytest.mark.parametrize("entries,message", [
    ([("/etc/passwd", b"x")], "absolute"),
    ([("../escape.py", b"x")], "unsafe part"),
    ([("mytask.py", b"x"), ("a/../../b.py", b"x")], "unsafe part"),
    ([("a\\b.py", b"x")], "backslash"),
    ([("mytask.py", b"x"), ("MyTask.py", b"y")], "twice"),
    ([("other.py", b"x")], "holds no mytask.py"),
    ([("mytask.py", b"x"), ("extra.py", b"x")], "other top-level files: extra.py"),
    ([("/".join(["d"] * 12) + "/f.py", b"")], "nested too deep"),
])
def test_hostile_bundles_are_refused(entries: list[tuple[str, bytes]], message: str) -> None:
    with pytest.raises(BundleError, match=message):
        taskcode.check(_zip(entries), ref=REF)


def test_a_symlink_entry_and_a_non_zip_are_refused(tmp_path: pathlib.Path) -> None:
    with pytest.raises(BundleError, match="not a regular file"):
        taskcode.check(_zip([("mytask.py", b"/etc/passwd")], mode=(stat.S_IFLNK | 0o777) << 16), ref=REF)
    with pytest.raises(BundleError, match="not a zip bundle"):
        taskcode.check(b"PK\x03\x04 this is no zip")
    with pytest.raises(BundleTooLarge, match="over the limit of 10 bytes"):
        taskcode.check(_zip([("mytask.py", b"x")]), max_bytes=10)


def test_a_bomb_is_refused_by_its_declared_sizes_before_anything_is_unpacked(tmp_path: pathlib.Path) -> None:
    data = taskcode.pack_files({"mytask.py": b"task = 1\n"})
    bomb = io.BytesIO()
    with zipfile.ZipFile(bomb, "w", zipfile.ZIP_DEFLATED) as z:
        for i in range(5):
            z.writestr(f"mytask{i}.py" if i else "mytask.py", b"\0" * (taskcode.MAX_UNPACKED_BYTES // 4))
    assert len(bomb.getvalue()) < taskcode.MAX_BUNDLE_BYTES  # small on the wire
    with pytest.raises(BundleTooLarge, match="uncompressed"):
        taskcode.extract(bomb.getvalue(), tmp_path / "out", REF)
    assert not (tmp_path / "out").exists()
    taskcode.extract(data, tmp_path / "ok", REF)
    assert (tmp_path / "ok" / "mytask.py").read_bytes() == b"task = 1\n"


def test_a_member_longer_than_its_header_says_is_refused(tmp_path: pathlib.Path) -> None:
    data = bytearray(_zip([("mytask.py", b"task = 1\n" * 10)]))
    z = zipfile.ZipFile(io.BytesIO(bytes(data)))
    info = z.getinfo("mytask.py")
    # Lie in the central directory: claim 5 bytes for a 90-byte stored member.
    cd = data.rfind(b"PK\x01\x02")
    data[cd + 24:cd + 28] = (5).to_bytes(4, "little")
    assert info.file_size == 90
    with pytest.raises(BundleError):
        taskcode.extract(bytes(data), tmp_path / "out", REF)


# -- the coordinator's store -----------------------------------------------------------------
def test_the_store_keeps_a_bundle_once_by_digest_and_refuses_wrong_ones(tmp_path: pathlib.Path) -> None:
    data = taskcode.pack_files({"mytask.py": TASK_SRC.encode()})
    d = taskcode.digest_of(data)
    store = CodeStore(tmp_path / "code", max_bytes=len(data))
    store.check(data, d, "mytask.py")
    assert store.put(data, d) is True
    assert (tmp_path / "code" / d).read_bytes() == data
    mtime = (tmp_path / "code" / d).stat().st_mtime_ns
    assert store.put(data, d) is False and (tmp_path / "code" / d).stat().st_mtime_ns == mtime
    assert [p.name for p in (tmp_path / "code").iterdir()] == [d]  # no temp file left
    assert store.get(d) == data and CodeStore(tmp_path / "code").get(d) == data  # a restarted coordinator
    with pytest.raises(InvalidSpec, match="sha256 is"):
        store.check(data, "0" * 64, "mytask.py")
    with pytest.raises(InvalidSpec, match="holds no other.py"):
        store.check(data, d, "other.py")
    with pytest.raises(OverLimit, match="--max-task-code-bytes"):
        CodeStore(tmp_path / "code", max_bytes=len(data) - 1).check(data, d, "mytask.py")
    (tmp_path / "code" / d).write_bytes(data[:-1] + b"x")  # damaged on disk: never served
    with pytest.raises(KeyError):
        store.get(d)
    assert store.put(data, d) is True and store.get(d) == data  # a submit of the same code repairs it
    with pytest.raises(KeyError):
        store.get("1" * 64)


def test_a_link_inside_the_package_is_packed_as_a_file_and_one_leading_out_is_refused(tmp_path: pathlib.Path) -> None:
    pkg = tmp_path / "pkg"
    _write(pkg, {"__init__.py": TASK_SRC, "real.py": "X = 1\n"})
    (pkg / "alias.py").symlink_to(pkg / "real.py")
    names = zipfile.ZipFile(io.BytesIO(taskcode.pack_path(f"{pkg}/").data)).namelist()
    assert names == ["pkg/__init__.py", "pkg/alias.py", "pkg/real.py"]
    (tmp_path / "secret.txt").write_text("token")
    (pkg / "leak.txt").symlink_to(tmp_path / "secret.txt")
    with pytest.raises(BundleError, match="leak.txt links outside it"):
        taskcode.pack_path(f"{pkg}/")
