"""Final test accuracy on non-IID data: each way of synchronising dml offers, on label-skewed
shards, beside plain averaging on IID shards.

    python benchmarks/noniid.py [--peers 4] [--skew classes:2] [--repeats 1] [--json] [job flags]

Every row is one job on a fresh local process cluster (one coordinator, ``--peers`` peers: shards
are placed by measured capacity, so a cluster that ran another job could place them differently),
with the same task, seed, rounds, local steps, batch size and learning rate, so every row trains on
the same number of samples; only the flags of its row differ:

    iid, plain averaging        --sharding iid
    SKEW, plain averaging       --sharding SKEW
    SKEW, FedProx               --sharding SKEW --prox-mu MU
    SKEW, outer nesterov        --sharding SKEW --outer-optimizer nesterov (--outer-lr, --outer-momentum)
    SKEW, sync grads            --sharding SKEW --sync grads

With ``--repeats R`` the rows run interleaved (all rows with seed S, then all with S + 1, ...) so
a slow stretch of the machine lands on every row alike; the table shows the mean over the repeats
and, past one repeat, the lowest and highest. ``labels/peer`` is how many labels each peer's
shards held in each run (``dml shards``: placement follows measured capacity, so it can differ
between runs). ``--rows`` picks some rows by name.
"""
from __future__ import annotations

import argparse
import json
import pathlib
import statistics
import sys
import tempfile
import time
from dataclasses import replace

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))

from dml.client.api import shards_dict, status_dict
from dml.client.cli import add_job_options, spec_from_args
from dml.client.local import cluster
from dml.common.spec import InvalidSpec, JobSpec, validate
from dml.v1 import types_pb2

ROWS = ("iid", "plain", "prox", "outer", "grads")
DEFAULT_PROX_MU = 0.01  # --prox-mu when not given
DEFAULTS = {"task": "digits-cnn", "rounds": 30, "local_steps": 10, "batch_size": 32, "num_shards": 40}


def row_specs(base: JobSpec, skew: str, prox_mu: float) -> dict[str, tuple[str, JobSpec]]:
    """Each row's label and job spec: ``base`` with the row's sharding and synchronisation."""
    plain = replace(base, sharding=skew, prox_mu=0.0, outer_optimizer="none", sync="params")
    return {
        "iid": ("iid, plain averaging", replace(plain, sharding="iid")),
        "plain": (f"{skew}, plain averaging", plain),
        "prox": (f"{skew}, FedProx mu={prox_mu:g}", replace(plain, prox_mu=prox_mu)),
        "outer": (f"{skew}, outer nesterov lr={base.outer_lr:g} m={base.outer_momentum:g}",
                  replace(plain, outer_optimizer="nesterov")),
        "grads": (f"{skew}, sync grads", replace(plain, sync="grads")),
    }


def run_job(client, spec: JobSpec) -> dict:
    """Runs one job to its end; its final and last-10-round test accuracy, wall time (from the
    job running, so the first job does not count the peers' start-up) and samples."""
    job = client.submit(spec)
    running: list[float] = []
    placed: dict = {}

    def seen(st) -> None:
        if not running and st.state == types_pb2.JOB_STATE_RUNNING:
            running.append(time.monotonic())
        if not placed and st.state == types_pb2.JOB_STATE_RUNNING and st.round >= 1:  # placed while it runs
            placed.update(shards_dict(client.shards(job)))

    end = client.watch(job, seen, max_s=3600)
    took = time.monotonic() - running[0] if running else float("nan")
    d = status_dict(end)
    if d["state"] != "SUCCEEDED":
        raise SystemExit(f"job {job} ({spec.sharding}, sync {spec.sync}) ended {d['state']}: {d['reason']}")
    hist = [r for r in client.history(job) if r.test_evaluated]
    last10 = [r.test_accuracy for r in hist[-10:]]
    return {"job": job, "accuracy": float(d["metrics"]["test_accuracy"]),
            "accuracy_last10": float(statistics.fmean(last10)) if last10 else float("nan"),
            "s": took, "samples": int(d["samples"]),
            "labels_per_peer": sorted(sum(1 for n in p["label_counts"] or [] if n) for p in placed.get("peers", []))}


def parse_args(argv: list[str] | None = None) -> tuple[argparse.Namespace, JobSpec, dict[str, tuple[str, JobSpec]]]:
    """The flags, the base spec, and the rows to run (label, spec) by name; bad flags exit 2."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--peers", type=int, default=4, help="peers of the local cluster (default 4)")
    p.add_argument("--skew", default="classes:2", help="the non-IID sharding of the skewed rows (default classes:2)")
    p.add_argument("--rows", default=",".join(ROWS), help=f"rows to run, comma-separated, from {', '.join(ROWS)}")
    p.add_argument("--repeats", type=int, default=1, help="runs of every row, seeds --seed, --seed + 1, ... (default 1)")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    add_job_options(p)
    p.set_defaults(**DEFAULTS)
    a = p.parse_args(argv)
    if a.peers < 1 or a.repeats < 1:
        p.error("--peers and --repeats must be at least 1")
    if a.min_peers is None:
        a.min_peers = a.peers
    rows = [r.strip() for r in a.rows.split(",") if r.strip()]
    bad = [r for r in rows if r not in ROWS]
    if bad or not rows:
        p.error(f"--rows: unknown {', '.join(bad) or '(none)'}; choose from {', '.join(ROWS)}")
    base = spec_from_args(a)
    specs = {k: v for k, v in row_specs(base, a.skew, base.prox_mu or DEFAULT_PROX_MU).items() if k in rows}
    for name, (_, spec) in specs.items():
        try:
            validate(spec)
        except InvalidSpec as e:
            p.error(f"row {name}: {e}")
    return a, base, specs


def run_on_cluster(peers: int, spec: JobSpec) -> dict:
    """Runs one job on a fresh local cluster: shards are placed by the peers' measured capacity,
    so a cluster that ran an earlier row could place this row's samples differently."""
    with tempfile.TemporaryDirectory(prefix="dml-noniid-") as tmp:
        with cluster(peers, 0, pathlib.Path(tmp), pathlib.Path(tmp) / "logs") as (_, _, c):
            with c.client(timeout_s=30) as client:
                return run_job(client, spec)


def main(argv: list[str] | None = None) -> None:
    """Entry point."""
    a, base, specs = parse_args(argv)
    runs: dict[str, list[dict]] = {k: [] for k in specs}
    for rep in range(a.repeats):
        for name, (label, spec) in specs.items():
            got = run_on_cluster(a.peers, replace(spec, seed=base.seed + rep))
            runs[name].append(got)
            print(f"repeat {rep + 1}/{a.repeats} {label}: accuracy {got['accuracy']:.4f} "
                  f"({got['s']:.1f} s, labels per peer {got['labels_per_peer']})", file=sys.stderr)

    out = {"task": base.task, "peers": a.peers, "skew": a.skew, "rounds": base.rounds,
           "local_steps": base.local_steps, "batch_size": base.batch_size, "learning_rate": base.learning_rate,
           "num_shards": base.num_shards, "seed": base.seed, "repeats": a.repeats, "rows": []}
    for name, (label, spec) in specs.items():
        accs = [r["accuracy"] for r in runs[name]]
        out["rows"].append({"row": name, "label": label, "sharding": spec.sharding, "sync": spec.sync,
                            "prox_mu": spec.prox_mu, "outer_optimizer": spec.outer_optimizer,
                            "accuracy": statistics.fmean(accs), "accuracy_min": min(accs), "accuracy_max": max(accs),
                            "accuracy_last10": statistics.fmean(r["accuracy_last10"] for r in runs[name]),
                            "s": statistics.fmean(r["s"] for r in runs[name]),
                            "samples": runs[name][0]["samples"], "runs": runs[name]})
    if a.json:
        print(json.dumps(out))
        return
    lr = f"lr {base.learning_rate:g}" if base.learning_rate else "the task's lr"
    print(f"task {base.task}, {a.peers} peers, {base.rounds} rounds x {base.local_steps} local steps, batch "
          f"{base.batch_size}, {lr}, {base.num_shards} shards, seed {base.seed}"
          + (f", {a.repeats} repeats (mean [min, max])" if a.repeats > 1 else ""))
    width = max(len(r["label"]) for r in out["rows"]) + 2
    print(f"{'run':<{width}} {'test acc':>9} {'last 10':>8} {'samples':>9} {'wall s':>7}  labels/peer"
          + ("  range" if a.repeats > 1 else ""))
    for r in out["rows"]:
        rng = f"  [{r['accuracy_min']:.4f}, {r['accuracy_max']:.4f}]" if a.repeats > 1 else ""
        labels = " ".join(",".join(map(str, x["labels_per_peer"])) for x in r["runs"])
        print(f"{r['label']:<{width}} {r['accuracy']:>9.4f} {r['accuracy_last10']:>8.4f} {r['samples']:>9} {r['s']:>7.1f}"
              f"  {labels:<11}{rng}")


if __name__ == "__main__":
    main()
