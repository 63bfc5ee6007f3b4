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
