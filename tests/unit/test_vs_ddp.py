"""benchmarks/vs_ddp.py: flag parsing (bad flags exit 2), the step times from a made-up history,
and the rows with their ratios to DDP. No cluster, no process group.

The module is imported in a child process: importing it sets environment variables (one compute
thread, gRPC fork support off) that must not leak into this test process.
"""
from __future__ import annotations

import json
import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "benchmarks" / "vs_ddp.py"

CHILD = r"""
import argparse, contextlib, io, json, sys
sys.path.insert(0, sys.argv[1])
import vs_ddp as v

def parse(argv):
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err):
            a = v.parse_args(argv)
    except SystemExit as e:
        return {"exit": e.code, "stderr": err.getvalue()}
    return {"exit": None, "peers": a.peers, "tasks": a.task_list, "steps": a.steps, "k_grads": a.grads_local_steps,
            "k_params": a.local_steps, "batch": a.batch_size, "repeats": a.repeats, "json": a.json,
            "lr": [v.task_lr(a, t) for t in a.task_list], "labels": [v.task_label(t) for t in a.task_list],
            "link_mbit": a.link_mbit}

cases = json.loads(sys.argv[2])
out = {"parse": [parse(c) for c in cases]}
# Rounds of 10 steps: round r commits at r seconds, round 3 half a second late; 6 rounds, warm-up 1.
hist = [{"round": r, "epoch": 1, "committed_unix_ms": 1000 * r + (500 if r == 3 else 0), "train_ms": 100,
         "exchange_ms": 200, "duration_ms": 900} for r in range(1, 7)]
out["dml_times"] = v.dml_step_times(hist, 6, 1, 10)
out["dml_times_gap"] = v.dml_step_times([h for h in hist if h["round"] != 4], 6, 1, 10)
out["ddp_times"] = v.ddp_step_times([[9.0, 1.0, 2.0, 3.0], [8.0, 2.0, 1.0, 4.0]], 1)
out["spread"] = v.spread([0.3, 0.1, 0.2])
a = v.parse_args(["--peers", "4", "--steps", "100"])
ddp = v.base_row("ddp", "grads", "synthetic:10M", 4, 1, a, 0, [0.2, 0.1, 0.3], 10_000_000)
ddp.update({"test_accuracy": 0.5})
dml = v.base_row("dml", "params", "synthetic:10M", 4, 10, a, 0, [0.05, 0.05], 10_000_000)
dml.update({"test_accuracy": 0.497})
out["ddp_row"] = ddp
out["dml_row"] = v.with_ratios(dml, ddp)
out["no_ddp"] = v.with_ratios(dml, None)
grads = v.with_ratios(dict(dml, sync="grads", local_steps=10, step_s=0.3, samples_per_s=4 * 32 / 0.3), ddp)
out["checks"] = v.checks([ddp, out["dml_row"], grads])
out["checks_none"] = v.checks([])
# A ledger: 2 members, 2 rounds of 2 steps of batch 2; member b's second round spans two data epochs.
import numpy as np
from dml.common.sampling import shard_order
shards = (np.arange(0, 10), np.arange(10, 20))
led = [{"round": 2, "consumed": {"b": [[1, 1, 6, 8], [1, 2, 0, 2]], "a": [[0, 1, 4, 8]]}},
       {"round": 1, "consumed": {"a": [[0, 1, 0, 4]], "b": [[1, 1, 2, 6]]}}]
got = v.ledger_batches(led, shards, 3, 2, 2)
want_b2 = np.concatenate([shard_order(shards[1], 3, 1, 1)[6:8], shard_order(shards[1], 3, 2, 1)[0:2]])
out["ledger"] = {"shape": list(got.shape), "a1": got[0, :2].tolist(), "a1_want": shard_order(shards[0], 3, 1, 0)[0:4].reshape(2, 2).tolist(),
                 "b2_ok": bool((got[1, 2:].reshape(-1) == want_b2).all())}
errs = []
for bad in ([{"round": 1, "consumed": {"a": [[0, 1, 0, 3]], "b": [[1, 1, 0, 4]]}}],
            [{"round": 1, "consumed": {"a": [[0, 1, 0, 4]]}}, {"round": 2, "consumed": {"b": [[1, 1, 0, 4]]}}], []):
    try:
        v.ledger_batches(bad, shards, 3, 2, 2)
        errs.append("")
    except v.BenchError as e:
        errs.append(str(e))
out["ledger_errors"] = errs
# --link-mbit: where the cluster goes on an emulated LAN (a Lan object only names things: nothing is built).
lan = v.netem.Lan(4, 1000, pid=42, bridge_addr=v.netem.BRIDGE_ADDR)
out["placement"] = v.dml_placement(lan, 3, ["--tls-cert", "c.pem"])
try:
    v.dml_placement(v.netem.Lan(4, 1000, pid=42), 3, [])
    out["placement_error"] = ""
except ValueError as e:
    out["placement_error"] = str(e)
line = "DEBUG peer p job {job} round {r} epoch 1: data plane: sent {s} to q at {h}:4000, received {g}\n"
texts = ["".join(line.format(job="J", r=r, s="tcp", h=f"10.213.0.{i % 3 + 1}", g="tcp") for r in (1, 2))
         + line.format(job="OTHER", r=1, s="shm", h="127.0.0.1", g="shm") for i in range(3)]
seen = v.data_plane_seen(texts, "J")
out["seen"] = seen
addrs = lan.addrs[:3]
out["problems"] = [v.lan_plane_problem(seen, addrs), v.lan_plane_problem(v.data_plane_seen(texts, "OTHER"), addrs),
                   v.lan_plane_problem(v.data_plane_seen(texts, "NONE"), addrs),
                   v.lan_plane_problem(v.data_plane_seen([line.format(job="J", r=1, s="tcp", h="127.0.0.1", g="tcp")], "J"), addrs)]
out["links"] = [v.link_line(None), v.link_line(lan)]
# Without root or iproute2, --link-mbit exits 2 with a one-line reason, before anything starts.
v.netem.check_prereqs = lambda: "--link-mbit builds network namespaces and needs root (run it as root)"
err = io.StringIO()
with contextlib.redirect_stderr(err):
    out["no_root"] = [v.main(["--link-mbit", "1000"]), err.getvalue()]
print(json.dumps(out))
"""

GOOD = [[], ["--peers", "2,3,4", "--tasks", "synthetic:1M, digits,examples/cnn.py", "--steps", "20",
             "--local-steps", "5", "--grads-local-steps", "4", "--repeats", "2", "--json", "--lr", "0.05",
             "--link-mbit", "100"]]
BAD = {
    "must be a multiple of --grads-local-steps 10": ["--steps", "25", "--local-steps", "5"],
    "must be a multiple of --local-steps 3": ["--steps", "40", "--local-steps", "3"],
    "at least --warmup-rounds + 2 = 3": ["--steps", "20"],
    "peers must be 1..64": ["--peers", "2,0"],
    "not a whole number": ["--peers", "2,x"],
    "neither a built-in task nor a task file": ["--tasks", "nope"],
    "no such task file": ["--tasks", "examples/missing.py"],
    "names no task": ["--tasks", " , "],
    "--tasks synthetic:1k": ["--tasks", "synthetic:1k"],
    "--ddp-warmup-steps must be below": ["--steps", "30", "--ddp-warmup-steps", "30"],
    "--lr must be below 100": ["--lr", "1000"],
    "--repeats": ["--repeats", "0"],
    "--link-mbit must be 0 (loopback) or a positive rate in Mbit/s, got -1": ["--link-mbit", "-1"],
    "--link-mbit must be 0 (loopback) or a positive rate in Mbit/s, got nan": ["--link-mbit", "nan"],
    "--link-mbit must be 0 (loopback) or a positive rate in Mbit/s, got inf": ["--link-mbit", "inf"],
}


def _run_child() -> dict:
    cases = GOOD + list(BAD.values())
    res = subprocess.run([sys.executable, "-c", CHILD, str(SCRIPT.parent), json.dumps(cases)],
                         capture_output=True, text=True, timeout=120, cwd=ROOT, check=False)
    assert res.returncode == 0, res.stderr
    return json.loads(res.stdout.splitlines()[-1])


def test_flags() -> None:
    out = _run_child()
    default, custom = out["parse"][: len(GOOD)]
    assert default["exit"] is None and default["peers"] == [4] and default["tasks"] == ["synthetic:10M"]
    assert default["steps"] == 100 and default["k_grads"] == 10 and default["k_params"] == 10
    assert default["batch"] == 32 and default["repeats"] == 1 and not default["json"]
    assert default["lr"] == [0.01]  # synthetic:* at 0.01; other tasks at their own (0)
    assert custom["exit"] is None and custom["peers"] == [2, 3, 4] and custom["repeats"] == 2 and custom["json"]
    assert custom["tasks"][:2] == ["synthetic:1M", "digits"]
    assert custom["tasks"][2] == str(ROOT / "examples" / "cnn.py")  # a task file by its absolute path
    assert custom["labels"] == ["synthetic:1M", "digits", "examples/cnn.py"]
    assert custom["lr"] == [0.05, 0.05, 0.05]
    assert default["link_mbit"] == 0 and custom["link_mbit"] == 100
    for (needle, _), got in zip(BAD.items(), out["parse"][len(GOOD):]):
        assert got["exit"] == 2, (needle, got)
        assert needle in got["stderr"], (needle, got["stderr"])
        assert "Traceback" not in got["stderr"]


def test_step_times_and_rows() -> None:
    out = _run_child()
    # Measured rounds 2..5 (round 1 is the warm-up, round 6 the final one): 10 steps a round.
    assert out["dml_times"] == [0.1, 0.15, 0.05, 0.1]
    assert out["dml_times_gap"] == [0.1, 0.15]  # rounds 4 and 5 need round 4's commit
    assert out["ddp_times"] == [2.0, 2.0, 4.0]  # the slowest rank per step, the first step left out
    assert out["spread"] == {"step_s": 0.2, "step_s_min": 0.1, "step_s_max": 0.3}
    ddp, dml = out["ddp_row"], out["dml_row"]
    assert ddp["system"] == "ddp" and ddp["sync"] == "grads" and ddp["local_steps"] == 1
    assert ddp["step_s"] == 0.2 and abs(ddp["samples_per_s"] - 640) < 1e-9 and ddp["measured_steps"] == 3
    assert dml["step_s"] == 0.05 and abs(dml["samples_per_s"] - 2560) < 1e-9
    assert abs(dml["step_ratio"] - 0.25) < 1e-9 and abs(dml["samples_ratio"] - 4.0) < 1e-9
    assert abs(dml["accuracy_points_vs_ddp"] + 0.3) < 1e-9
    for k in ("system", "sync", "task", "peers", "local_steps", "step_s", "samples_per_s", "step_ratio",
              "samples_ratio"):
        assert k in dml, k
    assert out["no_ddp"]["step_ratio"] is None and out["no_ddp"]["samples_ratio"] is None
    assert ddp["link_mbit"] == 0 and dml["link_mbit"] == 0  # every JSON row says its link
    grads, params = out["checks"]
    assert "--sync grads" in grads and "1.50 x" in grads and grads.endswith("NOT ok")
    assert "--sync params" in params and "4.00 x" in params and "-0.30 points" in params and params.endswith("-> ok")
    assert all(line.endswith("not measured") for line in out["checks_none"])


def test_ddp_replays_the_batches_of_the_grads_jobs_ledger() -> None:
    got = _run_child()
    led = got["ledger"]
    assert led["shape"] == [2, 4, 2]  # members (by peer id), rounds x steps, batch
    assert led["a1"] == led["a1_want"]  # round 1 (listed second) first; its 4 samples as 2 steps of 2
    assert led["b2_ok"]  # a round across two data epochs, in the order trained
    short, changed, empty = got["ledger_errors"]
    assert "trained 3 samples, not 2 x 2" in short
    assert "members" in changed and "cannot replay" in changed
    assert "no sample ledger" in empty


def test_bad_flag_exits_2() -> None:
    res = subprocess.run([sys.executable, str(SCRIPT), "--steps", "25"], capture_output=True, text=True, timeout=120,
                         cwd=ROOT, check=False)
    assert res.returncode == 2
    assert "multiple of --grads-local-steps" in res.stderr and res.stdout == "" and "Traceback" not in res.stderr


def test_link_mbit_placement_and_data_plane_check() -> None:
    out = _run_child()
    # The coordinator in the root namespace on the bridge's address, with the TLS flags; peer i in
    # namespace i through `ip netns exec` (it execs: the pid spawned is the peer's), on rank i's address.
    assert out["placement"] == {
        "coordinator_host": "10.213.0.254", "coordinator_args": ["--tls-cert", "c.pem"],
        "peer_hosts": ["10.213.0.1", "10.213.0.2", "10.213.0.3"],
        "peer_prefixes": [["ip", "netns", "exec", f"dmlb-42-{i}"] for i in range(3)]}
    assert "no root-namespace address" in out["placement_error"]
    # The peers' DEBUG lines of job J: TCP both ways, successors on the LAN; the other job's shared memory is not counted.
    assert out["seen"] == {"sent": ["tcp"], "received": ["tcp"],
                           "successor_hosts": ["10.213.0.1", "10.213.0.2", "10.213.0.3"], "lines": 6}
    ok, shm, none, loopback = out["problems"]
    assert ok is None
    assert "not TCP alone" in shm and "shm" in shm
    assert "no data plane lines" in none
    assert "127.0.0.1" in loopback and "off the emulated LAN" in loopback
    plain, lan = out["links"]
    assert "127.0.0.1" in plain and "1000 Mbit/s" in lan and "10.213.0.254" in lan and "TLS" in lan
    code, err = out["no_root"]
    assert code == 2 and err.strip().count("\n") == 0 and "needs root" in err and "Traceback" not in err
