"""GPU check: one prepared script for a machine with one or more CUDA devices, under 10 minutes.

    python benchmarks/gpu_check.py [--only cnn,mixed,torch,workers] [--rounds 30] [--timeout-s 150]

Each check is one job on a fresh local cluster (a coordinator and peer processes on 127.0.0.1,
TLS on as always). A round commits only when every member reports the same digest of its
parameters, so a job whose every round committed with every member proves its CUDA and CPU
members bit-identical after each round.

- ``cnn``: a CUDA peer and a CPU peer train the CNN example (``examples/cnn.py``, sent as task
  code) on the fp32 ring: bit-identical across devices, and the accuracy it reaches.
- ``mixed``: two CUDA peers and a CPU peer on digits, for each codec of ``--codecs`` (fp32 and
  bf16: the codecs whose decoded values every member computes the same way).
- ``torch``: ``--data-plane torch`` against dml's TCP ring, both CUDA peers, on ``synthetic:SIZE``
  (``--torch-task``): the median exchange time per round side by side and the backend the
  process group used (NCCL when each peer has a GPU of its own, so with two or more devices;
  gloo through host buffers when they share one, since NCCL refuses two ranks on one GPU).
- ``workers``: a peer with two workers (``--gpus 0,1`` with two devices, DDP over NCCL; else
  ``--gpus 0,0``, both on the one GPU, DDP over gloo) beside a one-worker CUDA peer.

Prints one JSON line per check, then ``ok`` or ``FAILED``. Exits 1 if a check fails, 2 if no
CUDA device is visible or the flags are wrong.
"""
from __future__ import annotations

import argparse
import json
import pathlib
import re
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from dml.client.api import status_dict  # noqa: E402
from dml.client.cluster import LocalCluster  # noqa: E402
from dml.common.spec import JobSpec  # noqa: E402

CHECKS = ("cnn", "mixed", "torch", "workers")
LOSSLESS_ACROSS_DEVICES = ("fp32", "bf16")


def job(tmp: pathlib.Path, name: str, peers: Sequence[Sequence[str]], spec: JobSpec,
        timeout_s: float) -> dict[str, object]:
    """Runs ``spec`` on a fresh cluster whose peer ``i`` gets the flags ``peers[i]``; returns
    the job's summary (state, rounds, members per round, accuracy, median train/exchange ms,
    the process-group backends the peers logged)."""
    logs = tmp / name / "logs"
    with LocalCluster(tmp / name / "state", logs, peer_args=(), allow_job_code=True, cwd=tmp / name) as c:
        c.start_coordinator()
        for i, args in enumerate(peers):
            c.start_peer(i, tuple(args))
        t0 = time.monotonic()
        with c.client(timeout_s=60) as client:
            jid = client.submit(spec)
            end = client.watch(jid, lambda st: None, max_s=timeout_s)
            took = time.monotonic() - t0
            hist = client.history(jid)
    text = "".join(p.read_text(errors="replace") for p in logs.glob("peer-*.log"))
    d = status_dict(end)
    members = sorted({r.members for r in hist})
    return {"check": name, "state": d["state"], "reason": d["reason"], "rounds": len(hist),
            "members_per_round": members, "all_members_every_round": members == [len(peers)],
            "test_accuracy": d["metrics"].get("test_accuracy"), "job_s": round(took, 1),
            "train_ms_median": statistics.median(r.train_ms for r in hist) if hist else None,
            "exchange_ms_median": statistics.median(r.exchange_ms for r in hist) if hist else None,
            "backends": sorted(set(re.findall(r"process group formed \((\w+)", text))),
            "final_digest": hist[-1].digest if hist else ""}


def passed(row: dict[str, object], rounds: int) -> bool:
    """Succeeded, every round committed, every member in each."""
    return row["state"] == "SUCCEEDED" and row["rounds"] == rounds and bool(row["all_members_every_round"])


def main() -> int:
    """Entry point."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--only", default=",".join(CHECKS), help=f"comma-separated checks from {', '.join(CHECKS)}")
    p.add_argument("--codecs", default=",".join(LOSSLESS_ACROSS_DEVICES))
    p.add_argument("--rounds", type=int, default=30)
    p.add_argument("--torch-task", default="synthetic:10M")
    p.add_argument("--timeout-s", type=float, default=150.0, help="the most one job may take")
    p.add_argument("--cpu-rehearsal", action="store_true",
                   help="run every check with CPU peers in place of CUDA ones (no GPU needed): proves the "
                        "script itself works before GPU time is spent on it")
    a = p.parse_args()
    only = [c for c in a.only.split(",") if c]
    codecs = [c for c in a.codecs.split(",") if c]
    if not only or any(c not in CHECKS for c in only) or any(c not in LOSSLESS_ACROSS_DEVICES for c in codecs) \
            or a.rounds < 1 or a.timeout_s <= 0:
        p.error(f"--only from {', '.join(CHECKS)}; --codecs from {', '.join(LOSSLESS_ACROSS_DEVICES)}; "
                "--rounds >= 1; --timeout-s > 0")
    import torch

    cpu = ("--device", "cpu", "--allow-torch-plane")
    if a.cpu_rehearsal:
        n_gpu, second = 1, "cpu"
        cuda = lambda dev: cpu  # noqa: E731 - a flag set, named
        print(f"# torch {torch.__version__}, CPU rehearsal: CPU peers stand in for CUDA ones", flush=True)
    else:
        if not torch.cuda.is_available():
            print("gpu_check: no CUDA device visible (--cpu-rehearsal runs the checks on CPU peers)", file=sys.stderr)
            return 2
        n_gpu = torch.cuda.device_count()
        second = "cuda:1" if n_gpu > 1 else "cuda:0"
        cuda = lambda dev: ("--device", dev, "--allow-torch-plane")  # noqa: E731 - a flag set, named
        print(f"# torch {torch.__version__}, {n_gpu} x {torch.cuda.get_device_name(0)}; {a.rounds} rounds a job",
              flush=True)
    rows: list[tuple[dict[str, object], bool]] = []
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="dml-gpu-check-") as tmp_s:
        tmp = pathlib.Path(tmp_s)

        def check(name: str, peers: Sequence[Sequence[str]], spec: JobSpec, extra_ok: bool = True,
                  **note: object) -> dict[str, object]:
            row = job(tmp, name, peers, spec, a.timeout_s)
            row.update(note)
            ok = passed(row, spec.rounds) and extra_ok
            rows.append((row, ok))
            print(json.dumps(row), flush=True)
            return row

        if "cnn" in only:
            check("cnn", [cuda("cuda:0"), cpu], JobSpec(rounds=a.rounds, min_peers=2, task="examples/cnn.py"))
        if "mixed" in only:
            for codec in codecs:
                check(f"mixed-{codec}", [cuda("cuda:0"), cuda(second), cpu],
                      JobSpec(rounds=a.rounds, min_peers=3, codec=codec, learning_rate=0.1))
        if "torch" in only:
            rounds = max(5, a.rounds // 3)
            spec = JobSpec(rounds=rounds, min_peers=2, task=a.torch_task, data_plane="torch")
            t = check("torch", [cuda("cuda:0"), cuda(second)], spec)
            want = "nccl" if n_gpu > 1 else "gloo"
            if t["backends"] != [want]:
                rows[-1] = (t, False)
                print(f"gpu_check: the torch plane formed {t['backends']}, expected [{want!r}] with {n_gpu} GPU(s)",
                      flush=True)
            r = check("tcp", [cuda("cuda:0"), cuda(second)],
                      JobSpec(rounds=rounds, min_peers=2, task=a.torch_task, data_plane="tcp"))
            if t["exchange_ms_median"] and r["exchange_ms_median"]:
                print(f"# exchange per round, {a.torch_task}: torch plane ({want}) {t['exchange_ms_median']:.1f} ms, "
                      f"tcp ring {r['exchange_ms_median']:.1f} ms, ratio {t['exchange_ms_median'] / r['exchange_ms_median']:.2f}",
                      flush=True)
        if "workers" in only:
            if a.cpu_rehearsal:
                host: tuple[str, ...] = ("--workers", "2", "--device", "cpu")
            else:
                host = ("--gpus", "0,1") if n_gpu > 1 else ("--gpus", "0,0")
            check("workers", [(*host, "--allow-torch-plane"), cuda("cuda:0")],
                  JobSpec(rounds=a.rounds, min_peers=2), worker_flags=" ".join(host))
    ok = all(good for _, good in rows)
    print(f"# {time.monotonic() - started:.0f} s in all", flush=True)
    print("ok: every check committed every round with every member agreeing bit for bit" if ok else "FAILED",
          flush=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
