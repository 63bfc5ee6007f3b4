"""Gossip simulation benchmark: how fast many peers reach consensus on each topology.

    python benchmarks/gossip_sim.py [--peers 32] [--steps 60] [--topologies uniform,ring,exponential]
                                    [--dim 1000] [--seed 0] [--lr 0] [--every 10] [--csv out.csv]

Runs :func:`aggregation.gossip_sim.simulate` once per topology, in one process, with the real
gossip code (partner choice, the exchange slot, two-phase pairwise averaging) over the in-memory
transport. Every topology starts from the same random float32 vectors (they depend on the seed,
the peer count and the dimension only). A step is one synchronous tick: every peer, in a seeded
random order, asks its candidates until one accepts, then all matched pairs average; within a
step a peer is in at most one exchange. ``--lr`` > 0 adds a local gradient step on a per-peer
quadratic before each exchange (decentralized SGD); the distance then settles at a floor
instead of falling to 0.

The consensus distance is ``sqrt(mean_i ||x_i - xbar||^2)`` (unnormalised; see
:func:`aggregation.gossip.consensus_distance`). ``--csv`` writes one row per topology and step
(``topology,peers,step,consensus_distance``, step 0 before any exchange). The summary table gives,
per topology, the distance at step 0, the distance relative to step 0 every ``--every`` steps, the
mean exchanges per step, the fitted geometric rate per step (``exp`` of the least-squares slope
of log distance over the steps above 1e-6 of the start, where float32 rounding is not yet in the
way) with its R^2, and the first step at which the distance is at most 1e-3 of the start (``-``
if never). Exit codes: 0 done, 1 the CSV could not be written, 2 bad flags.
"""
from __future__ import annotations

import argparse
import csv
import pathlib
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from dml.aggregation.gossip_sim import SimResult, fit_rate, simulate, steps_to
from dml.aggregation.topology import TOPOLOGY_NAMES, parse_topology

TARGET_FRACTION = 1e-3  # "steps to reach" this fraction of the starting distance
FIT_FLOOR = 1e-6  # the rate fit ignores steps below this fraction of the start


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Parses and checks the flags; exits 2 with a message on bad ones."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    ap.add_argument("--peers", type=int, default=32, help="simulated peers (>= 2; default 32)")
    ap.add_argument("--steps", type=int, default=60, help="gossip steps (>= 1; default 60)")
    ap.add_argument("--topologies", default="uniform,ring,exponential",
                    help=f"comma-separated, from {','.join(TOPOLOGY_NAMES)}")
    ap.add_argument("--dim", type=int, default=1000, help="parameters per peer (>= 1; default 1000)")
    ap.add_argument("--seed", type=int, default=0, help="seed of the start vectors and the step order")
    ap.add_argument("--lr", type=float, default=0.0, help="local quadratic step size in [0, 1] (default 0: pure averaging)")
    ap.add_argument("--every", type=int, default=10, help="summary column every N steps (default 10)")
    ap.add_argument("--csv", type=pathlib.Path, default=None, help="write topology,peers,step,consensus_distance here")
    args = ap.parse_args(argv)
    if args.peers < 2:
        ap.error(f"--peers must be >= 2, got {args.peers}")
    if args.steps < 1:
        ap.error(f"--steps must be >= 1, got {args.steps}")
    if args.dim < 1:
        ap.error(f"--dim must be >= 1, got {args.dim}")
    if args.every < 1:
        ap.error(f"--every must be >= 1, got {args.every}")
    if not 0 <= args.lr <= 1:  # also rejects nan
        ap.error(f"--lr must be in [0, 1], got {args.lr}")
    names = [s.strip() for s in args.topologies.split(",") if s.strip()]
    if not names:
        ap.error("--topologies is empty")
    try:
        topologies = [parse_topology(s).value for s in names]
    except ValueError as e:
        ap.error(f"--topologies: {e}")
    if len(set(topologies)) != len(topologies):
        ap.error(f"--topologies repeats a name: {args.topologies}")
    args.topologies = topologies
    if args.csv is not None and not args.csv.resolve().parent.is_dir():
        ap.error(f"--csv: directory {args.csv.resolve().parent} does not exist")
    return args


def write_csv(path: pathlib.Path, results: list[SimResult], peers: int) -> None:
    """Writes one row per topology and step."""
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["topology", "peers", "step", "consensus_distance"])
        for r in results:
            for step, d in enumerate(r.distances):
                w.writerow([r.topology, peers, step, repr(d)])


def summary(results: list[SimResult], every: int) -> str:
    """The summary table, one line per topology."""
    steps = len(results[0].distances) - 1
    marks = list(range(every, steps + 1, every))
    head = ["topology", "d@0"] + [f"d@{t}/d@0" for t in marks] + ["exch/step", "rate/step", "R^2", f"steps to {TARGET_FRACTION:g}"]
    rows = [head]
    for r in results:
        d0 = r.distances[0]
        try:
            rate, r2 = fit_rate(r.distances, FIT_FLOOR)
            fit = [f"{rate:.4f}", f"{r2:.3f}"]
        except ValueError:
            fit = ["-", "-"]
        reach = steps_to(r.distances, TARGET_FRACTION)
        exch = sum(s.exchanges for s in r.steps) / max(len(r.steps), 1)
        rows.append([r.topology, f"{d0:.4g}"] + [f"{r.distances[t] / d0:.2e}" for t in marks]
                    + [f"{exch:.1f}", *fit, "-" if reach is None else str(reach)])
    widths = [max(len(row[i]) for row in rows) for i in range(len(head))]
    return "\n".join("  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(row, widths)))
                     for row in rows)


def main(argv: list[str] | None = None) -> int:
    """Runs the simulations, writes the CSV, prints the summary; returns the exit code."""
    args = parse_args(argv)
    results = []
    t0 = time.perf_counter()
    for name in args.topologies:
        results.append(simulate(args.peers, args.steps, name, args.dim, args.seed, lr=args.lr))
    wall = time.perf_counter() - t0
    if args.csv is not None:
        try:
            write_csv(args.csv, results, args.peers)
        except OSError as e:
            print(f"gossip_sim: cannot write {args.csv}: {e}", file=sys.stderr)
            return 1
    print(f"gossip simulation: {args.peers} peers, {args.steps} steps, dim {args.dim}, seed {args.seed}, "
          f"lr {args.lr:g} ({wall:.2f}s)")
    print(summary(results, args.every))
    if args.csv is not None:
        print(f"wrote {args.csv}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
