"""`dml local --task examples/tabular.py` end to end: the task file travels with the job to peer
processes, which write its data into their working directory, train it, and report the task's
own test metrics, which `dml local --json` prints."""
from __future__ import annotations

import json
import pathlib
import subprocess
import sys

import pytest

from tests.e2e.conftest import ROOT

pytestmark = pytest.mark.e2e


def test_dml_local_trains_the_tabular_example_and_reports_its_own_metrics(tmp_path: pathlib.Path) -> None:
    work = tmp_path / "work"  # the peers' working directory: their --data-dir by default
    work.mkdir()
    out = subprocess.run([sys.executable, "-m", "dml.client.cli", "local", "--port", "0", "--peers", "2",
                          "--task", str(ROOT / "examples" / "tabular.py"), "--rounds", "12", "--eval-every", "4",
                          "--state-dir", str(tmp_path / "s"), "--json"],
                         capture_output=True, text=True, timeout=240, cwd=work)
    assert out.returncode == 0, out.stderr[-3000:]
    assert (work / "breast_cancer.csv").is_file()  # written by the task, from scikit-learn's copy
    lines = out.stdout.strip().splitlines()
    assert "recall" in lines[-2] and "f1" in lines[-2], lines[-2]  # the summary line names them
    d = json.loads(lines[-1])
    assert d["state"] == "SUCCEEDED" and d["round"] == 12, d
    m = d["metrics"]
    assert m["test_accuracy"] > 0.9, m
    assert set(m["test_metrics"]) == {"recall", "f1"}, m
    assert 0.8 < m["test_metrics"]["f1"] <= 1 and 0.8 < m["test_metrics"]["recall"] <= 1, m
    assert "Traceback" not in "".join(p.read_text() for p in (tmp_path / "s" / "logs").glob("*.log"))
