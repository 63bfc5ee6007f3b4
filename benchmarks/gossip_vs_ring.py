"""The same job with ring all-reduce and with gossip, with equal peers and with one slow peer.

    python benchmarks/gossip_vs_ring.py [--peers 4] [--slowdown 4] [--target 0.94]
        [--scenarios equal,slow] [--aggregations ring,gossip] [--topology uniform] [--json]
        [job flags as for `dml submit`, e.g. --rounds 200 --local-steps 10]

Each run starts its own local cluster (a coordinator and --peers peer processes on 127.0.0.1)
and runs one job on it. In the "slow" scenario one peer runs with ``dml-peer --slowdown F``: it
idles (F - 1) times its training time after each local training, as a machine F times slower
would. Prints per run:

- time to target: from the job's start (the first round's or gossip window's start) to the
  first round whose test accuracy reaches --target. Ring rounds are evaluated on the averaged
  model; a gossip virtual round carries the mean accuracy of the members' own models (each
  peer evaluates its model every --eval-every of its steps);
- final accuracy: of the job's last round (for gossip, the exact ring average of the live peers);
- total wall time of the job, rounds, and parameters sent per peer (MB of 2**20 bytes).

Then, per scenario, ring's time to target over gossip's. Both aggregations train on the same
total number of samples (rounds x peers x local_steps x batch_size); gossip splits them among
the peers by their speed instead of in lock step.
"""
from __future__ import annotations

import argparse
import json
import pathlib
import sys
import tempfile
import time
from dataclasses import replace
from typing import Any

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))

from dml.client.cli import add_job_options, spec_from_args
from dml.client.api import status_dict
from dml.client.local import cluster
from dml.common.spec import JobSpec

SCENARIOS = ("equal", "slow")
AGGREGATIONS = ("ring", "gossip")


def run(spec: JobSpec, peers: int, slow: float, log_root: pathlib.Path) -> dict[str, Any]:
    """Runs one job on a fresh local cluster; returns its figures."""
    with tempfile.TemporaryDirectory(prefix="dml-gvr-") as tmp:
        logs = log_root / f"{spec.aggregation}-{'slow' if slow > 1 else 'equal'}"
        slow_args = {peers - 1: ("--slowdown", str(slow))} if slow > 1 else {}
        with cluster(peers, 0, pathlib.Path(tmp), logs, peer_args=slow_args) as (address, _, c):
            t0 = time.monotonic()
            with c.client(timeout_s=30) as client:
                job = client.submit(spec)
                end = client.watch(job, lambda st: None, max_s=3600)
                wall = time.monotonic() - t0
                d = status_dict(end)
                if d["state"] != "SUCCEEDED":
                    raise SystemExit(f"{spec.aggregation} job ended {d['state']}: {d['reason']} (logs in {logs})")
                hist = client.history(job)
    start = hist[0].committed_unix_ms - hist[0].duration_ms
    return {
        "aggregation": spec.aggregation, "topology": spec.gossip_topology if spec.aggregation == "gossip" else "",
        "slowdown": slow, "peers": peers, "rounds": len(hist),
        "final_accuracy": hist[-1].test_accuracy,
        "job_s": (hist[-1].committed_unix_ms - start) / 1000.0, "wall_s": wall,
        "mb_sent_per_peer": sum(r.bytes_sent for r in hist) / peers / 2**20,
        "history": [(r.round, (r.committed_unix_ms - start) / 1000.0, r.test_accuracy, r.test_evaluated,
                     r.consensus_distance) for r in hist],
    }


def main(argv: list[str] | None = None) -> int:
    """Entry point."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--peers", type=int, default=4, help="peer processes (default 4)")
    p.add_argument("--slowdown", type=float, default=4.0, help="how much slower the slow peer trains (default 4)")
    p.add_argument("--target", type=float, default=0.94, help="test accuracy to reach (default 0.94)")
    p.add_argument("--scenarios", default="equal,slow", help="equal and/or slow (default both)")
    p.add_argument("--aggregations", default="ring,gossip", help="ring and/or gossip (default both)")
    p.add_argument("--json", action="store_true", help="one JSON object per run, then one per scenario")
    add_job_options(p)
    a = p.parse_args(argv)
    scenarios = [s.strip() for s in a.scenarios.split(",") if s.strip()]
    aggs = [s.strip() for s in a.aggregations.split(",") if s.strip()]
    if not scenarios or any(s not in SCENARIOS for s in scenarios):
        p.error(f"--scenarios: choose from {', '.join(SCENARIOS)}")
    if not aggs or any(s not in AGGREGATIONS for s in aggs):
        p.error(f"--aggregations: choose from {', '.join(AGGREGATIONS)}")
    if a.peers < 2:
        p.error("--peers must be at least 2")
    if not 1 <= a.slowdown <= 1000:
        p.error("--slowdown must be between 1 and 1000")
    if not 0 < a.target <= 1:
        p.error("--target must be in (0, 1]")
    if a.min_peers is None:
        a.min_peers = a.peers
    base = spec_from_args(a)
    log_root = pathlib.Path(tempfile.mkdtemp(prefix="dml-gvr-logs-"))
    results: dict[tuple[str, str], dict[str, Any]] = {}
    for sc in scenarios:
        for agg in aggs:
            r = run(replace(base, aggregation=agg), a.peers, a.slowdown if sc == "slow" else 1.0, log_root)
            r["scenario"] = sc
            r["to_target_s"] = time_to_target(r["history"], a.target)
            results[(sc, agg)] = r
            if a.json:
                print(json.dumps({k: v for k, v in r.items() if k != "history"}), flush=True)
            else:
                print(f"  ran {sc} {agg}: {r['job_s']:.1f}s, to target {fmt(r['to_target_s'])}", file=sys.stderr)
    speedups = {sc: speedup(results.get((sc, "ring")), results.get((sc, "gossip"))) for sc in scenarios}
    if a.json:
        for sc, x in speedups.items():
            print(json.dumps({"scenario": sc, "ring_over_gossip_time_to_target": x}))
        return 0
    print(f"task {base.task}, {a.peers} peers, {base.rounds} rounds x {base.local_steps} local steps, batch "
          f"{base.batch_size}, lr {base.learning_rate}, gossip topology {base.gossip_topology}, target accuracy "
          f"{a.target}, slow peer {a.slowdown:g}x; logs in {log_root}")
    print(f"{'scenario':<10} {'aggregation':<12} {'to target s':>11} {'final acc':>9} {'job s':>7} {'rounds':>6} "
          f"{'MB sent/peer':>12}")
    for (sc, agg), r in results.items():
        name = f"slow {a.slowdown:g}x" if sc == "slow" else sc
        print(f"{name:<10} {agg:<12} {fmt(r['to_target_s']):>11} {r['final_accuracy']:>9.4f} {r['job_s']:>7.1f} "
              f"{r['rounds']:>6} {r['mb_sent_per_peer']:>12.1f}")
    for sc, x in speedups.items():
        if x is not None:
            print(f"{sc}: gossip reached {a.target} {x:.2f}x sooner than ring (ring time / gossip time)")
    return 0


def time_to_target(history: list[tuple[int, float, float, bool, float]], target: float) -> float | None:
    """Seconds from the job's start to the first evaluated round at or above ``target``, over the
    (round, seconds, accuracy, evaluated, distance) rows of a run."""
    for _, t, acc, evaluated, _ in history:
        if evaluated and acc >= target:
            return t
    return None


def speedup(ring: dict[str, Any] | None, gossip: dict[str, Any] | None) -> float | None:
    """Ring's time to target over gossip's (None unless both reached it)."""
    if not ring or not gossip or ring["to_target_s"] is None or not gossip["to_target_s"]:
        return None
    return float(ring["to_target_s"]) / float(gossip["to_target_s"])


def fmt(x: float | None) -> str:
    return "not reached" if x is None else f"{x:.1f}"


if __name__ == "__main__":
    sys.exit(main())
