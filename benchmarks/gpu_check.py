"""GPU check: a ring that mixes CUDA and CPU peers trains, and every member ends bit-identical.

    python benchmarks/gpu_check.py [--gpu-peers 2] [--cpu-peers 1] [--codecs fp32,bf16] [--rounds 40]

For each codec it runs one job on a local cluster (a coordinator, ``--cpu-peers`` peers with
``--device cpu`` and ``--gpu-peers`` with ``--device cuda``) and prints the job's end state, the
final test accuracy, the members of every round and the median train / exchange time. A round
commits only when every member reports the same sha256 of its parameters, so a job that commits
every round with all members proves CPU and GPU peers bit-identical after each round. Exits 1 if
a job fails or a round commits with fewer members; 2 if no CUDA device is visible.
"""
from __future__ import annotations

import argparse
import json
import pathlib
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from dml.client.api import status_dict
from dml.client.cluster import reap
from dml.common.lifeline import Lifeline
from dml.client.local import cluster
from dml.common.spec import CODECS, JobSpec


LIFELINE = Lifeline()  # the GPU peers stop when this process dies, however it dies


def run(codec: str, a: argparse.Namespace, tmp: pathlib.Path) -> dict[str, object]:
    """One job on a fresh mixed cluster; returns its summary."""
    logs = tmp / codec / "logs"
    with cluster(a.cpu_peers, 0, tmp / codec, logs) as (address, procs, c):
        gpu = [subprocess.Popen([sys.executable, "-m", "dml.peer.cli", "--coordinator", address, "--host", "127.0.0.1",
                                 "--port", "0", "--device", "cuda", "--join-token-file", str(c.join_token_file)],
                                stdout=open(logs / f"gpu-peer-{i}.log", "ab"), stderr=subprocess.STDOUT,
                                **LIFELINE.child(dict(c.client_env(), PYTHONUNBUFFERED="1")))
               for i in range(a.gpu_peers)]
        try:
            n = a.cpu_peers + a.gpu_peers
            spec = JobSpec(rounds=a.rounds, min_peers=n, codec=codec, task=a.task, learning_rate=a.lr)
            t0 = time.monotonic()
            with c.client(timeout_s=60) as client:
                job = client.submit(spec)
                end = client.watch(job, lambda st: None, max_s=a.timeout_s)
                took = time.monotonic() - t0
                hist = client.history(job)
        finally:
            reap(gpu)
    d = status_dict(end)
    members = sorted({r.members for r in hist})
    return {"codec": codec, "state": d["state"], "reason": d["reason"], "rounds": len(hist),
            "members_per_round": members, "all_members_every_round": members == [n],
            "test_accuracy": d["metrics"]["test_accuracy"], "job_s": round(took, 2),
            "train_ms_median": statistics.median(r.train_ms for r in hist) if hist else None,
            "exchange_ms_median": statistics.median(r.exchange_ms for r in hist) if hist else None,
            "final_digest": hist[-1].digest if hist else ""}


def main() -> int:
    """Entry point."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--gpu-peers", type=int, default=2)
    p.add_argument("--cpu-peers", type=int, default=1)
    p.add_argument("--codecs", default="fp32,bf16")
    p.add_argument("--rounds", type=int, default=40)
    p.add_argument("--task", default="digits")
    p.add_argument("--lr", type=float, default=0.1)
    p.add_argument("--timeout-s", type=float, default=300.0)
    a = p.parse_args()
    codecs = [c for c in a.codecs.split(",") if c]
    if any(c not in CODECS for c in codecs) or a.gpu_peers < 0 or a.cpu_peers < 0 or a.gpu_peers + a.cpu_peers < 1:
        p.error(f"--codecs from {', '.join(CODECS)}; peer counts >= 0, at least one peer")
    import torch

    if a.gpu_peers and not torch.cuda.is_available():
        print("gpu_check: no CUDA device visible", file=sys.stderr)
        return 2
    print(f"# torch {torch.__version__}, device {torch.cuda.get_device_name(0) if a.gpu_peers else 'cpu'}; "
          f"{a.gpu_peers} CUDA + {a.cpu_peers} CPU peers, task {a.task}, {a.rounds} rounds", flush=True)
    ok = True
    with tempfile.TemporaryDirectory(prefix="dml-gpu-check-") as tmp:
        for codec in codecs:
            row = run(codec, a, pathlib.Path(tmp))
            print(json.dumps(row), flush=True)
            ok = ok and row["state"] == "SUCCEEDED" and bool(row["all_members_every_round"])
    print("ok: every round committed with every member agreeing bit for bit" if ok else "FAILED", flush=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
