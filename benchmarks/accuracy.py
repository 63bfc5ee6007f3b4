"""dml with N peers against the same model trained in one process on the same number of samples.

    python benchmarks/accuracy.py [--peers 3] [job flags as for `dml submit`]

Prints one table: test accuracy, wall time and samples for both. The single-process baseline runs
the same task, model, seed, batch size and learning rate for peers x rounds x local_steps steps.
"""
from __future__ import annotations

import argparse
import json
import pathlib
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))

from coordinator import jobctl  # noqa: E402
from coordinator.local import cluster  # noqa: E402
from coordinator.spec import JobSpec  # noqa: E402


def run_dml(spec: JobSpec, peers: int) -> tuple[float, float, int]:
    """Runs the job on a local process cluster; returns (test accuracy, seconds, samples)."""
    with tempfile.TemporaryDirectory(prefix="dml-bench-") as tmp:
        with cluster(peers, 0, pathlib.Path(tmp), pathlib.Path(tmp) / "logs") as (address, _):
            t0 = time.monotonic()
            job = jobctl.submit(address, spec, timeout=30)
            end = jobctl.watch(address, job, 10, lambda st: None, max_s=3600)
            took = time.monotonic() - t0
            d = jobctl.status_dict(end)
            if d["state"] != "SUCCEEDED":
                raise SystemExit(f"dml job ended {d['state']}: {d['reason']}")
            return float(d["metrics"]["test_accuracy"]), took, int(d["samples"])


def run_single(spec: JobSpec, steps: int) -> tuple[float, float, int]:
    """Trains the same model in this process for ``steps`` steps; returns (accuracy, seconds, samples)."""
    import torch

    from peer.tasks import get_task
    from peer.trainer import Trainer

    torch.set_num_threads(1)
    t0 = time.monotonic()
    tr = Trainer(get_task(spec.task), spec.seed, spec.learning_rate)
    rng = np.random.default_rng(spec.seed)
    res = tr.train(np.arange(tr.data.y_train.size), steps, spec.batch_size, rng)
    acc, _ = tr.evaluate()
    return acc, time.monotonic() - t0, res.samples


def main() -> None:
    """Entry point."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--peers", type=int, default=3)
    p.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    jobctl.add_job_options(p)
    a = p.parse_args()
    if a.min_peers is None:
        a.min_peers = a.peers
    spec = jobctl.spec_from_args(a)
    acc_d, t_d, n_d = run_dml(spec, a.peers)
    acc_s, t_s, n_s = run_single(spec, spec.rounds * spec.local_steps * a.peers)
    row = {"task": spec.task, "peers": a.peers, "rounds": spec.rounds, "local_steps": spec.local_steps,
           "dml_accuracy": acc_d, "single_accuracy": acc_s, "gap_points": 100 * (acc_s - acc_d),
           "dml_samples": n_d, "single_samples": n_s, "dml_s": t_d, "single_s": t_s}
    if a.json:
        print(json.dumps(row))
        return
    print(f"task {spec.task}, {spec.rounds} rounds x {spec.local_steps} local steps, batch {spec.batch_size}, "
          f"lr {spec.learning_rate}, sharding {spec.sharding}")
    print(f"{'run':<26} {'test acc':>9} {'samples':>9} {'wall s':>8}")
    print(f"{f'dml, {a.peers} peers (ring)':<26} {acc_d:>9.4f} {n_d:>9} {t_d:>8.1f}")
    print(f"{'single process':<26} {acc_s:>9.4f} {n_s:>9} {t_s:>8.1f}")
    print(f"gap: {row['gap_points']:+.2f} points (single minus dml)")


if __name__ == "__main__":
    main()
