"""The CLIs' answers to bad input and unreachable coordinators, and `dml local` end to end."""
from __future__ import annotations

import json
import os
import pathlib
import re
import signal
import subprocess
import sys
import time
from typing import Iterator

import pytest

from dml.client.cluster import LocalCluster, operator_token_file, reap
from dml.client.local import cluster
from tests.e2e.conftest import FAST_FAILURES, ROOT, TLS_ENV, dml

pytestmark = pytest.mark.e2e


def _unused_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_unreachable_coordinator_is_one_line_within_the_deadline():
    addr = f"127.0.0.1:{_unused_port()}"
    for args in (["status", "--coordinator", addr, "job-x", "--timeout", "2"],
                 ["submit", "--coordinator", addr, "--timeout", "2"],
                 ["jobs", "--coordinator", addr, "--timeout", "2"]):
        # It gives up on its own (a `dml` that kept retrying would run into the 30 s that
        # dml() allows and fail here), saying why in one line: the connection was refused or
        # its own deadline passed. How long that took is not asserted: the machine is shared.
        out = dml(*args, timeout=30)
        assert out.returncode == 1
        assert out.stderr.strip().count("\n") == 0, out.stderr
        assert re.fullmatch(rf"dml: cannot reach coordinator at {re.escape(addr)} \((unavailable|deadline_exceeded)\)",
                            out.stderr.strip()), out.stderr


def test_bad_flags_exit_2_with_a_message():
    out = dml("submit", "--rounds", "many")
    assert out.returncode == 2 and "invalid int value" in out.stderr
    out = dml("status", "--coordinator", "nonsense")
    assert out.returncode == 2 and "HOST:PORT" in out.stderr
    peer = subprocess.run([sys.executable, "-m", "dml.peer.cli", "--coordinator", "nohostport"], capture_output=True,
                          text=True, timeout=60, cwd=ROOT)
    assert peer.returncode == 2 and "HOST:PORT" in peer.stderr and "Traceback" not in peer.stderr
    peer = subprocess.run([sys.executable, "-m", "dml.peer.cli", "--coordinator", "127.0.0.1:1", "--device", "tpu"],
                          capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert peer.returncode == 2 and "--device" in peer.stderr


def test_invalid_job_is_rejected_by_the_coordinator_with_exit_2(local_cluster):
    address, _ = local_cluster(0)
    # Checks only the coordinator can make (the flags' own range checks are in tests/unit/test_cli_args.py).
    for args, words in ((["--num-shards", "100000"], "num_shards"), (["--task", "mnist"], "unknown task"),
                        (["--sharding", "dirichlet:zero"], "sharding")):
        out = dml("submit", "--coordinator", address, *args)
        assert out.returncode == 2, out
        assert words in out.stderr and out.stderr.startswith("dml: invalid job:"), out.stderr
        assert "Traceback" not in out.stderr


def test_without_the_right_tokens_job_control_and_joining_are_one_line_refusals(tmp_path, monkeypatch):
    # Tokens alone decide only in plain text (loopback): with mutual TLS a client certificate of
    # the cluster's CA is itself the join credential (docs/security.md), and a caller without one
    # cannot even connect. So this cluster, and only this one, runs without TLS.
    for name in TLS_ENV:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.delenv("DML_TOKEN_FILE", raising=False)
    c = LocalCluster(tmp_path / "state", tmp_path / "logs", coordinator_args=FAST_FAILURES, cwd=ROOT, plaintext=True)
    with c:
        _token_refusals(c.start_coordinator(), tmp_path)


def _token_refusals(address: str, tmp_path: pathlib.Path) -> None:
    wrong = tmp_path / "wrong.token"
    wrong.write_text("not-the-token\n")
    for extra, words in (((), "wants the operator token"), (("--token-file", str(wrong)), "wants the operator token"),
                         (("--token-file", str(tmp_path / "missing")), "cannot read the token file")):
        for argv in (["jobs"], ["submit", "--rounds", "1"], ["cancel", "job-x"]):
            out = dml(*argv, "--coordinator", address, *extra)
            assert out.returncode == 2 and out.stderr.count("\n") == 1 and words in out.stderr, (argv, extra, out)
    assert dml("health", "--coordinator", address).returncode == 0, "health stays open"
    peer = subprocess.run([sys.executable, "-m", "dml.peer.cli", "--coordinator", address, "--port", "0", "--device",
                           "cpu", "--join-token-file", str(wrong)], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert peer.returncode == 2 and "refused the registration" in peer.stderr, peer.stderr
    assert "Traceback" not in peer.stderr


def test_dml_local_trains_and_shuts_down(tmp_path):
    out = subprocess.run([sys.executable, "-m", "dml.client.cli", "local", "--port", "0", "--peers", "2",
                          "--rounds", "30", "--state-dir", str(tmp_path / "s"), "-o", str(tmp_path / "m.pt")],
                         capture_output=True, text=True, timeout=180, cwd=ROOT)
    assert out.returncode == 0, out.stderr[-3000:]
    last = out.stdout.strip().splitlines()[-1]
    m = re.search(r"SUCCEEDED after 30 rounds .* test accuracy (\d\.\d+)", last)
    assert m and float(m.group(1)) > 0.8, last
    assert (tmp_path / "m.pt").stat().st_size > 0
    assert "Traceback" not in "".join(p.read_text() for p in (tmp_path / "s" / "logs").glob("*.log"))


@pytest.mark.parametrize("how", ["ctrl-c", "sigterm", "sigkill"])
def test_dml_local_reaps_every_process_when_stopped(tmp_path, how):
    """Ctrl-C (SIGINT to the group), SIGTERM, even SIGKILL of `dml local` leave no process behind."""
    proc = subprocess.Popen([sys.executable, "-m", "dml.client.cli", "local", "--port", "0", "--peers", "2",
                             "--rounds", "100000", "--state-dir", str(tmp_path / "s")],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT,
                            start_new_session=True)
    try:
        deadline = time.monotonic() + 60
        line = ""
        while time.monotonic() < deadline and "job job-" not in line:
            line = proc.stderr.readline()
        assert "job job-" in line
        children = _children(proc.pid)
        assert len(children) == 3, children  # coordinator + 2 peers
        if how == "ctrl-c":
            os.killpg(proc.pid, signal.SIGINT)  # what a terminal's Ctrl-C does
        else:
            proc.send_signal(signal.SIGTERM if how == "sigterm" else signal.SIGKILL)
        proc.wait(30)
        assert proc.returncode == (130 if how != "sigkill" else -signal.SIGKILL)
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline and any(_alive(pid) for pid in children):
            time.sleep(0.1)
        for pid in children:
            assert not _alive(pid), f"child {pid} survived {how}"
    finally:
        reap([proc])


def test_a_burst_of_sigterms_stops_the_coordinator_and_a_peer_cleanly(tmp_path):
    """What a parent SIGKILLed with several threads sends its children (several SIGTERMs at
    once): each stops the normal way, exit code 0, rather than deadlocking in its handler."""
    with LocalCluster(tmp_path / "state", tmp_path / "logs", coordinator_args=FAST_FAILURES, cwd=ROOT) as c:
        c.start_coordinator()
        peer = c.start_peer()
        deadline = time.monotonic() + 90
        while "exchanging on" not in peer.log.read_text(errors="replace"):
            assert time.monotonic() < deadline and peer.alive, peer.log.read_text(errors="replace")[-2000:]
            time.sleep(0.1)
        for proc in (peer, c.coordinator):
            assert proc is not None
            for _ in range(20):
                proc.popen.send_signal(signal.SIGTERM)
            assert proc.popen.wait(60) == 0, (proc.name, proc.log.read_text(errors="replace")[-2000:])


def _children(pid: int) -> list[int]:
    kids = []
    for stat in pathlib.Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            kids.append(int(stat.parent.name))
    return kids


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    with open(f"/proc/{pid}/stat") as f:  # a zombie is dead but not yet reaped by its parent
        return f.read().split()[2] != "Z"


@pytest.mark.parametrize("args,words", [
    (["--seed", "-1"], "--seed"), (["--num-shards", "-2"], "--num-shards"),
    (["--batch-size", "5000000000"], "--batch-size"), (["--lr", "0"], "--lr"), (["--local-steps", "0"], "--local-steps"),
])
def test_out_of_range_flags_exit_2_without_a_traceback(args, words):
    out = dml("submit", "--coordinator", "127.0.0.1:1", *args)
    assert out.returncode == 2 and words in out.stderr and "Traceback" not in out.stderr
    assert out.stderr.count("\n") == 1


@pytest.fixture(scope="module")
def finished_job(tmp_path_factory, cluster_tls) -> Iterator[tuple[str, str]]:
    """A coordinator and one peer that have run a 3-round job to the end: (address, job id)."""
    root = tmp_path_factory.mktemp("finished")
    with pytest.MonkeyPatch.context() as mp, cluster(1, 0, root / "state", root / "logs",
                                                     tls=cluster_tls) as (address, _, _c):
        mp.setenv("DML_TOKEN_FILE", str(operator_token_file(root / "state")))  # the `dml` children's operator token
        out = dml("submit", "--coordinator", address, "--rounds", "3", "--local-steps", "2")
        assert out.returncode == 0, out.stderr
        job = out.stdout.split()[-1]
        out = dml("status", "--coordinator", address, job, "--watch", timeout=180)
        assert out.returncode == 0 and "SUCCEEDED" in out.stdout, out
        yield address, job


# The child runs one `dml` command in-process and writes the names of the modules it loaded.
LOADED = r"""
import json, sys
from dml.client import cli
try:
    cli.main(sys.argv[2:])
finally:
    with open(sys.argv[1], "w") as f:
        json.dump(sorted(sys.modules), f)
"""


def _loaded(tmp_path: pathlib.Path, *argv: str) -> tuple[subprocess.CompletedProcess[str], list[str]]:
    mods = tmp_path / "modules.json"
    mods.unlink(missing_ok=True)
    out = subprocess.run([sys.executable, "-c", LOADED, str(mods), *argv], capture_output=True, text=True,
                         timeout=60, cwd=ROOT)
    return out, json.loads(mods.read_text())


def _server_side(mods: list[str]) -> list[str]:
    return [m for m in mods if m in ("sqlite3", "_sqlite3", "torch", "numpy", "matplotlib")
            or m.startswith(("torch.", "numpy.", "dml.coordinator", "dml.peer", "sqlite3."))]


def test_dml_status_loads_no_server_code(finished_job, tmp_path):
    """Any form of `dml status` (and `dml jobs`) imports no SQLite, torch, numpy, coordinator or peer code."""
    address, job = finished_job
    a = ("--coordinator", address)
    for argv in (["status", *a], ["status", *a, job], ["status", *a, job, "--json"], ["status", *a, job, "--history"],
                 ["status", *a, job, "--json", "--history"], ["status", *a, job, "--watch"],
                 ["status", *a, "--watch", "--json"], ["jobs", *a],
                 ["checkpoint", *a, job, "-o", str(tmp_path / "state.pt")]):
        out, mods = _loaded(tmp_path, *argv)
        assert out.returncode == 0, (argv, out.stderr)
        assert _server_side(mods) == [], argv
        assert "dml.client.api" in mods and "grpc" in mods


def test_unknown_job_is_bad_input(finished_job, tmp_path):
    """status, status --watch, model, checkpoint, cancel and plot answer an unknown job id alike: one line, exit 2;
    plot looks the job up before it loads matplotlib."""
    address, _ = finished_job
    for argv in (["status", "job-nope"], ["status", "job-nope", "--watch"], ["cancel", "job-nope"],
                 ["model", "job-nope", "-o", str(tmp_path / "m.pt")],
                 ["checkpoint", "job-nope", "-o", str(tmp_path / "c.pt")]):
        out = dml(*argv, "--coordinator", address)
        assert out.returncode == 2, (argv, out)
        assert out.stderr == "dml: job job-nope not found\n", (argv, out.stderr)
    out, mods = _loaded(tmp_path, "plot", "--coordinator", address, "job-nope", "-o", str(tmp_path / "p.png"))
    assert out.returncode == 2 and out.stderr == "dml: job job-nope not found\n", out.stderr
    assert "matplotlib" not in mods and not (tmp_path / "p.png").exists()


def test_status_history_is_a_table_without_json(finished_job):
    address, job = finished_job
    out = dml("status", "--coordinator", address, job, "--history")
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[0].startswith(f"{job} [") and "SUCCEEDED" in lines[0]
    assert lines[1].split()[:6] == ["ROUND", "EPOCH", "PEERS", "SAMPLES", "LOSS", "ACC"]
    rows = [line.split() for line in lines[2:]]
    assert [r[0] for r in rows] == ["1", "2", "3"]
    full = json.loads(dml("status", "--coordinator", address, job, "--json", "--history").stdout)
    for row, h in zip(rows, full["history"]):
        assert (int(row[1]), int(row[2]), int(row[3])) == (h["epoch"], h["members"], h["samples"])
        assert float(row[4]) == pytest.approx(h["train_loss"], abs=1e-4)


def test_status_into_a_closed_pipe_ends_quietly(finished_job):
    """`dml status --json --history | head -1` and the like: exit 141, no BrokenPipeError on stderr."""
    address, job = finished_job
    for argv in (["status", job, "--json", "--history"], ["status", job, "--history"], ["jobs"]):
        r, w = os.pipe()
        os.close(r)  # the reader has gone, as `head` does after its line
        try:
            out = subprocess.run([sys.executable, "-m", "dml.client.cli", *argv, "--coordinator", address], stdout=w,
                                 stderr=subprocess.PIPE, text=True, timeout=60, cwd=ROOT)
        finally:
            os.close(w)
        assert out.returncode == 141 and out.stderr == "", (argv, out.stderr)


def test_peer_with_an_unreachable_coordinator_says_to_check_the_address():
    """The peer keeps retrying; its log says once that it cannot reach the coordinator and to check
    the address (then again every LOG_EVERY_S: tests/unit/test_cli_args.py), and it stops on SIGTERM."""
    addr = f"127.0.0.1:{_unused_port()}"
    proc = subprocess.Popen([sys.executable, "-m", "dml.peer.cli", "--coordinator", addr, "--port", "0", "--device", "cpu"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, cwd=ROOT)
    try:
        deadline = time.monotonic() + 120
        line = ""
        while time.monotonic() < deadline and "cannot reach" not in line:
            line = proc.stderr.readline()
            if not line and proc.poll() is not None:
                break
        assert "cannot reach the coordinator" in line and addr in line and "check" in line, line
        proc.send_signal(signal.SIGTERM)
        rest = proc.stderr.read()
        assert proc.wait(30) == 1
        assert "Traceback" not in rest and f"cannot register with {addr}" in rest, rest
    finally:
        reap([proc])


def test_a_users_own_module_named_like_ours_shadows_nothing(tmp_path: pathlib.Path) -> None:
    # A training script's folder often holds its own peer.py; with the old top-level names it
    # replaced dml's. The working directory comes first on sys.path for `python -m` and `-c`.
    # Both names in one folder: each command below would import either one it shadowed.
    for module in ("peer", "coordinator"):
        (tmp_path / f"{module}.py").write_text(f"raise SystemExit('the user module {module}.py was imported instead of dml')\n")
    bindir = pathlib.Path(sys.executable).parent
    for cmd in ([str(bindir / "dml-peer"), "--help"], [str(bindir / "dml-coordinator"), "--help"],
                [sys.executable, "-m", "dml.peer.cli", "--help"],
                [sys.executable, "-c", "import dml.coordinator.state, dml.peer.trainer, dml.client.api"]):
        out = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=120)
        assert out.returncode == 0, f"{cmd}: {out.stdout}{out.stderr}"
