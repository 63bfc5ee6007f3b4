"""tests/e2e/compose_prep.py's pure parts: which files go into the image's build context (as
Docker reads .dockerignore), the key an unchanged tree reuses its image by, the context's tar."""
from __future__ import annotations

import io
import pathlib
import tarfile

from tests.e2e.compose_prep import MTIME, context_key, ignored, write_context

PATTERNS = [".git", ".venv", "**/__pycache__", "*.egg-info", "state", "*.pt", "deploy/kubernetes/base/secrets",
            "wheels"]


def test_dockerignore_as_docker_reads_it():
    out = ["x.pt", "peer/__pycache__/a.pyc", "__pycache__/b", ".venv/bin/python", "state/db", "dml.egg-info/PKG-INFO",
           "deploy/kubernetes/base/secrets/token", "wheels/torch.whl"]
    kept = ["tests/fixtures/a/b.pt", "peer/runner.py", "deploy/kubernetes/base/kustomization.yaml", "stateful.py",
            "docs/state/x.md"]
    assert [f for f in out if not ignored(f, PATTERNS)] == []
    assert [f for f in kept if ignored(f, PATTERNS)] == []
    assert not ignored("x.pt", ["*.pt", "!x.pt"]), "the last pattern that matches wins"


def _tree(root: pathlib.Path) -> list[str]:
    (root / "pkg").mkdir(parents=True)
    (root / "pkg" / "a.py").write_text("A = 1\n")
    (root / "run.sh").write_text("#!/bin/sh\n")
    (root / "run.sh").chmod(0o755)
    return ["pkg/a.py", "run.sh"]


def test_context_key_follows_the_bytes_the_modes_the_wheels_and_the_base(tmp_path):
    files = _tree(tmp_path / "t")
    wheels = tmp_path / "py3.11-abc"
    key = context_key(tmp_path / "t", files, wheels, "sha256:base")
    assert key == context_key(tmp_path / "t", files, wheels, "sha256:base")
    assert key != context_key(tmp_path / "t", files, wheels, "sha256:other")
    assert key != context_key(tmp_path / "t", files, tmp_path / "py3.11-def", "sha256:base")
    (tmp_path / "t" / "run.sh").chmod(0o644)
    assert key != (k2 := context_key(tmp_path / "t", files, wheels, "sha256:base"))
    (tmp_path / "t" / "pkg" / "a.py").write_text("A = 2\n")
    assert k2 != context_key(tmp_path / "t", files, wheels, "sha256:base")


def test_context_tar_holds_the_files_and_the_wheelhouse(tmp_path):
    files = _tree(tmp_path / "t")
    wheels = tmp_path / "wh"
    wheels.mkdir()
    (wheels / "x-1-py3-none-any.whl").write_bytes(b"zip")
    (wheels / ".complete").touch()
    buf = io.BytesIO()
    write_context(buf, tmp_path / "t", files, wheels)
    with tarfile.open(fileobj=io.BytesIO(buf.getvalue())) as tar:
        members = {m.name: m for m in tar.getmembers()}
        assert sorted(members) == ["pkg/a.py", "run.sh", "wheels/x-1-py3-none-any.whl"]
        assert members["run.sh"].mode == 0o755 and members["pkg/a.py"].mode == 0o644
        assert {m.mtime for m in members.values()} == {MTIME}
        assert tar.extractfile("pkg/a.py").read() == b"A = 1\n"


def _adopted(tmp_path: pathlib.Path, pid: int, deadline_s: float = 60.0, started_ago_s: float = 0.0):
    import time

    from tests.e2e.compose_prep import ADOPT_DEADLINE, ADOPT_DIR, ADOPT_PID, ADOPT_STARTED, Adopted

    env = {ADOPT_DIR: str(tmp_path), ADOPT_PID: str(pid), ADOPT_DEADLINE: str(deadline_s),
           ADOPT_STARTED: repr(time.time() - started_ago_s)}
    got = Adopted.from_env(env)
    assert got is not None
    return got


def test_a_session_takes_over_the_preparation_the_suite_runner_started(tmp_path):
    import json
    import subprocess
    import sys

    from tests.e2e.compose_prep import Adopted

    assert Adopted.from_env({}) is None, "nothing named: the session starts its own"
    # A stand-in for the preparation: writes its result after a moment, then exits (the result
    # written by the process itself, before it exits, as the real one does: a timer here could
    # fire after the process was already seen gone).
    result = json.dumps({"ok": True, "image": "i"})
    writer = subprocess.Popen([sys.executable, "-c", "import os, sys, time; time.sleep(0.2); "
                               "open(sys.argv[1] + '.tmp', 'w').write(sys.argv[2]); os.replace(sys.argv[1] + '.tmp', sys.argv[1])",
                               str(tmp_path / "result.json"), result])
    try:
        prep = _adopted(tmp_path, writer.pid)
        got = prep.wait()
        assert got["ok"] and got["image"] == "i" and got["waited_s"] >= 0
        assert prep.close() is None, "the owner, not the session, stops it"
    finally:
        writer.wait(30)


def test_an_adopted_preparation_that_dies_without_a_result_is_an_error_and_one_past_its_deadline_a_skip(tmp_path):
    import subprocess
    import sys

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait(30)
    assert "error" in _adopted(tmp_path, dead.pid).wait()
    alive = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        # Started 70 s ago with a 5 s deadline: past it (and its 60 s margin) already.
        got = _adopted(tmp_path, alive.pid, deadline_s=5, started_ago_s=70).wait()
        assert "skip" in got and "longer than 5 s" in got["skip"]
    finally:
        alive.kill()
        alive.wait(30)


def test_the_suite_runner_runs_unit_and_integration_on_workers_then_e2e():
    import importlib.util

    spec = importlib.util.spec_from_file_location("run_suite", pathlib.Path(__file__).resolve().parents[2] / "scripts" / "run_suite.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    first, second = mod.parts("3")
    assert first[-4:] == ["-n", "3", "tests/unit", "tests/integration"]
    assert second[-1] == "tests/e2e" and "-n" not in second
