"""dml with N peers against the same model trained in one process on the same number of samples.

    python benchmarks/accuracy.py [--peers 3] [--codecs fp32,int8] [job flags as for `dml submit`]

Prints one table: test accuracy (of the last round, and the mean over the last 10 rounds), wall
time and samples, for dml once per wire codec and for one process. The single-process baseline
runs the same task, model, seed, batch size and learning rate for peers x rounds x local_steps
steps. With several codecs it also prints each one's gap to the first (fp32 by default).
"""
from __future__ import annotations

import argparse
import json
import pathlib
import sys
import tempfile
import time
from dataclasses import replace

import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))

from dml.client.cli import add_job_options, spec_from_args
from dml.client.api import status_dict
from dml.client.local import cluster
from dml.common.spec import CODECS, JobSpec


def run_dml(spec: JobSpec, peers: int) -> tuple[float, float, float, int]:
    """Runs the job on a local process cluster; returns (last-round test accuracy, mean over the
    last 10 rounds, seconds, samples)."""
    with tempfile.TemporaryDirectory(prefix="dml-bench-") as tmp:
        with cluster(peers, 0, pathlib.Path(tmp), pathlib.Path(tmp) / "logs") as (address, _, c):
            t0 = time.monotonic()
            with c.client(timeout_s=30) as client:
                job = client.submit(spec)
                end = client.watch(job, lambda st: None, max_s=3600)
                took = time.monotonic() - t0
                d = status_dict(end)
                if d["state"] != "SUCCEEDED":
                    raise SystemExit(f"dml job ended {d['state']}: {d['reason']}")
                hist = client.history(job)
            last10 = [r.test_accuracy for r in hist[-10:]]
            return float(d["metrics"]["test_accuracy"]), float(np.mean(last10)), took, int(d["samples"])


def run_single(spec: JobSpec, steps: int) -> tuple[float, float, int]:
    """Trains the same model in this process for ``steps`` steps; returns (accuracy, seconds, samples)."""
    import torch

    from dml.common.tasks import get_task
    from dml.peer.trainer import Trainer

    torch.set_num_threads(1)
    t0 = time.monotonic()
    task = get_task(spec.task)
    tr = Trainer(task, spec.seed, spec.learning_rate)
    rng = np.random.default_rng(spec.seed)
    res = tr.train(np.arange(tr.train_data.size), steps, spec.batch_size or task.default_batch_size, rng)
    acc, _ = tr.evaluate()
    return acc, time.monotonic() - t0, res.samples


def main() -> None:
    """Entry point."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--peers", type=int, default=3)
    p.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    p.add_argument("--codecs", default="",
                   help="comma-separated wire codecs to run dml with, one job each (default: --codec's)")
    add_job_options(p)
    a = p.parse_args()
    if a.min_peers is None:
        a.min_peers = a.peers
    codecs = [c.strip() for c in a.codecs.split(",") if c.strip()] or [a.codec]
    bad = [c for c in codecs if c not in CODECS]
    if bad:
        p.error(f"--codecs: unknown {', '.join(bad)}; choose from {', '.join(CODECS)}")
    spec = spec_from_args(a)
    runs = {c: run_dml(replace(spec, codec=c), a.peers) for c in codecs}
    acc_s, t_s, n_s = run_single(spec, spec.rounds * spec.local_steps * a.peers)
    first = codecs[0]
    row = {"task": spec.task, "peers": a.peers, "rounds": spec.rounds, "local_steps": spec.local_steps,
           "single_accuracy": acc_s, "single_samples": n_s, "single_s": t_s,
           "dml": {c: {"accuracy": r[0], "accuracy_last10": r[1], "s": r[2], "samples": r[3],
                       "gap_points_vs_single": 100 * (acc_s - r[0]),
                       f"gap_points_vs_{first}": 100 * (runs[first][0] - r[0])} for c, r in runs.items()}}
    if a.json:
        print(json.dumps(row))
        return
    print(f"task {spec.task}, {spec.rounds} rounds x {spec.local_steps} local steps, batch {spec.batch_size}, "
          f"lr {spec.learning_rate}, sharding {spec.sharding}")
    print(f"{'run':<30} {'test acc':>9} {'last 10':>8} {'samples':>9} {'wall s':>8}")
    for c, (acc, acc10, t, n) in runs.items():
        print(f"{f'dml, {a.peers} peers (ring, {c})':<30} {acc:>9.4f} {acc10:>8.4f} {n:>9} {t:>8.1f}")
    print(f"{'single process':<30} {acc_s:>9.4f} {'':>8} {n_s:>9} {t_s:>8.1f}")
    for c, (acc, acc10, _, _) in runs.items():
        print(f"gap: {100 * (acc_s - acc):+.2f} points (single minus dml {c})"
              + (f"; {100 * (runs[first][0] - acc):+.2f} points last round, {100 * (runs[first][1] - acc10):+.2f} "
                 f"last 10 ({first} minus {c})" if c != first else ""))


if __name__ == "__main__":
    main()
