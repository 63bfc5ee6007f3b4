"""Federated (peer-local) data against shared storage: the same data, task and training, two
placements, final test accuracies side by side.

    python benchmarks/federated.py [--peers 4] [--rounds 50] [--local-steps 4] [--seed 0] [--json]

One local process cluster (a coordinator and ``--peers`` peers) runs two jobs of
``examples/digits_csv.py`` one after the other, with the same rounds, local steps, batch size and
seed:

- ``local``: ``--placement local --local-data digits-csv``: peer ``i`` trains only on its own CSV
  (``dml-peer --data digits-csv=DIR/peer-i``), a label-skewed split (``examples/digits_csv.py``
  ``write_split``: 70% of each class with its home peer);
- ``shared``: the default placement: every peer reads every row (``--data-dir DIR/all``), cut
  into ``--peers`` iid shards.

Both evaluate on the same held-out test rows. Every member trains ``local_steps x batch_size``
samples a round in both jobs, so both see the same number of samples; what differs is which.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import pathlib
import sys
import tempfile
import time
from dataclasses import replace

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))

from dml.client.api import pack_task, status_dict
from dml.client.cluster import LocalCluster
from dml.common.spec import JobSpec
from dml.v1 import types_pb2

ROOT = pathlib.Path(__file__).resolve().parent.parent
TASK = ROOT / "examples" / "digits_csv.py"
NAME = "digits-csv"
DONE = (types_pb2.JOB_STATE_SUCCEEDED, types_pb2.JOB_STATE_FAILED, types_pb2.JOB_STATE_CANCELLED)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The flags; bad ones exit 2."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--peers", type=int, default=4, help="peers, each with its own CSV (default 4)")
    p.add_argument("--rounds", type=int, default=50, help="rounds of each job (default 50)")
    p.add_argument("--local-steps", type=int, default=4, help="local steps per round (default 4)")
    p.add_argument("--seed", type=int, default=0, help="job seed (default 0)")
    p.add_argument("--timeout-s", type=float, default=900, help="give up on a job after this long (default 900)")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    a = p.parse_args(argv)
    if not 2 <= a.peers <= 10:
        p.error("--peers must be between 2 and 10 (the digits have 10 classes)")
    if a.rounds < 1 or a.local_steps < 1 or a.timeout_s <= 0:
        p.error("--rounds, --local-steps and --timeout-s must be positive")
    return a


def _split(folder: pathlib.Path, peers: int) -> list[pathlib.Path]:
    spec = importlib.util.spec_from_file_location("dml_example_digits_csv", TASK)
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.write_split(folder, peers)


def run(client, spec: JobSpec, timeout_s: float) -> dict:
    """Submits ``spec`` (with the task file's code) and waits for its end: final accuracy,
    samples, seconds from submit."""
    spec, code = pack_task(spec)
    t0 = time.monotonic()
    job = client.submit(spec, code)
    while True:
        st = client.status(job).job
        if st.state in DONE:
            break
        if time.monotonic() - t0 > timeout_s:
            raise SystemExit(f"job {job} did not end within {timeout_s:.0f} s: {st.reason}")
        time.sleep(0.5)
    d = status_dict(st)
    if d["state"] != "SUCCEEDED":
        raise SystemExit(f"job {job} ({spec.placement}) ended {d['state']}: {d['reason']}")
    return {"job": job, "accuracy": float(d["metrics"]["test_accuracy"]), "samples": int(d["samples"]),
            "s": time.monotonic() - t0, "data_present": d["data_present"]}


def main(argv: list[str] | None = None) -> int:
    """Entry point."""
    a = parse_args(argv)
    base = JobSpec(task=str(TASK), rounds=a.rounds, local_steps=a.local_steps, min_peers=a.peers, seed=a.seed,
                   eval_every_rounds=5, checkpoint_every_rounds=10)
    with tempfile.TemporaryDirectory(prefix="dml-federated-") as tmp:
        root = pathlib.Path(tmp)
        folders = _split(root / "data", a.peers)
        rows = [sum(1 for _ in open(f / "train.csv")) - 1 for f in folders]
        with LocalCluster(root / "state", root / "logs", cwd=ROOT) as c:
            c.start_coordinator()
            for i, f in enumerate(folders):
                c.start_peer(i, ("--data", f"{NAME}={f}", "--data-dir", str(root / "data" / "all")))
            with c.client(timeout_s=30) as client:
                deadline = time.monotonic() + a.timeout_s  # both jobs start on registered peers
                while len(client.peers()) < a.peers:
                    if time.monotonic() > deadline:
                        raise SystemExit(f"only {len(client.peers())} of {a.peers} peers registered")
                    time.sleep(0.5)
                local = run(client, replace(base, placement="local", local_data=NAME, num_shards=0), a.timeout_s)
                shared = run(client, replace(base, num_shards=a.peers), a.timeout_s)
    out = {"peers": a.peers, "rows_per_peer": rows, "rounds": a.rounds, "local_steps": a.local_steps,
           "seed": a.seed, "local": local, "shared": shared}
    if a.json:
        print(json.dumps(out))
        return 0
    print(f"examples/digits_csv.py (digits), {a.peers} peers, {a.rounds} rounds x {a.local_steps} local steps, "
          f"seed {a.seed}; rows per peer (local, label-skewed) {rows}")
    print(f"{'placement':<40} {'accuracy':>8} {'samples':>8} {'seconds':>8}")
    print(f"{'local (each peer its own CSV)':<40} {local['accuracy']:>8.4f} {local['samples']:>8} {local['s']:>8.1f}")
    print(f"{'shared (every row, iid shards)':<40} {shared['accuracy']:>8.4f} {shared['samples']:>8} "
          f"{shared['s']:>8.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
