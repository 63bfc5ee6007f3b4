"""A task file that exists only where `dml submit` runs: a hand-started coordinator and two
`dml-peer --allow-job-code` processes, each in a directory of its own with its own --data-dir,
train it to the end. Bad task input is refused by `dml submit` with exit 2 and one line."""
from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from dml.client.cluster import reap, wait_for_port_file
from tests.e2e.conftest import FAST_FAILURES, wait_status

pytestmark = pytest.mark.e2e

# Two Gaussian blobs read from the peer's own data dir: only a peer that reads ctx.data_dir can
# train it, and only one that fetched the code can import it.
TASK = textwrap.dedent("""\
    import numpy as np
    import torch

    import dml


    def blobs(ctx):
        x = np.load(ctx.path(f"{ctx.split}-x.npy"))
        y = np.load(ctx.path(f"{ctx.split}-y.npy"))
        return dml.ArrayDataset(torch.from_numpy(x), torch.from_numpy(y))


    task = dml.Task(
        model=lambda: torch.nn.Sequential(torch.nn.Linear(4, 16), torch.nn.ReLU(), torch.nn.Linear(16, 2)),
        train=blobs,
        test=blobs,
        optimizer=lambda params: torch.optim.Adam(params, lr=0.05),
        batch_size=16,
    )
    """)


def _data(folder: pathlib.Path) -> None:
    rng = np.random.default_rng(7)
    folder.mkdir(parents=True)
    for split, n in (("train", 400), ("test", 200)):
        y = rng.integers(0, 2, n)
        x = (rng.normal(size=(n, 4)) + 2.5 * y[:, None]).astype(np.float32)
        np.save(folder / f"{split}-x.npy", x)
        np.save(folder / f"{split}-y.npy", y.astype(np.int64))


def _dml(cwd: pathlib.Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "dml.client.cli", *args], capture_output=True, text=True,
                          timeout=60, cwd=cwd)


def test_peers_elsewhere_train_a_task_file_only_the_submitter_has(tmp_path: pathlib.Path, monkeypatch) -> None:
    submitter, state = tmp_path / "submitter", tmp_path / "state"
    submitter.mkdir()
    (submitter / "blobs_task.py").write_text(TASK)
    procs: list[subprocess.Popen[bytes]] = []
    try:
        coord = subprocess.Popen([sys.executable, "-m", "dml.coordinator.cli", "--port", "0", "--port-file",
                                  str(tmp_path / "port"), "--state-dir", str(state), *FAST_FAILURES],
                                 stdout=open(tmp_path / "coordinator.log", "ab"), stderr=subprocess.STDOUT, cwd=tmp_path)
        procs.append(coord)
        address = f"127.0.0.1:{wait_for_port_file(tmp_path / 'port', coord, 60)}"
        for name in ("a", "b"):
            home = tmp_path / f"peer-{name}"
            home.mkdir()
            _data(tmp_path / f"mnt-{name}")  # the same dataset, mounted at another path on each peer
            procs.append(subprocess.Popen(
                [sys.executable, "-m", "dml.peer.cli", "--coordinator", address, "--device", "cpu",
                 "--join-token-file", str(state / "secrets" / "join.token"), "--allow-job-code",
                 "--data-dir", str(tmp_path / f"mnt-{name}"), "--code-cache-dir", str(home / "code")],
                stdout=open(tmp_path / f"peer-{name}.log", "ab"), stderr=subprocess.STDOUT, cwd=home))
        monkeypatch.setenv("DML_TOKEN_FILE", str(state / "secrets" / "operator.token"))
        sub = _dml(submitter, "submit", "--coordinator", address, "--task", "blobs_task.py", "--rounds", "8",
                   "--local-steps", "5", "--min-peers", "2", "--num-shards", "4")
        assert sub.returncode == 0, sub.stderr
        job = sub.stdout.strip().splitlines()[-1]
        end = wait_status(address, job, lambda s: s["state"] in ("SUCCEEDED", "FAILED", "CANCELLED"), 180, "the end")
        assert end["state"] == "SUCCEEDED", end
        assert end["round"] == 8 and end["metrics"]["test_accuracy"] > 0.9
        hist = _dml(submitter, "status", "--coordinator", address, job, "--json", "--history")
        assert hist.returncode == 0, hist.stderr
        assert [r["members"] for r in json.loads(hist.stdout)["history"]][-1] == 2  # both peers trained it
    finally:
        reap(procs)
        for log in sorted(tmp_path.glob("*.log")):
            text = log.read_text(errors="replace")
            if "Traceback" in text:
                print(f"--- {log.name} ---\n{text[-3000:]}")
    for name in ("a", "b"):  # each fetched the bundle; neither had the file
        assert len(list((tmp_path / f"peer-{name}" / "code").glob("*.zip"))) == 1
        assert not list((tmp_path / f"peer-{name}").glob("*.py"))
    assert len(list((state / "code").iterdir())) == 1


@pytest.mark.parametrize("files,arg,words", [
    ({}, "nowhere.py", "nowhere.py: no such file or directory"),
    ({"broken.py": "import dml\n\ndef f(:\n    pass\n"}, "broken.py", "broken.py, line 3: SyntaxError"),
    ({"empty.py": "import dml\n"}, "empty.py", "defines no 'task'"),
    ({"pkg/model.py": "task = 1\n"}, "pkg/", "is not a Python package"),
    ({"big/__init__.py": "task = 1\n"}, "big/", "over the 4.0 MiB limit"),
])
def test_bad_task_input_is_refused_at_submit_with_exit_2(tmp_path: pathlib.Path, files: dict[str, str], arg: str,
                                                          words: str) -> None:
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    if arg == "big/":
        (tmp_path / "big" / "weights.bin").write_bytes(os.urandom(5 << 20))
    # Refused before any call: no coordinator is needed to say so.
    out = _dml(tmp_path, "submit", "--coordinator", "127.0.0.1:1", "--task", arg)
    assert out.returncode == 2, (out.stdout, out.stderr)
    assert words in out.stderr and "Traceback" not in out.stderr
    assert len(out.stderr.strip().splitlines()) == 1, out.stderr
