"""dml against torch DistributedDataParallel: the same task, batch size and seed trained side by side.

    python benchmarks/vs_ddp.py [--peers 2,3,4] [--tasks synthetic:10M,examples/cnn.py,digits]
                                [--steps 100] [--grads-local-steps 10] [--local-steps 10]
                                [--batch-size 32] [--lr LR] [--repeats 1] [--warmup-rounds 1]
                                [--ddp-warmup-steps 5] [--link-mbit 0] [--json]

For every (task, peers) and every repeat it runs, one after the other (interleaved, so drift on a
shared machine hits all three alike; dml ``--sync grads`` first by default, see Samples):

- ``ddp``: N processes of this script (a hidden ``--ddp-rank`` mode), launched as torchrun does:
  this process hosts a ``torch.distributed.TCPStore`` on 127.0.0.1, port 0 (read back), each rank
  joins it, ``init_process_group("gloo", store=..)``, ``torch.set_num_threads(1)`` (as dml's peers
  run), then ``DistributedDataParallel(model)``: one all-reduce of gradients per step;
- ``dml`` ``--sync grads``: a fresh cluster of N peers (as ``round_overhead.py`` starts it), one job
  of ``--grads-local-steps`` steps per round (a round commits every K steps), the same algorithm;
- ``dml`` ``--sync params --local-steps K``: the same, averaging parameters every K local steps.

The task is the one dml trains: built-in ones from ``dml.common.tasks.get_task``, a task file
(``examples/cnn.py``) imported from its path on the DDP side and sent with the job to peers started
with ``--allow-job-code``; its data is read under one data directory shared by both sides. Model
built after ``torch.manual_seed(seed)`` (the job's seed, 0) as a dml peer builds it; optimizer the
task's (plain SGD at 0.1 when it has none), ``--lr`` overriding every group's learning rate (default
0.01 for ``synthetic:*``, the task's own otherwise, as ``dml local`` leaves it).

Network (``--link-mbit``): by default every process talks over 127.0.0.1. With ``--link-mbit R``
(root and iproute2; without them it exits 2 with a one-line reason) the run builds one emulated
LAN (``benchmarks/netem.py``: a network namespace per rank, a veth into one bridge, every link
shaped with ``tbf`` to R Mbit/s each way) with the root namespace at ``10.213.0.254`` on the
bridge, and DDP's all-reduce, dml's gradient all-reduce and dml's parameter average all cross
the shaped links:

- DDP rank r enters namespace r first thing (``--netns``), gloo binds to its ``eth0``
  (``GLOO_SOCKET_IFNAME``), and the TCPStore this process hosts listens on the bridge's address;
- dml's coordinator runs in the root namespace on the bridge's address, peer i as
  ``ip netns exec NS python -m dml.peer.cli --host 10.213.0.(i+1) ...`` (it execs: the pid spawned
  is the peer's, which each run checks, so CPU and RSS readings stay the peer's); all of them
  inside mutual TLS (certificates made per run: dml serves plain text on loopback only, so its
  bytes are encrypted where gloo's are not), and the jobs use ``data_plane="tcp"`` (``auto`` may
  choose shared memory between two processes of one machine). Each run checks the peers' DEBUG
  lines: every round's data plane TCP, every successor on the LAN.

The LAN is torn down (and every process reaped) on success, failure and interruption; what dead
runs left behind is removed when the next one starts. Every JSON row carries ``link_mbit``.

Samples: every rank or peer takes ``--batch-size`` samples per step, the global batch being N x batch.
By default (``--ddp-samples dml``) the dml ``--sync grads`` job runs first and DDP's rank r then
trains, step by step, on exactly the batches that job's r-th member (by peer id) trained, read from
its sample ledger (the job history's consumed ranges, cut from the shards the coordinator cuts:
:func:`ledger_batches`): the same algorithm on the same samples, so the accuracies may differ only
by float rounding, not by which samples each drew. With ``--ddp-samples own`` (or when a ledger
cannot be replayed, e.g. uneven allocations) DDP's ranks read a seeded permutation of the
training set per pass (numpy ``default_rng([seed, pass])``) split into N contiguous parts, rank r
reading part r in order: the same number per step from the same distribution, other samples.

Figures per configuration:

- ``step_s`` (median, min..max): DDP: per step, the slowest rank's wall time of reading the batch,
  forward, backward (its all-reduce) and the optimizer step, over the steps after
  ``--ddp-warmup-steps``; dml: per round ``(committed_unix_ms[r] - committed_unix_ms[r-1]) / K``
  over rounds ``warmup-rounds < r < rounds`` (the first rounds build the model; the final one
  evaluates and uploads the checkpoint), so ``steps / K`` must be at least ``--warmup-rounds`` + 2;
- ``samples_per_s`` = N x batch / step_s;
- ``cpu_s_per_step``: CPU seconds of all ranks (``time.process_time`` per step, summed) or of all
  peer processes (``/proc/PID/stat`` utime + stime, read when the job's status first shows round
  ``warmup-rounds`` and round ``rounds - 1`` committed), over the measured steps, per step (a mean);
- ``peak_rss_x_model``: max over ranks / peers of (``VmHWM`` - baseline ``VmRSS``) / (parameters x 4
  bytes); DDP's baseline is read once the process group is up, before the model is built; dml's
  once the peer registered (``round_overhead.py``). DDP rows' JSON also has ``rss_over_baseline_mb``:
  rank 0's MB over its baseline once built, after the first step, at training's peak and at the end;
- ``test_accuracy``: DDP: rank 0's argmax accuracy on the task's test set after the last step
  (batched, no_grad); dml: the job's final ``test_accuracy``;
- dml rows: ``step_ratio`` (dml step_s / DDP step_s of the same task, peers and repeat) and
  ``samples_ratio`` (dml samples/s / DDP samples/s), and the split of a round from the job
  history (``round_overhead.round_split``: train / exchange / coordination, medians, seconds),
  the exchange split from the peers' all-reduce windows (``round_overhead.allreduce_split``) into
  ``wait_s``, the members' entries' spread (waiting out the slowest member's training), and
  ``allreduce_s``, the all-reduces from the last member's entry on.

Targets checked under the table (ok / NOT ok; the exit code does not depend on them), at N=4 on
synthetic:10M: dml ``--sync grads`` at most 1.1 x DDP's time per step at an accuracy within 0.5
point; ``--sync params --local-steps 10`` at least 3 x DDP's samples/s at an accuracy within 1 point.

``--json`` prints one JSON object per configuration per line instead of the table. Progress goes to
stderr. Exit codes: 0 done, 1 a run failed (the tail of its logs is printed, the logs are kept),
2 bad flags, 130 interrupted. Every wait has a deadline; every process started is reaped.
"""
from __future__ import annotations

import argparse
import contextlib
import datetime
import importlib.util
import json
import math
import os
import pathlib
import platform
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import round_overhead as ro  # noqa: E402 - sets the children's environment (one thread each) and sys.path
import netem  # noqa: E402
from round_overhead import BenchError, allreduce_split, cluster, log_tails, proc_status_mb, report_times, round_split  # noqa: E402

from dml.client.api import ApiError, JobClient, history_dict, status_dict  # noqa: E402
from dml.client.cluster import operator_token_file, reap  # noqa: E402
from dml.common.args import int_in, positive_float  # noqa: E402
from dml.common.spec import MAX_ROUNDS, JobSpec  # noqa: E402
from dml.peer import diskcopy  # noqa: E402
from dml.common.tasks import builtin_params, is_builtin  # noqa: E402

MB = 1 << 20
SEED = 0  # the job's seed (JobSpec's default): dml seeds torch with it before building the model
EVAL_BATCH = 1024
TARGET_TASK, TARGET_PEERS = "synthetic:10M", 4
TARGET_GRADS_STEP_RATIO, TARGET_GRADS_ACC_POINTS = 1.1, 0.5
TARGET_PARAMS_SAMPLES_RATIO, TARGET_PARAMS_ACC_POINTS, TARGET_PARAMS_K = 3.0, 1.0, 10


# -- flags -----------------------------------------------------------------------------------
def _peers_list(text: str) -> list[int]:
    out = []
    for part in text.split(","):
        try:
            n = int(part.strip())
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a whole number: {part.strip()!r} (expected e.g. 2,3,4)") from None
        if not 1 <= n <= 64:
            raise argparse.ArgumentTypeError(f"peers must be 1..64, got {n}")
        out.append(n)
    return out


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--peers", type=_peers_list, default=[4], help="world sizes, comma-separated (default 4)")
    p.add_argument("--tasks", default="synthetic:10M",
                   help="built-in tasks or task files, comma-separated (default synthetic:10M; "
                        "e.g. synthetic:10M,examples/cnn.py,digits)")
    p.add_argument("--steps", type=int_in(1), default=100,
                   help="training steps per rank or peer (default 100; a multiple of both K's)")
    p.add_argument("--grads-local-steps", type=int_in(1), default=10,
                   help="dml --sync grads: steps per round, a commit every K steps (default 10)")
    p.add_argument("--local-steps", type=int_in(1), default=10,
                   help="dml --sync params: local steps between parameter averagings (default 10)")
    p.add_argument("--batch-size", type=int_in(1), default=32, help="batch per rank or peer per step (default 32)")
    p.add_argument("--lr", type=positive_float, default=None,
                   help="learning rate of every task (default 0.01 for synthetic:*, the task's own otherwise)")
    p.add_argument("--repeats", type=int_in(1), default=1, help="runs of each configuration (default 1)")
    p.add_argument("--warmup-rounds", type=int_in(1), default=1,
                   help="dml: first rounds left out of the step times (default 1; the final round is left out too)")
    p.add_argument("--ddp-warmup-steps", type=int_in(0), default=5,
                   help="DDP: first steps left out of the step times (default 5)")
    p.add_argument("--timeout-s", type=positive_float, default=None,
                   help="deadline per run (default: 120 s + steps x (1 + params in M) s)")
    p.add_argument("--log-dir", type=pathlib.Path, default=None,
                   help="keep the process logs here (default: a temp dir, removed unless a run fails)")
    p.add_argument("--ddp-samples", choices=("dml", "own"), default="dml",
                   help="dml (default): DDP's ranks train on exactly the batches the dml --sync grads job of the same "
                        "configuration trained, read from its sample ledger (so that job runs first), and the "
                        "accuracies compare the algorithms, not two draws of samples; own: a seeded permutation")
    p.add_argument("--link-mbit", type=float, default=0.0,
                   help="0 (default): every process on 127.0.0.1; R > 0: every DDP rank and dml peer in its own network "
                        "namespace of an emulated LAN (benchmarks/netem.py), its link shaped to R Mbit/s each way "
                        "(needs root and iproute2)")
    p.add_argument("--committed-copy", choices=("memory", "disk"), default="memory",
                   help="dml-peer --committed-copy for the dml peers: the committed parameters in memory (default) "
                        "or in a file in the page cache, on the log dir's disk")
    p.add_argument("--json", action="store_true", help="one JSON object per configuration instead of the table")
    return p


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Parses and checks the flags; a bad one exits with code 2."""
    p = build_parser()
    a = p.parse_args(argv)
    a.task_list = []
    for t in (t.strip() for t in a.tasks.split(",")):
        if not t:
            continue
        if is_builtin(t):
            try:
                builtin_params(t)
            except ValueError as e:
                p.error(f"--tasks {t}: {e}")
            a.task_list.append(t)
        elif t.endswith(".py"):
            path = pathlib.Path(t).resolve()
            if not path.is_file():
                p.error(f"--tasks {t}: no such task file")
            a.task_list.append(str(path))
        else:
            p.error(f"--tasks {t!r}: neither a built-in task nor a task file (.py)")
    if not a.task_list:
        p.error("--tasks names no task")
    for flag, k in (("--grads-local-steps", a.grads_local_steps), ("--local-steps", a.local_steps)):
        if a.steps % k:
            p.error(f"--steps {a.steps} must be a multiple of {flag} {k}")
        rounds = a.steps // k
        if rounds < a.warmup_rounds + 2:
            p.error(f"--steps {a.steps} / {flag} {k} = {rounds} rounds: at least --warmup-rounds + 2 = "
                    f"{a.warmup_rounds + 2} are needed (the first {a.warmup_rounds} and the final one are not "
                    f"measured); raise --steps or lower {flag}")
        if rounds > MAX_ROUNDS:
            p.error(f"--steps / {flag} must be at most {MAX_ROUNDS} rounds, got {rounds}")
    if a.ddp_warmup_steps >= a.steps:
        p.error(f"--ddp-warmup-steps must be below --steps {a.steps}, got {a.ddp_warmup_steps}")
    if a.lr is not None and not a.lr < 100:
        p.error(f"--lr must be below 100, got {a.lr}")
    if not (a.link_mbit >= 0 and math.isfinite(a.link_mbit)):  # also NaN
        p.error(f"--link-mbit must be 0 (loopback) or a positive rate in Mbit/s, got {a.link_mbit:g}")
    return a


def task_lr(a: argparse.Namespace, task: str) -> float:
    """The learning rate a task runs at: ``--lr``, else 0.01 for synthetic:*, else 0 (the task's own)."""
    if a.lr is not None:
        return a.lr
    return 0.01 if task.startswith("synthetic:") else 0.0


def task_label(task: str) -> str:
    """A task as the table shows it: a task file by its name relative to the repository."""
    with contextlib.suppress(ValueError):
        return str(pathlib.Path(task).relative_to(ro.ROOT))
    return task


# -- the pure parts ----------------------------------------------------------------------------
def spread(xs: list[float]) -> dict[str, float]:
    """Median, min and max of per-step times (seconds)."""
    return {"step_s": statistics.median(xs), "step_s_min": min(xs), "step_s_max": max(xs)}


def dml_step_times(history: list[dict[str, Any]], rounds: int, warmup: int, k: int) -> list[float]:
    """Seconds per step of each measured round ``warmup < r < rounds``: the commit-to-commit
    interval divided by the round's ``k`` steps. Rounds missing from the history are skipped."""
    by_round = {h["round"]: h for h in history}
    out = []
    for r in range(warmup + 1, rounds):
        h, prev = by_round.get(r), by_round.get(r - 1)
        if h is not None and prev is not None:
            out.append((h["committed_unix_ms"] - prev["committed_unix_ms"]) / 1000.0 / k)
    return out


def ledger_batches(history: list[dict[str, Any]], shards: Any, seed: int, k: int, batch_size: int) -> Any:
    """The batches a ``--sync grads`` job trained, from its sample ledger: an int64 array
    ``(members, rounds x k, batch_size)``, member m's step s. Each round's consumed ranges are
    ``(shard, data epoch, start, stop)`` into the shard's order for that epoch
    (``common.sampling.shard_order``), in the order the member trained them; its step s took
    samples ``[s x batch, (s + 1) x batch)`` of them. Members are ordered by peer id. BenchError
    when the job cannot be replayed as DDP trains: membership or allocations that change, or a
    round that is not ``k`` full batches per member."""
    import numpy as np

    from dml.common.sampling import shard_order

    members = sorted(history[0]["consumed"]) if history else []
    if not members:
        raise BenchError("the job's history has no sample ledger")
    out = np.empty((len(members), len(history) * k, batch_size), dtype=np.int64)
    for i, h in enumerate(sorted(history, key=lambda x: x["round"])):
        if sorted(h["consumed"]) != members:
            raise BenchError(f"round {h['round']}: members {sorted(h['consumed'])}, not {members}: cannot replay")
        for m, peer in enumerate(members):
            parts = [shard_order(shards[sh], seed, ep, sh)[a:b] for sh, ep, a, b in h["consumed"][peer]]
            idx = np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)
            if idx.size != k * batch_size:
                raise BenchError(f"round {h['round']}: {peer} trained {idx.size} samples, not {k} x {batch_size}: "
                                 f"cannot replay as equal DDP batches")
            out[m, i * k:(i + 1) * k] = idx.reshape(k, batch_size)
    return out


def ddp_step_times(per_rank: list[list[float]], warmup: int) -> list[float]:
    """Per step after the first ``warmup``, the slowest rank's time."""
    return [max(ts) for ts in list(zip(*per_rank))[warmup:]]


def with_ratios(row: dict[str, Any], ddp: dict[str, Any] | None) -> dict[str, Any]:
    """A dml row with ``step_ratio`` and ``samples_ratio`` against the DDP row of its (task, peers,
    repeat); None when there is no DDP figure."""
    ok = ddp is not None and ddp.get("step_s") and ddp.get("samples_per_s")
    out = dict(row)
    out["step_ratio"] = row["step_s"] / ddp["step_s"] if ok else None
    out["samples_ratio"] = row["samples_per_s"] / ddp["samples_per_s"] if ok else None
    out["accuracy_points_vs_ddp"] = (100 * (row["test_accuracy"] - ddp["test_accuracy"])
                                     if ok and row.get("test_accuracy") is not None
                                     and ddp.get("test_accuracy") is not None else None)
    return out


def base_row(system: str, sync: str, task: str, peers: int, local_steps: int, a: argparse.Namespace,
             repeat: int, times: list[float], params: int) -> dict[str, Any]:
    """The fields every row has, from its measured per-step times."""
    s = spread(times)
    return {"system": system, "sync": sync, "task": task_label(task), "peers": peers, "local_steps": local_steps,
            "repeat": repeat, "steps": a.steps, "batch_size": a.batch_size, "lr": task_lr(a, task), "params": params,
            "link_mbit": a.link_mbit, "committed_copy": a.committed_copy if system == "dml" else None,
            **s, "measured_steps": len(times), "samples_per_s": peers * a.batch_size / s["step_s"]}


def checks(rows: list[dict[str, Any]]) -> list[str]:
    """The issue's targets at N=4 on synthetic:10M, ok / NOT ok, or why not measured."""
    out = []
    at = [r for r in rows if r["task"] == TARGET_TASK and r["peers"] == TARGET_PEERS and r["system"] == "dml"]
    grads = [r for r in at if r["sync"] == "grads"]
    params = [r for r in at if r["sync"] == "params" and r["local_steps"] == TARGET_PARAMS_K]
    what = f"at {TARGET_PEERS} peers on {TARGET_TASK}"
    if not grads:
        out.append(f"target dml --sync grads step <= {TARGET_GRADS_STEP_RATIO:g} x DDP {what}: not measured")
    for r in grads:
        d = r["accuracy_points_vs_ddp"]
        ok = r["step_ratio"] is not None and r["step_ratio"] <= TARGET_GRADS_STEP_RATIO and d is not None \
            and abs(d) <= TARGET_GRADS_ACC_POINTS
        out.append(f"target dml --sync grads step <= {TARGET_GRADS_STEP_RATIO:g} x DDP, accuracy within "
                   f"{TARGET_GRADS_ACC_POINTS:g} point {what} (repeat {r['repeat']}): {_f(r['step_ratio'], '.2f')} x, "
                   f"{_f(d, '+.2f')} points -> {'ok' if ok else 'NOT ok'}")
    if not params:
        out.append(f"target dml --sync params --local-steps {TARGET_PARAMS_K} samples/s >= "
                   f"{TARGET_PARAMS_SAMPLES_RATIO:g} x DDP {what}: not measured")
    for r in params:
        d = r["accuracy_points_vs_ddp"]
        ok = r["samples_ratio"] is not None and r["samples_ratio"] >= TARGET_PARAMS_SAMPLES_RATIO and d is not None \
            and abs(d) <= TARGET_PARAMS_ACC_POINTS
        out.append(f"target dml --sync params --local-steps {TARGET_PARAMS_K} samples/s >= "
                   f"{TARGET_PARAMS_SAMPLES_RATIO:g} x DDP, accuracy within {TARGET_PARAMS_ACC_POINTS:g} point {what} "
                   f"(repeat {r['repeat']}): {_f(r['samples_ratio'], '.2f')} x, {_f(d, '+.2f')} points "
                   f"-> {'ok' if ok else 'NOT ok'}")
    return out


def _f(x: float | None, spec: str = ".3f") -> str:
    return "-" if x is None else format(x, spec)


def link_line(lan: netem.Lan | None) -> str:
    """The table's line saying what network the processes talk over."""
    if lan is None:
        return "# link: every process on 127.0.0.1 (loopback, no shaping; dml's data plane as the job's auto picks)"
    return (f"# link: {lan.describe()}; DDP's ranks and dml's peers one per namespace (the TCPStore and dml's "
            f"coordinator in the root namespace on {lan.bridge_addr}); dml inside mutual TLS (it serves plain text on "
            f"loopback only) on the TCP data plane, gloo plain TCP")


def table(rows: list[dict[str, Any]], link: str = link_line(None)) -> str:
    """The rows as a fixed-width table, the split of dml's rounds beside them, then the targets."""
    import torch

    lines = [
        (f"# dml vs DDP (gloo) on {platform.machine()} {platform.node()}, {os.cpu_count()} CPUs, torch "
         f"{torch.__version__}, Python {platform.python_version()}; one compute thread per rank / peer"),
        link,
        ("# step = seconds per step, median (min..max); cpu = CPU seconds of all ranks/peers per step; rss = max over "
         "ranks/peers of (peak - baseline) / model bytes; acc = final test accuracy (%); ratios against the DDP row; "
         "split = dml's round: train / exchange (of it: the wait for the slowest member's training, the spread of "
         "the members' entries into the all-reduces, and the all-reduces from the last entry on) / coordination "
         "(medians, s per round)"),
        (f"{'system':<6} {'sync':<6} {'task':<16} {'N':>2} {'K':>3} {'step':>7} {'min..max':>15} {'samples/s':>10} "
         f"{'cpu':>6} {'rss':>6} {'acc':>6} {'step x':>6} {'smp x':>6}  split"),
    ]
    for r in rows:
        sp = r.get("split")
        split = (f"{_f(sp['train_s'])} / {_f(sp['exchange_s'])} (wait {_f(sp.get('wait_s'))} + all-reduce "
                 f"{_f(sp.get('allreduce_s'))}) / {_f(sp['coord_s'])}" if sp else "")
        acc = None if r["test_accuracy"] is None else 100 * r["test_accuracy"]
        lines.append(
            f"{r['system']:<6} {r['sync']:<6} {r['task']:<16} {r['peers']:>2} {r['local_steps']:>3} {r['step_s']:>7.4f} "
            f"{r['step_s_min']:>7.4f}..{r['step_s_max']:<7.4f} {r['samples_per_s']:>10.0f} "
            f"{_f(r['cpu_s_per_step']):>6} {_f(r['peak_rss_x_model'], '.2f'):>6} {_f(acc, '.2f'):>6} "
            f"{_f(r.get('step_ratio'), '.2f'):>6} {_f(r.get('samples_ratio'), '.2f'):>6}  {split}")
    lines.append("")
    lines.extend(checks(rows))
    return "\n".join(lines)


# -- the task, as both sides build it -------------------------------------------------------------
def load_task(task: str) -> Any:
    """The dml.Task: a built-in one, or ``task`` (a .py path) imported from its file."""
    if is_builtin(task):
        from dml.common.tasks import get_task

        return get_task(task)
    spec = importlib.util.spec_from_file_location("vs_ddp_task", task)
    if spec is None or spec.loader is None:
        raise BenchError(f"cannot import {task}")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    from dml.common.task import Task

    t = getattr(mod, "task", None)
    if not isinstance(t, Task):
        raise BenchError(f"{task} has no dml.Task named 'task'")
    return t


def num_params(task: str) -> int:
    """The task's parameter count (its model built once here)."""
    if is_builtin(task):
        return builtin_params(task)
    try:
        return sum(p.numel() for p in load_task(task).model().parameters())
    except BenchError:
        raise
    except Exception as e:  # noqa: BLE001 - the task file may raise anything
        raise BenchError(f"{task}: building its model raised {type(e).__name__}: {e}") from e


def default_timeout_s(a: argparse.Namespace, params: int) -> float:
    """``--timeout-s``, else 120 s + steps x (1 + params in M) s, plus on an emulated LAN 3 x a
    step's all-reduce floor per step (DDP and --sync grads all-reduce the model every step)."""
    if a.timeout_s is not None:
        return a.timeout_s
    link = 3 * netem.ring_floor_s(max(a.peers), params * 4, a.link_mbit) if a.link_mbit > 0 else 0.0
    return 120.0 + a.steps * (1.0 + params / 1e6 + link)


# -- the emulated LAN (--link-mbit) ---------------------------------------------------------------
def netns_ino(name: str) -> int:
    """The inode of network namespace ``name`` (``ip netns`` mounts it under /var/run/netns)."""
    return os.stat(os.path.join(netem.NETNS_DIR, name)).st_ino


def check_peer_process(pid: int, name: str) -> None:
    """BenchError unless ``pid`` is a dml peer (``ip netns exec`` exec'd it: the pid spawned is the
    peer's, so its CPU and RSS readings are the peer's) living in namespace ``name``."""
    try:
        cmdline = pathlib.Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        ino = os.stat(f"/proc/{pid}/ns/net").st_ino
    except OSError as e:
        raise BenchError(f"cannot read process {pid}: {e}") from None
    if b"dml.peer.cli" not in cmdline:
        raise BenchError(f"process {pid} is not a dml peer: {b' '.join(cmdline[:4]).decode(errors='replace')}")
    if ino != netns_ino(name):
        raise BenchError(f"peer process {pid} is not in network namespace {name}")


def dml_placement(lan: netem.Lan, peers: int, tls_args: list[str]) -> dict[str, Any]:
    """``round_overhead.cluster`` keyword arguments for a cluster on ``lan``: the coordinator in the
    root namespace on the bridge's address (reachable from every namespace and from this
    process), peer i in namespace i (``ip netns exec``) on rank i's address; TLS flags for the
    coordinator (the peers get them with their other flags): dml serves plain text on loopback only."""
    if lan.bridge_addr is None:
        raise ValueError("the LAN has no root-namespace address for the coordinator (Lan(bridge_addr=...))")
    return {"coordinator_host": lan.bridge_addr, "coordinator_args": tuple(tls_args),
            "peer_hosts": lan.addrs[:peers],
            "peer_prefixes": [("ip", "netns", "exec", lan.names[i]) for i in range(peers)]}


PLANE_RE = re.compile(r"job (\S+) round (\d+) epoch (\d+): data plane: sent (\S+) to (\S+) at (\S+), received (\S+)")


def data_plane_seen(texts: list[str], job_id: str) -> dict[str, Any]:
    """What the peers' DEBUG lines (one per member per round, ``peer.ring_round``) say carried
    job ``job_id``'s rounds: the kinds sent and received (tcp, shm, grpc, torch), the successors'
    hosts, and how many lines."""
    sent, got, hosts, n = set(), set(), set(), 0
    for text in texts:
        for m in PLANE_RE.finditer(text):
            if m.group(1) == job_id:
                n += 1
                sent.add(m.group(4))
                got.add(m.group(7))
                hosts.add(m.group(6).rpartition(":")[0].strip("[]"))
    return {"sent": sorted(sent), "received": sorted(got), "successor_hosts": sorted(hosts), "lines": n}


def lan_plane_problem(seen: dict[str, Any], addrs: list[str]) -> str | None:
    """Why ``seen`` (:func:`data_plane_seen`) is not TCP between LAN addresses ``addrs``, or None."""
    if not seen["lines"]:
        return "the peers logged no data plane lines (are they at DEBUG?)"
    if seen["sent"] != ["tcp"] or seen["received"] != ["tcp"]:
        return f"the data plane was not TCP alone: sent {seen['sent']}, received {seen['received']}"
    off = [h for h in seen["successor_hosts"] if h not in addrs]
    if off:
        return f"successors at {off}, off the emulated LAN ({addrs[0]}..{addrs[-1]})"
    return None


# -- DDP: one rank (the hidden --ddp-rank mode) -------------------------------------------------
def rank_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="vs_ddp.py --ddp-rank")
    p.add_argument("--ddp-rank", type=int, required=True)
    p.add_argument("--world", type=int, required=True)
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--task", required=True)
    p.add_argument("--data-dir", type=pathlib.Path, required=True)
    p.add_argument("--steps", type=int, required=True)
    p.add_argument("--batch-size", type=int, required=True)
    p.add_argument("--lr", type=float, required=True)
    p.add_argument("--out", type=pathlib.Path, required=True)
    p.add_argument("--samples", type=pathlib.Path, default=None,
                   help="an .npy of (ranks, steps, batch) indices: rank r's step s trains [r, s] (ledger_batches)")
    p.add_argument("--store-host", default="127.0.0.1", help="the parent's TCPStore")
    p.add_argument("--netns", default=None, help="the network namespace to enter first (--link-mbit)")
    return p


def rank_main(argv: list[str]) -> int:
    """One DDP rank: joins the parent's TCPStore, trains ``--steps`` steps, writes its figures.
    With ``--netns`` it first enters that namespace (before any socket or thread exists: both
    inherit it), and gloo's pairs bind to the namespace's interface (``GLOO_SOCKET_IFNAME``)."""
    a = rank_parser().parse_args(argv)
    if a.netns:
        netem.enter_netns(a.netns)
        os.environ["GLOO_SOCKET_IFNAME"] = netem.IFACE
    import numpy as np
    import torch
    import torch.distributed as dist
    import torch.nn.functional as F
    from torch.nn.parallel import DistributedDataParallel

    from dml.common.task import Context
    from dml.peer.trainer import Batches

    torch.set_num_threads(1)
    store = dist.TCPStore(a.store_host, a.port, a.world, is_master=False, timeout=datetime.timedelta(seconds=120))
    dist.init_process_group("gloo", store=store, rank=a.ddp_rank, world_size=a.world,
                            timeout=datetime.timedelta(seconds=120))
    baseline = proc_status_mb(os.getpid())["VmRSS"]
    task = load_task(a.task)
    torch.manual_seed(SEED)  # as dml.peer.trainer.Trainer does, so every side starts from the same parameters
    model = task.model()
    params = list(model.parameters())
    opt = task.optimizer(params) if task.optimizer is not None else torch.optim.SGD(params, lr=a.lr or 0.1)
    if a.lr:
        for g in opt.param_groups:
            g["lr"] = a.lr
    loss_fn = task.loss or F.cross_entropy
    ddp = DistributedDataParallel(model)
    cpu = torch.device("cpu")
    train = Batches(task.train(Context(data_dir=a.data_dir, split="train", seed=SEED)), "train(ctx)", task.collate, cpu)
    per = train.size // a.world
    if per < 1:
        raise BenchError(f"{train.size} training samples for {a.world} ranks")
    built_mb = proc_status_mb(os.getpid())["VmRSS"]  # model, optimizer, DDP and the training data
    step_s, cpu_s, order, pos, epoch = [], [], np.empty(0, dtype=np.int64), 0, 0
    first_mb = 0.0
    given = np.load(a.samples) if a.samples is not None else None
    if given is not None and (given.shape[0] != a.world or given.shape[1] < a.steps or given.shape[2] != a.batch_size):
        raise BenchError(f"--samples holds {given.shape}, not ({a.world}, >= {a.steps}, {a.batch_size})")
    for s in range(a.steps):
        t0, c0 = time.perf_counter(), time.process_time()
        idx = given[a.ddp_rank, s].tolist() if given is not None else []
        while len(idx) < a.batch_size:  # this rank's contiguous part of a seeded permutation, pass by pass
            if pos >= len(order):
                perm = np.random.default_rng([SEED, epoch]).permutation(train.size)
                order, pos, epoch = perm[a.ddp_rank * per:(a.ddp_rank + 1) * per], 0, epoch + 1
            take = order[pos:pos + a.batch_size - len(idx)]
            idx.extend(take.tolist())
            pos += len(take)
        x, y = train.get(np.asarray(idx, dtype=np.int64))
        opt.zero_grad(set_to_none=True)
        loss = loss_fn(ddp(x), y)
        loss.backward()
        opt.step()
        step_s.append(time.perf_counter() - t0)
        if (s + 1) % 10 == 0:  # in the rank's log: where a stalled rank was
            print(f"rank {a.ddp_rank}: step {s + 1}/{a.steps} done, {step_s[-1]:.3f}s", file=sys.stderr, flush=True)
        cpu_s.append(time.process_time() - c0)
        if s == 0:
            first_mb = proc_status_mb(os.getpid())["VmRSS"]  # gradients, DDP's buckets, optimizer state
    trained_hwm_mb = proc_status_mb(os.getpid())["VmHWM"]  # the peak of training alone, before the evaluation
    accuracy = None
    if a.ddp_rank == 0 and task.test is not None:
        test = Batches(task.test(Context(data_dir=a.data_dir, split="test", seed=SEED)), "test(ctx)", task.collate, cpu)
        model.eval()
        correct = 0
        with torch.no_grad():
            for i in range(0, test.size, EVAL_BATCH):
                x, y = test.get(np.arange(i, min(i + EVAL_BATCH, test.size), dtype=np.int64))
                correct += int((model(x).argmax(1) == y).sum())
        accuracy = correct / test.size if test.size else None
    mem = proc_status_mb(os.getpid())
    a.out.write_text(json.dumps({"step_s": step_s, "cpu_s": cpu_s, "baseline_mb": baseline, "peak_mb": mem["VmHWM"],
                                 "built_mb": built_mb, "first_step_mb": first_mb, "trained_peak_mb": trained_hwm_mb,
                                 "params": sum(p.numel() for p in params), "test_accuracy": accuracy,
                                 "train_loss": float(loss), "netns_ino": os.stat("/proc/self/ns/net").st_ino}))
    dist.barrier()  # nobody leaves while another still needs the group
    dist.destroy_process_group()
    return 0


# -- DDP: the launcher ----------------------------------------------------------------------------
def run_ddp(a: argparse.Namespace, task: str, peers: int, repeat: int, root: pathlib.Path,
            data_dir: pathlib.Path, params: int, samples: Any = None, lan: netem.Lan | None = None) -> dict[str, Any]:
    """N ranks of this script on a TCPStore this process hosts (port 0); returns the DDP row.
    ``samples`` (:func:`ledger_batches`): the batches each rank trains, else its own permutation.
    On ``lan`` rank r runs in its namespace r and the store listens on the bridge's address."""
    import torch.distributed as dist

    logs = root / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    timeout_s = default_timeout_s(a, params)
    store_host = lan.bridge_addr if lan is not None and lan.bridge_addr else "127.0.0.1"
    store = dist.TCPStore(store_host, 0, peers, is_master=True, timeout=datetime.timedelta(seconds=120),
                          wait_for_workers=False)
    outs = [root / f"rank-{r}.json" for r in range(peers)]
    extra: list[str] = []
    if samples is not None:
        import numpy as np

        root.mkdir(parents=True, exist_ok=True)
        np.save(root / "samples.npy", samples)
        extra = ["--samples", str(root / "samples.npy")]
    procs: list[subprocess.Popen[bytes]] = []
    t0 = time.monotonic()
    try:
        for r in range(peers):
            ro._spawn([sys.executable, str(pathlib.Path(__file__).resolve()), "--ddp-rank", str(r), "--world", str(peers),
                       "--port", str(store.port), "--task", task, "--data-dir", str(data_dir), "--steps", str(a.steps),
                       "--batch-size", str(a.batch_size), "--lr", repr(task_lr(a, task)), "--out", str(outs[r]), *extra,
                       "--store-host", store_host, *(["--netns", lan.names[r]] if lan is not None else [])],
                      logs / f"rank-{r}.log", procs)
        deadline = time.monotonic() + timeout_s
        while any(p.poll() is None for p in procs):
            bad = [(i, p.returncode) for i, p in enumerate(procs) if p.returncode not in (None, 0)]
            if bad:
                raise BenchError(f"DDP rank {bad[0][0]} exited with code {bad[0][1]}")
            if time.monotonic() >= deadline:
                raise BenchError(f"DDP did not finish within {timeout_s:.0f}s")
            time.sleep(0.1)
        bad = [(i, p.returncode) for i, p in enumerate(procs) if p.returncode != 0]
        if bad:
            raise BenchError(f"DDP rank {bad[0][0]} exited with code {bad[0][1]}")
    finally:
        reap(procs)
        del store
    res = [json.loads(o.read_text()) for o in outs]
    if lan is not None:
        wrong = [r for r in range(peers) if res[r]["netns_ino"] != netns_ino(lan.names[r])]
        if wrong:
            raise BenchError(f"DDP ranks {wrong} did not run in their network namespaces")
    times = ddp_step_times([x["step_s"] for x in res], a.ddp_warmup_steps)
    cpu = sum(sum(x["cpu_s"][a.ddp_warmup_steps:]) for x in res) / len(times)
    model_mb = res[0]["params"] * 4 / MB
    row = base_row("ddp", "grads", task, peers, 1, a, repeat, times, res[0]["params"])
    row.update({"samples_from": "dml --sync grads ledger" if samples is not None else "own permutation",
                "cpu_s_per_step": cpu,
                "peak_rss_x_model": max((x["peak_mb"] - x["baseline_mb"]) / model_mb for x in res),
                "test_accuracy": res[0]["test_accuracy"], "train_loss": res[0]["train_loss"],
                "wall_s": time.monotonic() - t0,
                # Where DDP's memory goes, rank 0, MB over its baseline: VmRSS once built (model, optimizer,
                # DDP, training data) and after the first step (gradients, buckets); VmHWM after the last
                # step (training's peak) and at the end (the evaluation included).
                "rss_over_baseline_mb": {k: res[0][k] - res[0]["baseline_mb"]
                                         for k in ("built_mb", "first_step_mb", "trained_peak_mb", "peak_mb")}})
    return row


# -- dml ----------------------------------------------------------------------------------------
def cpu_ticks_s(pid: int) -> float:
    """utime + stime of a live process, in seconds."""
    try:
        stat = pathlib.Path(f"/proc/{pid}/stat").read_text()
    except OSError as e:
        raise BenchError(f"cannot read /proc/{pid}/stat: {e}") from None
    fields = stat.rpartition(")")[2].split()  # after the command name, which may hold spaces
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def job_shards(spec: JobSpec, task: str, data_dir: pathlib.Path) -> Any:
    """A job's shards as the coordinator cuts them (``coordinator.service.cut_shards``), from the
    labels a peer sends at its take (``peer.take.training_labels`` of a trainer built as peers
    build it)."""
    import numpy as np

    from dml.common.task import Context
    from dml.coordinator.service import cut_shards
    from dml.peer.take import training_labels
    from dml.peer.trainer import Trainer

    trainer = Trainer(load_task(task), spec.seed, spec.learning_rate, ctx=Context(data_dir=data_dir, seed=spec.seed))
    labels = training_labels(trainer)
    if labels is None:
        labels = np.zeros(trainer.train_data.size, dtype=np.int64)
    return cut_shards(spec, np.asarray(labels))


def run_dml(a: argparse.Namespace, task: str, peers: int, sync: str, k: int, repeat: int, root: pathlib.Path,
            data_dir: pathlib.Path, params: int, lan: netem.Lan | None = None,
            tls_files: Any = None) -> tuple[dict[str, Any], list[dict[str, Any]], JobSpec]:
    """One job on a fresh cluster of ``peers`` peers; returns its row (ratios added later), its
    history (with the sample ledger) and its spec. On ``lan`` (with ``tls_files``, a
    ``common.certs.HostFiles``) the cluster is placed by :func:`dml_placement` and the job's data
    plane is TCP (``auto`` could choose shared memory between two processes of this machine and
    bypass the emulated links); the peers' logs must then show TCP between LAN addresses."""
    from dml.common import tls

    rounds = a.steps // k
    spec = JobSpec(task=task, rounds=rounds, sync=sync, local_steps=k, batch_size=a.batch_size,
                   learning_rate=task_lr(a, task), min_peers=peers, num_shards=max(JobSpec().num_shards, peers),
                   checkpoint_every_rounds=rounds + 1, eval_every_rounds=rounds,
                   data_plane="tcp" if lan is not None else JobSpec().data_plane)
    peer_args = ("--data-dir", str(data_dir)) + (() if is_builtin(task) else ("--allow-job-code",))
    if a.committed_copy == "disk":
        peer_args += ("--committed-copy", "disk", "--committed-copy-dir", str(diskcopy.usable_dir(root)))
    place: dict[str, Any] = {}
    tls_cfg = None
    if lan is not None:
        tls_args = ["--tls-cert", str(tls_files.cert), "--tls-key", str(tls_files.key), "--tls-ca", str(tls_files.ca)]
        place = dml_placement(lan, peers, tls_args)
        peer_args += tuple(tls_args)
        tls_cfg = tls.load(tls_files.cert, tls_files.key, tls_files.ca)
    timeout_s = default_timeout_s(a, params) * 1.5
    t0 = time.monotonic()
    log = lambda msg: print(f"[dml {sync} {task_label(task)} N={peers}] {msg}", file=sys.stderr, flush=True)
    with cluster(peers, root, peer_args, **place) as c:
        if lan is not None:
            for i, p in enumerate(c.peers):
                check_peer_process(p.pid, lan.names[i])
        base = [proc_status_mb(p.pid)["VmRSS"] for p in c.peers]
        token = operator_token_file(root / "state").read_text().strip()
        client = JobClient(c.address, timeout_s=30.0, token=token, tls=tls_cfg)
        job_id = client.submit(spec)
        log(f"job {job_id}: {rounds} rounds x {k} steps; deadline {timeout_s:.0f}s")
        marks: dict[str, tuple[int, float]] = {}  # "start" / "end": (round committed, CPU seconds of the peers)

        def show(st: Any) -> None:
            ro._alive(c)
            if "start" not in marks and st.round >= a.warmup_rounds:
                marks["start"] = (st.round, sum(cpu_ticks_s(p.pid) for p in c.peers))
            if "end" not in marks and st.round >= rounds - 1:
                marks["end"] = (st.round, sum(cpu_ticks_s(p.pid) for p in c.peers))

        try:
            end = client.watch(job_id, show, max_s=timeout_s)
        except ApiError as e:
            with contextlib.suppress(ApiError):
                JobClient(c.address, timeout_s=2.0, token=token, tls=tls_cfg).cancel(job_id)
            raise BenchError(f"{task}: {e}") from None
        st = status_dict(end)
        if st["state"] != "SUCCEEDED":
            raise BenchError(f"{task}: job {job_id} ended {st['state']}: {st['reason']}")
        peak = [proc_status_mb(p.pid)["VmHWM"] for p in c.peers]
        history = [history_dict(r) for r in client.history(job_id)]
        client.close()
        reports = report_times(c.logs, peers, job_id)
        windows = allreduce_split(c.logs, peers, job_id)
        plane = data_plane_seen([(c.logs / f"peer-{i}.log").read_text(errors="replace") for i in range(peers)], job_id)
    if lan is not None:
        why = lan_plane_problem(plane, lan.addrs[:peers])
        if why is not None:
            raise BenchError(f"{task}: not over the emulated LAN: {why}")
    times = dml_step_times(history, rounds, a.warmup_rounds, k)
    if not times:
        raise BenchError(f"{task}: no measured rounds in the history (rounds {sorted(h['round'] for h in history)})")
    split = round_split(history, rounds, a.warmup_rounds, reports, windows)
    cpu = None
    if "start" in marks and "end" in marks and marks["end"][0] > marks["start"][0]:
        cpu = (marks["end"][1] - marks["start"][1]) / ((marks["end"][0] - marks["start"][0]) * k)
    model_mb = params * 4 / MB
    row = base_row("dml", sync, task, peers, k, a, repeat, times, params)
    row.update({"cpu_s_per_step": cpu, "peak_rss_x_model": max((pk - b) / model_mb for pk, b in zip(peak, base)),
                "test_accuracy": st["metrics"]["test_accuracy"], "train_loss": st["metrics"]["train_loss"],
                "wall_s": time.monotonic() - t0, "job_id": job_id,
                "split": {x: split[x] for x in ("round_s", "train_s", "exchange_s", "wait_s", "allreduce_s", "eval_s",
                                                "coord_s")},
                "members_per_round": sorted({h["members"] for h in history}),
                "data_plane": spec.data_plane, "data_plane_seen": plane})
    return row, history, spec


# -- main -----------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--ddp-rank"]:
        return rank_main(argv)
    a = parse_args(argv)
    if a.link_mbit > 0:
        why = netem.check_prereqs()
        if why is not None:
            print(f"vs_ddp: error: {why}", file=sys.stderr)
            return 2
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, ro._interrupt)
    tmp = None
    base = a.log_dir
    if base is None:
        tmp = base = pathlib.Path(tempfile.mkdtemp(prefix="dml-vs-ddp-"))
    data_dir = base / "data"  # one data directory for both sides (a task file may write its data there)
    data_dir.mkdir(parents=True, exist_ok=True)
    keep = False
    rows: list[dict[str, Any]] = []
    root = base
    lan: netem.Lan | None = None
    tls_files = None
    try:
        if a.link_mbit > 0:
            from dml.common import certs

            tls_files = certs.make_certs(base / "certs", ["localhost"])[0]
            lan = netem.Lan(max(a.peers), a.link_mbit, bridge_addr=netem.BRIDGE_ADDR)
            try:
                lan.open()  # cleans what dead runs left behind first; tears itself down if it fails
            except netem.NetemError as e:
                print(f"vs_ddp: error: cannot build the emulated network: {e}", file=sys.stderr)
                return 2
            print(f"vs_ddp: {lan.describe()}", file=sys.stderr, flush=True)
        for task in a.task_list:
            try:
                params = num_params(task)
            except BenchError as e:
                print(f"vs_ddp: {e}", file=sys.stderr)
                return 1
            for peers in a.peers:
                for repeat in range(a.repeats):
                    runs = [("ddp", "grads", 1), ("dml", "grads", a.grads_local_steps), ("dml", "params", a.local_steps)]
                    if a.ddp_samples == "dml":  # DDP replays the grads job's batches: that job first
                        runs = [runs[1], runs[0], runs[2]]
                    ddp_row, replay, pending = None, None, []
                    for system, sync, k in runs:
                        root = base / f"{pathlib.Path(task).name.replace(':', '-')}-n{peers}-r{repeat}-{system}-{sync}"
                        print(f"[{system} {sync} {task_label(task)} N={peers}] starting (repeat {repeat + 1}/{a.repeats})",
                              file=sys.stderr, flush=True)
                        try:
                            if system == "ddp":
                                row = ddp_row = run_ddp(a, task, peers, repeat, root, data_dir, params, replay, lan)
                            else:
                                row, history, spec = run_dml(a, task, peers, sync, k, repeat, root, data_dir, params,
                                                             lan, tls_files)
                                if sync == "grads" and a.ddp_samples == "dml":
                                    try:
                                        replay = ledger_batches(history, job_shards(spec, task, data_dir), spec.seed,
                                                                k, a.batch_size)[:, :a.steps]
                                    except BenchError as e:  # DDP then draws its own samples, and says so
                                        print(f"[ddp grads {task_label(task)} N={peers}] {e}; DDP draws its own samples",
                                              file=sys.stderr, flush=True)
                                row = with_ratios(row, ddp_row)
                        except (BenchError, ApiError) as e:
                            print(f"vs_ddp: {e}", file=sys.stderr)
                            tails = log_tails(root / "logs")
                            if tails:
                                print(tails, file=sys.stderr)
                            keep = True
                            print(f"vs_ddp: logs kept in {root / 'logs'}", file=sys.stderr)
                            return 1
                        print(f"[{system} {sync} {task_label(task)} N={peers}] {row['step_s']:.4f} s/step, "
                              f"{row['samples_per_s']:.0f} samples/s, accuracy {_f(row['test_accuracy'], '.4f')}, "
                              f"{row['wall_s']:.1f}s", file=sys.stderr, flush=True)
                        if system == "dml" and ddp_row is None:  # ran before DDP: its ratios come after it
                            pending.append(row)
                            continue
                        for r in [with_ratios(x, ddp_row) for x in pending] + [row]:
                            rows.append(r)
                            if a.json:
                                print(json.dumps(r), flush=True)
                        pending = []
        if not a.json:
            print(table(rows, link_line(lan)), flush=True)
        return 0
    except KeyboardInterrupt:
        print("\nvs_ddp: interrupted; every process was stopped", file=sys.stderr)
        return 130
    finally:
        if lan is not None:
            lan.close()  # after every process was reaped (run_ddp's and cluster()'s own finally blocks)
        if tmp is not None and not keep:
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
