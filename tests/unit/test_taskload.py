"""The peer's "which Task does this job run" (dml.peer.taskload): declining job code without
--allow-job-code, fetching, verifying and caching bundles, importing them under their own module
name (a second bundle of the same name gets its own module), the data dir, and TaskErrors that
show the user's frames."""
from __future__ import annotations

import pathlib
import sys
import textwrap
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np
import pytest
import torch

from dml.common import taskcode
from dml.common.task import Task
from dml.peer.runner import PeerConfig
from dml.peer.taskload import CodeCache, Declined, load_task, make_trainer
from dml.peer.trainer import TaskError
from dml.v1 import types_pb2

TASK = textwrap.dedent("""\
    import numpy as np
    import torch

    import dml

    VERSION = {version}


    def data(ctx):
        x = np.load(ctx.path("x.npy"))
        return dml.ArrayDataset(torch.from_numpy(x), torch.from_numpy((x[:, 0] > 0).astype(np.int64)))


    task = dml.Task(model=lambda: torch.nn.Linear(3, 2), train=data, batch_size=4, name="v{version}")
    """)


@dataclass
class FakeClient:
    """The coordinator's side of FetchTaskCode: bundles by digest, and who asked."""

    bundles: dict[str, bytes] = field(default_factory=dict)
    fetched: list[tuple[str, str, str]] = field(default_factory=list)

    def fetch_task_code(self, peer_id: str, job_id: str, digest: str) -> bytes:
        self.fetched.append((peer_id, job_id, digest))
        return self.bundles[digest]


@dataclass
class FakePeer:
    config: PeerConfig
    code_cache: CodeCache
    client: FakeClient = field(default_factory=FakeClient)
    peer_id: str = "p1"


def _peer(tmp_path: pathlib.Path, allow: bool = True) -> FakePeer:
    data = tmp_path / "data"
    data.mkdir(exist_ok=True)
    np.save(data / "x.npy", np.random.default_rng(0).normal(size=(10, 3)).astype(np.float32))
    return FakePeer(PeerConfig(coordinator="127.0.0.1:1", allow_job_code=allow, data_dir=data),
                    CodeCache(tmp_path / "cache"))


def _spec(peer: FakePeer, files: dict[str, str], task: str | None = None) -> types_pb2.JobSpec:
    """Packs ``files`` (bundle name -> source) as the coordinator would serve it."""
    data = taskcode.pack_files({k: v.encode() for k, v in files.items()})
    d = taskcode.digest_of(data)
    peer.client.bundles[d] = data
    entry = task or (next(iter(files)) if len(files) == 1 else next(iter(files)).split("/")[0] + "/")
    return types_pb2.JobSpec(task=entry, task_digest=d, seed=1)


@pytest.fixture(autouse=True)
def _forget_bundles() -> Iterator[None]:
    """Each test starts without the task modules earlier tests imported."""
    from dml.peer import taskload

    yield
    for name in list(taskload._IMPORTED):
        taskload._drop(name)
    taskload._IMPORTED.clear()


def test_a_peer_without_allow_job_code_declines_and_says_how_to_allow_it(tmp_path: pathlib.Path) -> None:
    peer = _peer(tmp_path, allow=False)
    spec = _spec(peer, {"mytask.py": TASK.format(version=1)})
    with pytest.raises(Declined, match="start it with --allow-job-code"):
        load_task(peer, "j1", spec)  # type: ignore[arg-type]
    assert peer.client.fetched == []  # not even fetched
    assert load_task(peer, "j1", types_pb2.JobSpec(task="digits")).name == "digits"  # its own tasks still run


def test_a_bundle_is_fetched_once_imported_under_its_name_and_reads_the_peers_data_dir(tmp_path: pathlib.Path) -> None:
    peer = _peer(tmp_path)
    spec = _spec(peer, {"mytask.py": TASK.format(version=1)})
    task = load_task(peer, "j1", spec)  # type: ignore[arg-type]
    assert isinstance(task, Task) and task.name == "v1"
    assert sys.modules["mytask"].task is task and sys.modules["mytask"].__file__.startswith(str(tmp_path / "cache"))
    assert peer.client.fetched == [("p1", "j1", spec.task_digest)]
    assert load_task(peer, "j2", spec) is task  # type: ignore[arg-type]
    assert len(peer.client.fetched) == 1
    trainer = make_trainer(peer, "j1", spec)  # type: ignore[arg-type]
    assert trainer.train_data.size == 10  # read from --data-dir, not the working directory
    # A restarted peer with the same cache folder does not fetch it again; a damaged copy is refetched.
    again = FakePeer(peer.config, CodeCache(tmp_path / "cache"), peer.client)
    (tmp_path / "cache" / f"{spec.task_digest}.zip").write_bytes(b"damaged")
    load_task(again, "j1", spec)  # type: ignore[arg-type]
    assert len(peer.client.fetched) == 2


def test_two_bundles_with_one_module_name_get_modules_of_their_own(tmp_path: pathlib.Path) -> None:
    peer = _peer(tmp_path)
    one = load_task(peer, "j1", _spec(peer, {"mytask.py": TASK.format(version=1)}))  # type: ignore[arg-type]
    first = sys.modules["mytask"]
    two = load_task(peer, "j2", _spec(peer, {"mytask.py": TASK.format(version=2)}))  # type: ignore[arg-type]
    assert (one.name, two.name) == ("v1", "v2")
    assert sys.modules["mytask"] is not first and sys.modules["mytask"].VERSION == 2 and first.VERSION == 1
    assert isinstance(one.model(), torch.nn.Linear)  # the first job's task still works


def test_a_package_bundle_imports_its_submodules_and_a_named_task(tmp_path: pathlib.Path) -> None:
    peer = _peer(tmp_path)
    files = {"mypkg/__init__.py": "from .tasks import small\n",
             "mypkg/tasks.py": "import dml\nfrom . import models\nsmall = dml.Task(model=models.net, train=lambda ctx: [], name='small')\n",
             "mypkg/models.py": "import torch\n\ndef net():\n    return torch.nn.Linear(2, 2)\n"}
    task = load_task(peer, "j1", _spec(peer, files, task="mypkg/:small"))  # type: ignore[arg-type]
    assert task.name == "small" and "mypkg.models" in sys.modules
    other = {"mypkg/__init__.py": "import dml\nsmall = dml.Task(model=lambda: None, train=lambda ctx: [], name='other')\n"}
    assert load_task(peer, "j2", _spec(peer, other, task="mypkg/:small")).name == "other"  # type: ignore[arg-type]
    assert "mypkg.models" not in sys.modules  # the first bundle's submodules went with it


@pytest.mark.parametrize("files,task,message", [
    ({"mytask.py": "import dml\n\ntask = 3\n"}, None, "mytask.py has no dml.Task named 'task' \\(found a int\\)"),
    ({"mytask.py": "x = 1\n"}, "mytask.py:other", "has no dml.Task named 'other'"),
    ({"pytest.py": "task = 1\n"}, None, "has the name of a module this peer already has"),
])
def test_a_bundle_without_a_usable_task_is_a_task_error(tmp_path: pathlib.Path, files: dict[str, str],
                                                         task: str | None, message: str) -> None:
    peer = _peer(tmp_path)
    with pytest.raises(TaskError, match=message):
        load_task(peer, "j1", _spec(peer, files, task))  # type: ignore[arg-type]


def test_the_users_error_shows_its_own_frames_relative_to_the_bundle(tmp_path: pathlib.Path) -> None:
    peer = _peer(tmp_path)
    src = "import dml\n\n\ndef helper():\n    raise RuntimeError('no GPU here')\n\n\nhelper()\n"
    with pytest.raises(TaskError) as e:
        load_task(peer, "j1", _spec(peer, {"mytask.py": src}))  # type: ignore[arg-type]
    msg = str(e.value)
    assert msg.startswith("importing mytask.py raised RuntimeError: no GPU here")
    assert 'File "mytask.py", line 8, in <module>: helper()' in msg
    assert 'File "mytask.py", line 5, in helper' in msg
    assert "taskload" not in msg and "importlib" not in msg and str(tmp_path) not in msg
    assert "mytask" not in sys.modules  # a failed import leaves nothing behind


def test_a_model_that_raises_is_a_task_error_with_the_users_frame(tmp_path: pathlib.Path) -> None:
    peer = _peer(tmp_path)
    src = "import dml\n\n\ndef build():\n    return 1 / 0\n\n\ntask = dml.Task(model=build, train=lambda ctx: [])\n"
    spec = _spec(peer, {"mytask.py": src})
    with pytest.raises(TaskError, match="model\\(\\) raised ZeroDivisionError: division by zero") as e:
        make_trainer(peer, "j1", spec)  # type: ignore[arg-type]
    assert "mytask.py\", line 5, in build: return 1 / 0" in str(e.value) and "trainer.py" not in str(e.value)


def test_bytes_that_are_not_the_jobs_digest_are_refused(tmp_path: pathlib.Path) -> None:
    peer = _peer(tmp_path)
    spec = _spec(peer, {"mytask.py": TASK.format(version=1)})
    peer.client.bundles[spec.task_digest] = taskcode.pack_files({"mytask.py": b"task = 2\n"})
    with pytest.raises(TaskError, match="not the job's"):
        load_task(peer, "j1", spec)  # type: ignore[arg-type]
    assert not list((tmp_path / "cache").glob("*.zip"))


def test_a_hostile_bundle_with_the_right_digest_is_still_checked(tmp_path: pathlib.Path) -> None:
    import io
    import zipfile

    peer = _peer(tmp_path)
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        z.writestr("mytask.py", "task = 1\n")
        z.writestr("../../escape.py", "x = 1\n")
    data = buf.getvalue()
    d = taskcode.digest_of(data)
    peer.client.bundles[d] = data
    with pytest.raises(TaskError, match="refused: .*unsafe part"):
        load_task(peer, "j1", types_pb2.JobSpec(task="mytask.py", task_digest=d))  # type: ignore[arg-type]
    assert not (tmp_path / "escape.py").exists() and not list((tmp_path / "cache").glob(f"{d}*/"))


def test_the_peer_flags_allow_job_code_and_name_the_data_dir(tmp_path: pathlib.Path, monkeypatch, capsys) -> None:
    from dml.peer import cli as peer_cli

    base = ["--coordinator", "127.0.0.1:1", "--device", "cpu"]
    monkeypatch.delenv("DML_ALLOW_JOB_CODE", raising=False)
    monkeypatch.delenv("DML_DATA_DIR", raising=False)
    monkeypatch.chdir(tmp_path)
    cfg, _ = peer_cli.build_config(base)
    assert not cfg.allow_job_code and cfg.data_dir == tmp_path.resolve() and cfg.code_cache_dir is None
    (tmp_path / "mnt").mkdir()
    cfg, _ = peer_cli.build_config([*base, "--allow-job-code", "--data-dir", "mnt", "--code-cache-dir", "c"])
    assert cfg.allow_job_code and cfg.data_dir == tmp_path / "mnt" and cfg.code_cache_dir == tmp_path / "c"
    monkeypatch.setenv("DML_ALLOW_JOB_CODE", "1")
    monkeypatch.setenv("DML_DATA_DIR", str(tmp_path / "mnt"))
    cfg, _ = peer_cli.build_config(base)
    assert cfg.allow_job_code and cfg.data_dir == tmp_path / "mnt"
    with pytest.raises(SystemExit) as e:
        peer_cli.build_config([*base, "--data-dir", "missing"])
    assert e.value.code == 2 and "--data-dir missing: no such directory" in capsys.readouterr().err


def test_the_coordinator_flag_bounds_task_code(capsys) -> None:
    from dml.coordinator import cli as coord_cli

    assert coord_cli.build_config([]).max_task_code_bytes == taskcode.MAX_BUNDLE_BYTES
    assert coord_cli.build_config(["--max-task-code-bytes", "1000"]).max_task_code_bytes == 1000
    with pytest.raises(SystemExit):
        coord_cli.build_config(["--max-task-code-bytes", str(taskcode.MAX_CONFIGURABLE_BYTES + 1)])
    assert "--max-task-code-bytes" in capsys.readouterr().err


def test_a_copy_of_the_task_in_the_peers_working_directory_does_not_block_the_bundle(tmp_path: pathlib.Path,
                                                                                      monkeypatch) -> None:
    # `python -m dml.peer.cli` (dml local's peers) has the working directory first on sys.path,
    # and `dml local --task mytask.py` runs where mytask.py is.
    peer = _peer(tmp_path)
    (tmp_path / "mytask.py").write_text("raise SystemExit('the working directory copy was imported')\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    task = load_task(peer, "j1", _spec(peer, {"mytask.py": TASK.format(version=3)}))  # type: ignore[arg-type]
    assert task.name == "v3"


class DataClient:
    """The coordinator's side of GetDataset and GetChunk, with what it serves set by the test."""

    def __init__(self, files: dict[str, bytes], serve=None) -> None:  # type: ignore[no-untyped-def]
        from dml.common.datasets import FileEntry, chunk_digest, manifest_digest
        from dml.v1 import data_pb2

        self.chunks = {chunk_digest(b): b for b in files.values()}
        entries = [FileEntry(p, len(b), (chunk_digest(b),)) for p, b in sorted(files.items())]
        self.resp = data_pb2.GetDatasetResponse(
            dataset=data_pb2.DatasetInfo(name="ds", digest=manifest_digest(entries)),
            files=[data_pb2.DatasetFile(path=f.path, size=f.size, chunks=list(f.chunks)) for f in entries])
        self.serve = serve or (lambda d: self.chunks[d])

    def fetch_manifest(self, name: str):  # type: ignore[no-untyped-def]
        from dml.peer.client import DatasetMissing

        if name != "ds":
            raise DatasetMissing(f"no dataset {name}")
        return self.resp

    def fetch_chunk(self, digest: str) -> bytes:
        return self.serve(digest)


def test_a_job_on_a_stored_dataset_reads_it_from_the_cache_and_declines_when_it_cannot_be_had(
        tmp_path: pathlib.Path) -> None:
    import io

    from dml.peer.datacache import ChunkCache

    buf = io.BytesIO()
    np.save(buf, np.random.default_rng(0).normal(size=(6, 3)).astype(np.float32))
    peer = _peer(tmp_path)
    spec = _spec(peer, {"mytask.py": TASK.format(version=1)})
    spec.dataset = "ds"
    code = peer.client
    peer.client = DataClient({"x.npy": buf.getvalue()})  # type: ignore[assignment]
    peer.client.fetch_task_code = code.fetch_task_code  # type: ignore[attr-defined]
    peer.data_cache = ChunkCache(tmp_path / "datacache")  # type: ignore[attr-defined]
    trainer = make_trainer(peer, "j1", spec)  # type: ignore[arg-type]
    assert trainer.train_data.size == 6  # the dataset's x.npy, not the 10 rows in --data-dir
    assert trainer.ctx.data_dir == tmp_path / "datacache" / "datasets" / peer.client.resp.dataset.digest
    spec.dataset = "absent"
    with pytest.raises(Declined, match="cannot fetch dataset absent: no dataset absent"):
        make_trainer(peer, "j2", spec)  # type: ignore[arg-type]
    liar = DataClient({"x.npy": b"other bytes"}, serve=lambda d: b"not those")
    liar.fetch_task_code = code.fetch_task_code  # type: ignore[attr-defined]
    peer.client = liar  # type: ignore[assignment]
    spec.dataset = "ds"
    with pytest.raises(Declined, match="cannot fetch dataset ds: chunk .* hashes to"):
        make_trainer(peer, "j3", spec)  # type: ignore[arg-type]
