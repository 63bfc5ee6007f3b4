"""dml with N peers against the same model trained in one process on the same number of samples.

    python benchmarks/accuracy.py [--peers 3] [--codecs fp32,int8] [job flags as for `dml submit`]
    python benchmarks/accuracy.py --task examples/cnn.py --rounds 30

Prints one table: test accuracy (of the last round, and the mean over the last 10 rounds), wall
time and samples, for dml once per wire codec and for one process, then the task's own test
metrics of each. The single-process baseline runs the same task, model, optimizer, seed, batch
size and learning rate for peers x rounds x local_steps steps; a task file (``--task PATH.py``)
is sent with the job to the peers, and the baseline loads it the way a peer does (packed into
its bundle, then imported from it). Both read the task's data from the working directory (the
peers' ``--data-dir``). The target: the first codec within 1 point of the single process. With
several codecs it also prints each one's gap to the first (fp32 by default).
"""
from __future__ import annotations

import argparse
import json
import pathlib
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import replace

import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))

from dml.client.cli import add_job_options, spec_from_args
from dml.client.api import status_dict
from dml.client.local import cluster
from dml.common.spec import CODECS, JobSpec, task_kind
from dml.common.task import Context, Task


TARGET_GAP_POINTS = 1.0  # dml (the first codec) within this many points of the single process


def run_dml(spec: JobSpec, peers: int) -> tuple[float, float, float, int, dict[str, float]]:
    """Runs the job on a local process cluster; returns (last-round test accuracy, mean over the
    last 10 rounds, seconds, samples, the task's own test metrics)."""
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
            return (float(d["metrics"]["test_accuracy"]), float(np.mean(last10)), took, int(d["samples"]),
                    dict(d["metrics"]["test_metrics"]))


def load_task(spec: JobSpec) -> tuple[Task, Callable[[], None]]:
    """The job's task, loaded the way a peer loads it: a task file or package is packed into
    the bundle ``dml submit`` sends, then imported from that bundle; a built-in task or
    ``module:NAME`` is resolved by name. Returns the task and what cleans up after it."""
    from dml.peer.taskload import resolve

    if task_kind(spec.task) != "code":
        return resolve(spec.task), lambda: None
    from dml.client.api import pack_task
    from dml.common import taskcode
    from dml.peer.taskload import CodeCache

    packed, code = pack_task(spec)
    cache = CodeCache()
    return cache.task(taskcode.parse_ref(packed.task), packed.task_digest, lambda: code), cache.close


def run_single(spec: JobSpec, steps: int) -> tuple[float, float, int, dict[str, float]]:
    """Trains the same model in this process for ``steps`` steps; returns (accuracy, seconds,
    samples, the task's own test metrics)."""
    import torch

    from dml.peer.trainer import Trainer

    torch.set_num_threads(1)
    t0 = time.monotonic()
    task, cleanup = load_task(spec)
    try:
        tr = Trainer(task, spec.seed, spec.learning_rate, ctx=Context(data_dir=pathlib.Path.cwd(), seed=spec.seed))
        rng = np.random.default_rng(spec.seed)
        res = tr.train(np.arange(tr.train_data.size), steps, spec.batch_size or task.default_batch_size, rng)
        ev = tr.evaluate()
    finally:
        cleanup()
    return ev.accuracy, time.monotonic() - t0, res.samples, ev.metrics


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
    acc_s, t_s, n_s, metrics_s = run_single(spec, spec.rounds * spec.local_steps * a.peers)
    first = codecs[0]
    gap = 100 * (acc_s - runs[first][0])
    row = {"task": spec.task, "peers": a.peers, "rounds": spec.rounds, "local_steps": spec.local_steps,
           "single_accuracy": acc_s, "single_samples": n_s, "single_s": t_s, "single_test_metrics": metrics_s,
           "target_gap_points": TARGET_GAP_POINTS, "target_ok": abs(gap) <= TARGET_GAP_POINTS,
           "dml": {c: {"accuracy": r[0], "accuracy_last10": r[1], "s": r[2], "samples": r[3], "test_metrics": r[4],
                       "gap_points_vs_single": 100 * (acc_s - r[0]),
                       f"gap_points_vs_{first}": 100 * (runs[first][0] - r[0])} for c, r in runs.items()}}
    if a.json:
        print(json.dumps(row))
        return
    own = "the task's"
    print(f"task {spec.task}, {spec.rounds} rounds x {spec.local_steps} local steps, batch {spec.batch_size or own}, "
          f"lr {spec.learning_rate or own}, sharding {spec.sharding}")
    print(f"{'run':<30} {'test acc':>9} {'last 10':>8} {'samples':>9} {'wall s':>8}")
    for c, (acc, acc10, t, n, _) in runs.items():
        print(f"{f'dml, {a.peers} peers (ring, {c})':<30} {acc:>9.4f} {acc10:>8.4f} {n:>9} {t:>8.1f}")
    print(f"{'single process':<30} {acc_s:>9.4f} {'':>8} {n_s:>9} {t_s:>8.1f}")
    names = sorted(set(metrics_s).union(*(r[4] for r in runs.values())))
    if names:
        print(f"{'task metrics (last round)':<30} " + " ".join(f"{k:>9}" for k in names))
        for c, r in runs.items():
            print(f"{f'dml ({c})':<30} " + " ".join(f"{r[4].get(k, float('nan')):>9.4f}" for k in names))
        print(f"{'single process':<30} " + " ".join(f"{metrics_s.get(k, float('nan')):>9.4f}" for k in names))
    print(f"target: dml ({first}) within {TARGET_GAP_POINTS:g} point of the single process: {gap:+.2f} -> "
          f"{'ok' if row['target_ok'] else 'NOT ok'}")
    for c, (acc, acc10, _, _, _) in runs.items():
        print(f"gap: {100 * (acc_s - acc):+.2f} points (single minus dml {c})"
              + (f"; {100 * (runs[first][0] - acc):+.2f} points last round, {100 * (runs[first][1] - acc10):+.2f} "
                 f"last 10 ({first} minus {c})" if c != first else ""))


if __name__ == "__main__":
    main()
