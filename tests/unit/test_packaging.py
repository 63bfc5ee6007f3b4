"""A regular (non-editable) install puts one import root, ``dml``, into site-packages.

Builds the wheel from a copy of the tracked tree (offline, no build isolation) and reads its file
list: every module lives under ``dml/``, so a user's own ``peer.py`` or another distribution's
``coordinator`` package can neither shadow nor be overwritten by ours.
"""
from __future__ import annotations

import configparser
import pathlib
import shutil
import subprocess
import sys
import zipfile

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> zipfile.ZipFile:
    src = tmp_path_factory.mktemp("src")
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=ROOT, capture_output=True,
                           text=True, check=True, timeout=60).stdout.split()
    for f in files:
        if (ROOT / f).is_file():
            (src / f).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / f, src / f)
    out = tmp_path_factory.mktemp("wheel")
    r = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index",
                        "-q", "-w", str(out), str(src)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    (whl,) = out.glob("dml-*.whl")
    return zipfile.ZipFile(whl)


def test_every_module_is_under_the_dml_root(wheel: zipfile.ZipFile) -> None:
    names = wheel.namelist()
    roots = {n.split("/", 1)[0] for n in names}
    assert {r for r in roots if not r.endswith(".dist-info")} == {"dml"}
    for pkg in ("v1", "common", "aggregation", "coordinator", "peer", "client"):
        assert f"dml/{pkg}/__init__.py" in names, f"dml.{pkg} is missing from the wheel"
    assert not [n for n in names if n.startswith("dml/tests/") or n.startswith("tests/")]


def test_console_scripts_point_into_dml(wheel: zipfile.ZipFile) -> None:
    (ep,) = [n for n in wheel.namelist() if n.endswith(".dist-info/entry_points.txt")]
    cfg = configparser.ConfigParser()
    cfg.read_string(wheel.read(ep).decode())
    scripts = dict(cfg["console_scripts"])
    assert set(scripts) == {"dml", "dml-coordinator", "dml-peer"}
    assert all(v.startswith("dml.") for v in scripts.values()), scripts
