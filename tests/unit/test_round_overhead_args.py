"""benchmarks/round_overhead.py: flag parsing (bad flags exit 2) and the per-round split.

The module is imported in a child process: importing it sets environment variables (one compute
thread, gRPC fork support off) that must not leak into this test process.
"""
from __future__ import annotations

import json
import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "benchmarks" / "round_overhead.py"

CHILD = r"""
import contextlib, io, json, sys
sys.path.insert(0, sys.argv[1])
import round_overhead as ro

def parse(argv):
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err):
            a = ro.parse_args(argv)
    except SystemExit as e:
        return {"exit": e.code, "stderr": err.getvalue()}
    return {"exit": None, "sizes": a.sizes, "rounds": a.rounds, "peers": a.peers, "codec": a.codec,
            "data_plane": a.data_plane, "local_steps": a.local_steps, "warmup": a.warmup, "lr": a.lr, "tasks": a.task_list}

cases = json.loads(sys.argv[2])
out = {"parse": [parse(c) for c in cases],
       "default_rounds": [ro.default_rounds(n) for n in (999_925, 9_999_961, 50_000_032)],
       "task_name": [ro.task_name(x) for x in (1.0, 10.0, 0.5)]}
hist = [{"round": r, "epoch": 1, "committed_unix_ms": 1000 * r + (500 if r == 4 else 0), "train_ms": 100,
         "exchange_ms": 200, "duration_ms": 900} for r in range(1, 7)]
out["split"] = ro.round_split(hist, 6, 2, {(3, 1): 0.4, (4, 1): 0.5, (5, 1): 0.6})
out["split_no_reports"] = ro.round_split(hist, 6, 2, {})
# All-reduce windows as three members log them (peer-0..2.log), --sync grads with 2 steps a round:
# round 3: step 0 entered at 10.0, 10.1, 10.3 and left at 10.5, 10.5, 10.6; step 1 entered at
# 11.0 (all) and left at 11.2. Round 4: one member logged one window only (a failed attempt).
import pathlib, tempfile
logs = pathlib.Path(tempfile.mkdtemp())
lines = {0: ["10.000000:10.500000 11.000000:11.200000"], 1: ["10.100000:10.500000 11.000000:11.200000"],
         2: ["10.300000:10.600000 11.000000:11.150000"]}
for i, wins in lines.items():
    text = "".join(f"DEBUG peer p{i} job J round 3 epoch 1: all-reduce windows {w}\n" for w in wins)
    text += f"DEBUG peer p{i} job J round 4 epoch 1: all-reduce windows " + ("1.0:2.0 3.0:4.0" if i else "1.0:2.0") + "\n"
    text += f"DEBUG peer p{i} job OTHER round 5 epoch 1: all-reduce windows 1.0:2.0\n"
    (logs / f"peer-{i}.log").write_text(text)
win = ro.allreduce_split(logs, 3, "J")
out["windows"] = {f"{r},{e}": v for (r, e), v in win.items()}
out["split_windows"] = ro.round_split(hist, 6, 2, {}, {(3, 1): (0.3, 0.5), (4, 1): (0.1, 0.2), (5, 1): (0.2, 0.3)})
out["split_partial_windows"] = ro.round_split(hist, 6, 2, {}, win)
# cluster(): the commands it starts, by default and placed (no process is started: _spawn and the
# waits are stand-ins).
spawned = []

class FakeProc:
    pid = 1

    def poll(self):
        return None

stale_at_spawn = []  # a log that still held an earlier run's lines when its process started
ro._spawn = lambda cmd, log, procs: (stale_at_spawn.append(log.name) if log.exists() else None) or \
    spawned.append([cmd, log.name]) or procs.append(FakeProc()) or procs[-1]
ro.wait_for_port_file = lambda path, proc, timeout_s: 4321
ro._wait_registered = lambda peers, logs, timeout_s: [f"p{i}" for i in range(len(peers))]
ro.reap = lambda procs: spawned.append(["reaped", len(procs)])
root = pathlib.Path(tempfile.mkdtemp())
(root / "logs").mkdir()
for name in ("coordinator.log", "peer-0.log", "peer-1.log"):  # a --log-dir reused from an earlier run
    (root / "logs" / name).write_text("peer old: registered at 127.0.0.1:1 with coordinator 127.0.0.1:2\n")
with ro.cluster(2, root, ("--allow-job-code",)) as c:
    out["default_address"] = c.address
with ro.cluster(2, root, ("--x",), coordinator_host="10.213.0.254", coordinator_args=("--tls-cert", "c"),
                peer_hosts=["10.213.0.1", "10.213.0.2"], peer_prefixes=[("ip", "netns", "exec", "n0"), ("ip", "netns", "exec", "n1")]) as c:
    out["placed_address"] = c.address
try:
    with ro.cluster(2, root, peer_hosts=["10.213.0.1"]):
        pass
    out["mismatch"] = ""
except ValueError as e:
    out["mismatch"] = str(e)
out["stale_at_spawn"] = stale_at_spawn
out["spawned"] = [[[x.replace(str(root), "ROOT").replace(sys.executable, "PY") for x in cmd], log] if cmd != "reaped" else [cmd, log]
                  for cmd, log in spawned]
print(json.dumps(out))
"""

GOOD = [[], ["--params-m", "1,10", "--peers", "3", "--rounds", "4", "--codec", "int8", "--data-plane", "grpc",
             "--local-steps", "2", "--json", "--tasks", ""], ["--params-m", " 0.5 ", "--tasks", "digits, digits-cnn"]]
BAD = {
    "--peers": ["--peers", "0"],
    "not a number": ["--params-m", "1,x"],
    "must be positive": ["--params-m", "1,-5"],
    "between 3k and 2000M": ["--params-m", "0.001"],
    "--warmup + 2 = 4": ["--rounds", "3"],
    "--codec": ["--codec", "fp8"],
    "--data-plane": ["--data-plane", "udp"],
    "--local-steps": ["--local-steps", "0"],
    "--lr": ["--lr", "-1"],
    "--tasks: 'nope' is not a built-in task": ["--tasks", "nope"],
    "--tasks: 'synthetic:1M' is not a built-in task other than synthetic:SIZE": ["--tasks", "synthetic:1M"],
}


def _run_child() -> dict:
    cases = GOOD + list(BAD.values())
    res = subprocess.run([sys.executable, "-c", CHILD, str(SCRIPT.parent), json.dumps(cases)],
                         capture_output=True, text=True, timeout=120, cwd=ROOT, check=False)
    assert res.returncode == 0, res.stderr
    return json.loads(res.stdout.splitlines()[-1])


def test_parsing_and_split() -> None:
    out = _run_child()
    default, custom, half = out["parse"][: len(GOOD)]
    assert default["exit"] is None
    assert [m for m, _ in default["sizes"]] == [1.0, 10.0, 50.0]
    assert default["peers"] == 4 and default["rounds"] is None and default["codec"] == "fp32"
    assert default["data_plane"] == "auto" and default["local_steps"] == 1 and default["warmup"] == 2
    assert default["lr"] == 0.01 and default["tasks"] == ["digits-cnn"]  # the CNN with Adam, beside the MLPs
    assert custom["exit"] is None and custom["peers"] == 3 and custom["rounds"] == 4
    assert custom["codec"] == "int8" and custom["data_plane"] == "grpc" and custom["local_steps"] == 2
    assert half["exit"] is None and half["sizes"][0][0] == 0.5 and half["tasks"] == ["digits", "digits-cnn"]
    assert custom["tasks"] == []
    for (needle, _), got in zip(BAD.items(), out["parse"][len(GOOD):]):
        assert got["exit"] == 2, (needle, got)
        assert needle in got["stderr"], (needle, got["stderr"])
    assert out["default_rounds"] == [30, 20, 8]
    assert out["task_name"] == ["synthetic:1M", "synthetic:10M", "synthetic:0.5M"]
    # Measured rounds 3..5; round 4 committed 0.5 s late, round 5 0.5 s early.
    s = out["split"]
    assert s["measured_rounds"] == 3
    assert s["round_s"] == 1.0 and s["round_s_max"] == 1.5
    assert s["train_s"] == 0.1 and s["exchange_s"] == 0.2
    assert abs(s["coord_s"] - 0.7) < 1e-9 and abs(s["coord_s_max"] - 1.2) < 1e-9
    assert s["plan_to_commit_s"] == 0.9 and s["report_s"] == 0.5
    assert out["split_no_reports"]["report_s"] is None
    assert out["split_no_reports"]["wait_s"] is None and out["split_no_reports"]["allreduce_s"] is None
    # Step 0 waits 0.3 s for the last member (10.3 - 10.0), then takes 0.3 s (10.6 - 10.3); step 1
    # waits nothing and takes 0.2 s: the round waited 0.3 s and all-reduced 0.5 s. Round 4 (a member
    # with one all-reduce fewer) and the other job's line are left out.
    (key, (wait, work)), = out["windows"].items()
    assert key == "3,1" and abs(wait - 0.3) < 1e-6 and abs(work - 0.5) < 1e-6
    sw = out["split_windows"]
    assert sw["wait_s"] == 0.2 and sw["allreduce_s"] == 0.3 and sw["wait_s_max"] == 0.3
    assert out["split_partial_windows"]["wait_s"] is None, "a partial wait column would mislead"


def test_bad_flag_exits_2() -> None:
    res = subprocess.run([sys.executable, str(SCRIPT), "--peers", "0"], capture_output=True, text=True, timeout=120,
                         cwd=ROOT, check=False)
    assert res.returncode == 2
    assert "--peers" in res.stderr and res.stdout == ""


def test_cluster_commands_default_and_placed() -> None:
    """cluster() starts the coordinator and the peers on 127.0.0.1 by default; with a host for the
    coordinator (and its extra flags) and per peer a host and a command prefix (vs_ddp's emulated
    LAN: ``ip netns exec NS``), each process gets exactly those."""
    out = _run_child()
    assert out["default_address"] == "127.0.0.1:4321" and out["placed_address"] == "10.213.0.254:4321"
    assert "2 peers, 1 hosts" in out["mismatch"]
    # An earlier run's logs are gone before anything starts: their "registered" lines would pass
    # for this run's (a baseline RSS read before the peer imported torch).
    assert out["stale_at_spawn"] == []
    coord = ["PY", "-m", "dml.coordinator.cli", "--host", "127.0.0.1", "--port", "0", "--state-dir", "ROOT/state",
             "--port-file", "ROOT/state/coordinator.port"]
    peer = ["PY", "-m", "dml.peer.cli", "--coordinator", "127.0.0.1:4321", "--host", "127.0.0.1", "--port", "0",
            "--device", "cpu", "--log-level", "DEBUG", "--join-token-file", "ROOT/state/secrets/join.token"]
    (c0, l0), (p0, lp0), (p1, lp1), reaped, (c1, _), (q0, _), (q1, _), reaped2 = out["spawned"]
    assert (l0, lp0, lp1) == ("coordinator.log", "peer-0.log", "peer-1.log") and reaped == reaped2 == ["reaped", 3]
    assert c0 == coord
    assert p0 == p1 == peer + ["--allow-job-code"]
    assert c1 == coord[:4] + ["10.213.0.254"] + coord[5:] + ["--tls-cert", "c"]
    for i, q in enumerate((q0, q1)):
        assert q[:4] == ["ip", "netns", "exec", f"n{i}"]  # it execs: the pid spawned is the peer's
        assert q[4:10] == ["PY", "-m", "dml.peer.cli", "--coordinator", "10.213.0.254:4321", "--host"]
        assert q[10] == f"10.213.0.{i + 1}" and q[-1] == "--x"
