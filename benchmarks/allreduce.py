"""All-reduce benchmark: dml's ring between processes against torch.distributed gloo, same machine.

    python benchmarks/allreduce.py [--world-sizes 2,3,4] [--sizes-mb 1,64,256] [--codecs fp32]
                                   [--data-planes tcp] [--repeats 5] [--chunk-elems 262144] [--json]
                                   [--link-mbit 1000 [--egress-only] [--link-probe-s 1]] [--tls]

For every (N, size, codec, data plane) it starts two pools of N worker processes on 127.0.0.1
(``spawn``):

- dml: each worker runs its own gRPC server with an :class:`peer.exchange.ExchangeServicer` on
  127.0.0.1:0 (the ports go through the parent) and, for ``tcp``, its TCP data plane; per
  repetition it builds a :class:`peer.link.PeerLink` to its successor keyed by a fresh (job,
  round, epoch), exactly as ``Peer._make_link`` does, then times
  :func:`aggregation.allreduce.ring_allreduce` plus the link's shutdown. Peers negotiate the
  TCP stream over gRPC while they train (``PeerLink.open_early``), so the benchmark starts it
  before the barrier too; ``--open-in-time`` puts it inside the timed span instead. Lossy
  codecs run with an error-feedback residual, as peers do. ``torch`` (``--data-plane torch``,
  fp32 only) forms the workers' process group once, as a peer does per membership epoch
  (:meth:`peer.torchplane.TorchPlane.group_for`: the rendezvous through rank 0's exchange
  server), then times :meth:`peer.torchplane.TorchGroup.allreduce`, the collective with the
  plane's deadline timer around its wait;
- gloo: ``init_process_group('gloo', init_method='tcp://127.0.0.1:PORT')`` on a free port, then
  times ``dist.all_reduce`` on a float32 tensor of the same size.

``--tls`` adds a third pool, dml over mutual TLS (certificates from ``dml certs``'s code in a
temporary directory): its gRPC servers and channels and its TCP data plane (for ``shm``, the
headers' stream) inside TLS, as peers run with TLS on. Its row sits beside plain dml and gloo,
measured in the same run, with its cost: TLS time / plain time and TLS CPU / plain CPU.

The pools warm up once, then repetitions interleave (dml, gloo, dml, gloo, ...) so machine noise
hits both. Each repetition starts on a multiprocessing barrier; its time is the span from the
first worker leaving the barrier to the last one finishing (``perf_counter`` is the system-wide
monotonic clock), its CPU time the sum over the N workers of ``time.process_time`` (all threads
of the process, gRPC's included) over the same region. Rank r's buffer holds small integers in
[-10, 10], so the exact sum is representable in float32: every worker compares its result with it
and the largest absolute error over all ranks and repetitions is reported (it should be 0).

Per configuration it prints the time median [min..max], algorithm bandwidth (size / time) and bus
bandwidth (algbw x 2(N-1)/N, the nccl-tests convention; GB = 1e9 bytes, MB = 2**20 bytes), the
median CPU-seconds, and the ratio of medians dml / gloo. ``--json`` prints one JSON object per
configuration instead. Progress goes to stderr. Every wait has a deadline and every worker is
stopped, then terminated, then killed if need be.

``--link-mbit R`` (root and iproute2) replaces 127.0.0.1 with an emulated LAN (``netem.py``): one
network namespace per rank, a veth into a shared bridge, ``tbf`` limiting each rank to R Mbit/s
each way (``--egress-only``: what it sends only). Both workers of rank r (dml's and gloo's) enter
rank r's namespace before they open a socket, listen on and advertise its address
10.213.0.(r+1), and gloo rendezvouses at rank 0's. A plain-socket ring probe first reports the rate
the link reaches (``--link-probe-s``). The table gains the floor, 2(N-1)/N x the codec's wire bytes
x 8 / R (gloo's is fp32's), and each time over its floor; ``--json`` rows carry ``link_mbit`` (0 on
loopback), ``floor_s`` and ``gloo_floor_s`` (None on loopback). The LAN is deleted on exit, on
errors, on SIGINT and SIGTERM; a run killed outright leaves it until the next run deletes it.
"""
from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import multiprocessing as mp
import os
import pathlib
import platform
import signal
import socket
import statistics
import sys
import time
import traceback
from dataclasses import dataclass, field
from typing import Any

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
if str(ROOT / "benchmarks") not in sys.path:
    sys.path.insert(1, str(ROOT / "benchmarks"))  # netem, also when this file is loaded by path
for _var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
    os.environ.setdefault(_var, "1")  # inherited by the workers: one compute thread each

import netem
import numpy as np

from dml.aggregation.allreduce import chunk_elems_for
from dml.aggregation.codecs import CODEC_NAMES, get_codec

CODECS = CODEC_NAMES
DATA_PLANES = ("shm", "tcp", "grpc", "torch")
MB = 1 << 20
GB = 1e9
JOB = "allreduce-bench"
FILL_BLOCK = 1 << 20
READY_TIMEOUT_S = 180.0
BARRIER_TIMEOUT_S = 120.0
STOP_TIMEOUT_S = 10.0
IDLE_EXIT_S = 3600.0  # a worker whose parent stops talking to it exits after this long
NETNS_GLOO_PORTS = itertools.count(29500)  # a rank's namespace is private: a new port per gloo pool
FLOOR_SLACK = 0.97  # a time under this fraction of the floor means the link is not shaped


# -- data ------------------------------------------------------------------------------------------
def _pattern(rank: int, start: int, stop: int) -> np.ndarray:
    """Rank ``rank``'s values for elements [start, stop): small integers in [-10, 10]."""
    i = np.arange(start, stop, dtype=np.int64)
    return (((i * 7 + 3 * rank) % 17) + (i // 1021 + rank) % 5 - 10).astype(np.float32)


def _fill(out: np.ndarray, rank: int) -> None:
    for s in range(0, out.size, FILL_BLOCK):
        e = min(s + FILL_BLOCK, out.size)
        out[s:e] = _pattern(rank, s, e)


def _expected(n: int, world: int) -> np.ndarray:
    """The exact element-wise sum of every rank's pattern (exact in float32: |sum| <= 10 N)."""
    out = np.empty(n, dtype=np.float32)
    for s in range(0, n, FILL_BLOCK):
        e = min(s + FILL_BLOCK, n)
        acc = np.zeros(e - s, dtype=np.float64)
        for r in range(world):
            acc += _pattern(r, s, e)
        out[s:e] = acc
    return out


def _max_abs_err(buf: np.ndarray, expected: np.ndarray) -> float:
    worst = 0.0
    for s in range(0, buf.size, FILL_BLOCK):
        e = min(s + FILL_BLOCK, buf.size)
        d = np.abs(buf[s:e].astype(np.float64) - expected[s:e])
        worst = max(worst, float(d.max()) if d.size else 0.0)
    return worst


# -- workers ---------------------------------------------------------------------------------------
def _worker(kind: str, rank: int, world: int, n: int, conn: Any, barrier: Any, opts: dict[str, Any]) -> None:
    """One rank of one pool ("dml", "dml-tls" or "gloo"). Talks to the parent over ``conn``: sends
    ("ready", port), then for each ("run", rep) sends ("done", t0, t1, cpu_s, max_abs_err); exits
    on ("stop",) or a lost parent."""
    server = None
    try:
        hosts: list[str] = opts["hosts"] or ["127.0.0.1"] * world
        if opts["netns"]:  # first thing: every socket and thread of this process lives in the rank's namespace
            netem.enter_netns(opts["netns"][rank])
        host = hosts[rank]
        orig = np.empty(n, dtype=np.float32)
        _fill(orig, rank)
        buf = np.empty_like(orig)
        expected = _expected(n, world)
        timeout = float(opts["timeout_s"])
        if kind in ("dml", "dml-tls"):
            import threading
            from dml.aggregation.allreduce import ring_allreduce
            from dml.aggregation.codecs import get_codec
            from dml.common import rpc, tls
            from dml.peer.exchange import ExchangeServicer, add_exchange_to_server
            from dml.peer.link import PeerLink

            # Over the emulated LAN every pool of dml runs inside TLS: its addresses are not loopback,
            # and dml serves plain text on loopback only (common.tls.check_listen).
            tls_cfg = tls.load(*opts["tls_files"]) if kind == "dml-tls" or opts["netns"] else None

            codec = get_codec(str(opts["codec"]))
            residual = None if codec.exact else np.zeros(n, dtype=np.float32)
            if not codec.exact:
                import torch  # the lossy codecs' casts; one thread, like a peer

                torch.set_num_threads(1)
            plane = str(opts["data_plane"])
            if plane == "torch" and not codec.exact:
                raise ValueError("the torch data plane all-reduces in fp32 only")
            servicer = ExchangeServicer(lambda job, rnd: None, recv_timeout_s=timeout,
                                        data_plane_host=host if plane in ("shm", "tcp") else None, tls=tls_cfg)
            if plane == "torch":  # before the server starts, as a peer does: rank 0's store answers at once
                from dml.peer.torchplane import TorchPlane

                servicer.torch = TorchPlane(lambda: f"w{rank}", None, host, tls=tls_cfg)
            server = rpc.server(workers=16, max_message_bytes=rpc.EXCHANGE_MESSAGE_BYTES)
            add_exchange_to_server(servicer, server)
            port = rpc.bind(server, host, 0, tls=tls_cfg)
            server.start()
            conn.send(("ready", port))
            if not conn.poll(READY_TIMEOUT_S):
                raise TimeoutError("no peer ports from the parent")
            msg = conn.recv()
            if msg[0] != "ports":
                return
            ports: list[int] = msg[1]
            abort = threading.Event()
            succ = (rank + 1) % world
            if plane == "torch":
                import torch
                from dml.v1 import types_pb2

                torch.set_num_threads(1)
                plane_obj = servicer.torch
                assert plane_obj is not None
                plan = types_pb2.Plan(job_id=JOB, round=1, epoch=1, members=[
                    types_pb2.Member(peer_id=f"w{r}", address=f"{hosts[r]}:{ports[r]}") for r in range(world)])
                group = plane_obj.group_for(plan, rank, timeout, abort)

                def op(rep: int) -> tuple[float, float, float]:
                    barrier.wait(BARRIER_TIMEOUT_S)
                    t0, c0 = time.perf_counter(), time.process_time()
                    group.allreduce(buf, timeout, abort)
                    t1, c1 = time.perf_counter(), time.process_time()
                    return t0, t1, c1 - c0

            def ring_op(rep: int) -> tuple[float, float, float]:
                link = PeerLink(servicer, (JOB, rep, 0), f"w{rank}", f"w{(rank - 1) % world}", f"w{succ}",
                                f"{hosts[succ]}:{ports[succ]}", timeout, abort, idle_timeout_s=timeout, data_plane=plane,
                                tls=tls_cfg, chunk_elems=int(opts["chunk_elems"]))
                if residual is not None:
                    residual.fill(0.0)
                if opts["open_early"]:
                    link.open_early()  # as peers do: negotiated while they train, before the all-reduce
                barrier.wait(BARRIER_TIMEOUT_S)
                t0, c0 = time.perf_counter(), time.process_time()
                try:
                    ring_allreduce(buf, rank, world, link, timeout, int(opts["chunk_elems"]), codec, residual)
                    used = link.sender_kind
                finally:
                    link.shutdown()
                t1, c1 = time.perf_counter(), time.process_time()
                if used != plane:
                    raise RuntimeError(f"asked for the {plane} data plane, the link used {used!r}")
                return t0, t1, c1 - c0

            if plane != "torch":
                op = ring_op
        else:
            from datetime import timedelta

            import torch
            import torch.distributed as dist

            torch.set_num_threads(1)
            if opts["netns"]:
                os.environ["GLOO_SOCKET_IFNAME"] = opts["iface"]  # gloo's pairs on the emulated link
            dist.init_process_group("gloo", init_method=f"tcp://{hosts[0]}:{opts['gloo_port']}", rank=rank,
                                    world_size=world, timeout=timedelta(seconds=max(timeout, READY_TIMEOUT_S)))
            tensor = torch.from_numpy(buf)  # shares memory with buf
            conn.send(("ready", 0))

            def op(rep: int) -> tuple[float, float, float]:
                barrier.wait(BARRIER_TIMEOUT_S)
                t0, c0 = time.perf_counter(), time.process_time()
                dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
                t1, c1 = time.perf_counter(), time.process_time()
                return t0, t1, c1 - c0

        while True:
            if not conn.poll(IDLE_EXIT_S):
                return
            msg = conn.recv()
            if msg[0] == "stop":
                return
            np.copyto(buf, orig)
            t0, t1, cpu = op(int(msg[1]))
            check = opts["verify"] == "all" or int(msg[1]) == 1  # "first": the warm-up only
            conn.send(("done", t0, t1, cpu, _max_abs_err(buf, expected) if check else 0.0))
    except (EOFError, BrokenPipeError, KeyboardInterrupt):
        pass  # the parent went away or was interrupted: just clean up
    except BaseException:  # noqa: BLE001 - any failure is reported to the parent, which stops the pool
        barrier.abort()  # ranks waiting on the barrier fail at once instead of timing out
        with contextlib.suppress(OSError, ValueError):
            conn.send(("error", f"{kind} rank {rank}: {traceback.format_exc()}"))
    finally:
        if server is not None:
            if servicer.torch is not None:
                servicer.torch.drop("the benchmark worker stops")
            server.stop(0)
            servicer.close()
        dist_mod = sys.modules.get("torch.distributed")
        if kind == "gloo" and dist_mod is not None and dist_mod.is_initialized():
            with contextlib.suppress(RuntimeError):
                dist_mod.destroy_process_group()


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _recv(conn: Any, deadline: float, what: str) -> tuple:
    left = deadline - time.monotonic()
    if left <= 0 or not conn.poll(left):
        raise TimeoutError(f"timed out waiting for {what}")
    msg = conn.recv()
    if msg[0] == "error":
        raise RuntimeError(f"worker failed during {what}:\n{msg[1]}")
    return msg


class Pool:
    """N worker processes of one kind ("dml" or "gloo") for one configuration."""

    def __init__(self, ctx: Any, kind: str, world: int, n: int, opts: dict[str, Any]) -> None:
        self.kind, self.world, self.n = kind, world, n
        self.timeout_s = float(opts["timeout_s"])
        self.barrier = ctx.Barrier(world)
        self.conns: list[Any] = []
        self.procs: list[Any] = []
        self.rep = 0
        for rank in range(world):
            parent, child = ctx.Pipe()
            p = ctx.Process(target=_worker, args=(kind, rank, world, n, child, self.barrier, opts),
                            name=f"{kind}-{rank}", daemon=True)
            p.start()
            child.close()
            self.conns.append(parent)
            self.procs.append(p)

    def wait_ready(self) -> None:
        deadline = time.monotonic() + READY_TIMEOUT_S
        ports = [_recv(c, deadline, f"{self.kind} rank {r} to start")[1] for r, c in enumerate(self.conns)]
        if self.kind != "gloo":
            for c in self.conns:
                c.send(("ports", ports))
        _log(f"  {self.kind} workers up: pids {[p.pid for p in self.procs]}")

    def run(self) -> tuple[float, float, float]:
        """One repetition: (seconds from first start to last finish, CPU-s summed, max abs error)."""
        self.rep += 1
        for c in self.conns:
            c.send(("run", self.rep))
        deadline = time.monotonic() + self.timeout_s + BARRIER_TIMEOUT_S + 30.0
        got = [_recv(c, deadline, f"{self.kind} rank {r} repetition {self.rep}") for r, c in enumerate(self.conns)]
        span = max(m[2] for m in got) - min(m[1] for m in got)
        return span, sum(m[3] for m in got), max(m[4] for m in got)

    def close(self) -> None:
        for c in self.conns:
            try:
                c.send(("stop",))
            except (OSError, ValueError):
                pass
        deadline = time.monotonic() + STOP_TIMEOUT_S
        for p in self.procs:
            p.join(max(0.1, deadline - time.monotonic()))
        for p in self.procs:
            if p.is_alive():
                p.terminate()
                p.join(3.0)
            if p.is_alive():
                p.kill()
                p.join(3.0)
        for c in self.conns:
            c.close()


# -- measurement -----------------------------------------------------------------------------------
@dataclass
class Series:
    times: list[float] = field(default_factory=list)
    cpus: list[float] = field(default_factory=list)
    max_err: float = 0.0

    def add(self, t: float, cpu: float, err: float) -> None:
        self.times.append(t)
        self.cpus.append(cpu)
        self.max_err = max(self.max_err, err)


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def measure(ctx: Any, world: int, size_mb: float, codec: str, plane: str, args: argparse.Namespace,
            lan: netem.Lan | None = None) -> dict[str, Any]:
    n = round(size_mb * MB / 4)
    if n < world:
        raise ValueError(f"{size_mb} MB is fewer elements than ranks")
    timeout_s = args.timeout_s or max(60.0, 1.0 * size_mb * world)
    if lan is not None:  # at least 3x the floor of the slowest (fp32) transfer, plus slack
        timeout_s = args.timeout_s or max(timeout_s, 3 * netem.ring_floor_s(world, n * 4, lan.mbit) + 60.0)
    opts = {"chunk_elems": args.chunk_elems or chunk_elems_for(plane), "timeout_s": timeout_s, "codec": codec,
            "gloo_port": next(NETNS_GLOO_PORTS) if lan is not None else _free_port(),
            "data_plane": plane, "verify": args.verify, "open_early": not args.open_in_time,
            "netns": lan.names[:world] if lan is not None else None,
            "hosts": lan.addrs[:world] if lan is not None else None, "iface": netem.IFACE,
            "tls_files": args.tls_files}
    kinds = ["dml", "gloo"] + (["dml-tls"] if args.tls else [])
    series = {k: Series() for k in kinds}
    dml, gloo = series["dml"], series["gloo"]
    pools: dict[str, Pool] = {}
    try:
        _log(f"N={world} {size_mb:g} MB {codec} over {plane}: starting workers")
        for k in kinds:
            pools[k] = Pool(ctx, k, world, n, opts)
            pools[k].wait_ready()
        warm = {k: pools[k].run() for k in kinds}  # warm-up, not counted (errors still are)
        for k in kinds:
            series[k].max_err = warm[k][2]
        _log("  warm-up: " + " ".join(f"{k} {warm[k][0]:.4f} s" for k in kinds))
        for r in range(args.repeats):
            for k in kinds:
                series[k].add(*pools[k].run())
            _log(f"  rep {r + 1}/{args.repeats}: " + "  ".join(
                f"{k} {series[k].times[-1]:.4f} s ({series[k].cpus[-1]:.2f} CPU-s)" for k in kinds))
    finally:
        for p in reversed(list(pools.values())):
            p.close()
    nbytes = n * 4
    bus = 2 * (world - 1) / world
    row: dict[str, Any] = {"world_size": world, "size_mb": size_mb, "codec": codec, "data_plane": plane,
                           "chunk_elems": opts["chunk_elems"], "repeats": args.repeats}
    for name, s in [("dml", dml), ("gloo", gloo)] + ([("tls", series["dml-tls"])] if "dml-tls" in series else []):
        med = statistics.median(s.times)
        row[f"{name}_s"] = med
        row[f"{name}_min_s"] = min(s.times)
        row[f"{name}_max_s"] = max(s.times)
        row[f"{name}_algbw_gbs"] = nbytes / med / GB
        row[f"{name}_busbw_gbs"] = nbytes / med / GB * bus
        row[f"{name}_cpu_s"] = statistics.median(s.cpus)
        row[f"{name}_times_s"] = s.times
    row["ratio"] = row["dml_s"] / row["gloo_s"]
    row["cpu_ratio"] = row["dml_cpu_s"] / row["gloo_cpu_s"] if row["gloo_cpu_s"] > 0 else None
    row["max_abs_err"] = dml.max_err
    if "dml-tls" in series:  # what TLS costs: the same all-reduce, same run, inside TLS
        row["tls_cost"] = row["tls_s"] / row["dml_s"]
        row["tls_cpu_cost"] = row["tls_cpu_s"] / row["dml_cpu_s"] if row["dml_cpu_s"] > 0 else None
        row["max_abs_err"] = max(dml.max_err, series["dml-tls"].max_err)
    row["gloo_max_abs_err"] = gloo.max_err
    row["link_mbit"] = lan.mbit if lan is not None else 0
    row["floor_s"] = row["gloo_floor_s"] = None
    if lan is not None:
        row["floor_s"] = netem.ring_floor_s(world, get_codec(codec).payload_bytes(n), lan.mbit)
        row["gloo_floor_s"] = netem.ring_floor_s(world, nbytes, lan.mbit)
        for name, floor in (("dml", row["floor_s"]), ("gloo", row["gloo_floor_s"])):
            if row[f"{name}_min_s"] < FLOOR_SLACK * floor:
                _log(f"  WARNING: {name} took {row[f'{name}_min_s']:.4f} s, under the {lan.mbit:g} Mbit/s floor "
                     f"{floor:.4f} s: the link is not shaped as asked")
    return row


HEADER = (f"{'N':>2} {'size MB':>7} {'codec':>5} {'plane':>5} | {'dml s median [min..max]':>27} {'algbw':>6} {'busbw':>6}"
          f" {'CPU-s':>6} | {'gloo s median [min..max]':>27} {'algbw':>6} {'busbw':>6} {'CPU-s':>6}"
          f" | {'ratio':>5} {'CPU x':>5} {'max_err':>7}")


LINK_HEADER = f" | {'floor s':>7} {'dml/fl':>6} {'gl/fl':>6}"
TLS_HEADER = f" | {'dml+TLS s median [min..max]':>27} {'algbw':>6} {'busbw':>6} {'CPU-s':>6} {'TLS x':>5} {'CPU x':>5}"


def _fmt_row(r: dict[str, Any]) -> str:
    def side(k: str) -> str:
        t = f"{r[k + '_s']:.4f} [{r[k + '_min_s']:.4f}..{r[k + '_max_s']:.4f}]"
        return f"{t:>27} {r[k + '_algbw_gbs']:6.3f} {r[k + '_busbw_gbs']:6.3f} {r[k + '_cpu_s']:6.3f}"

    cpu_x = f"{r['cpu_ratio']:5.2f}" if r["cpu_ratio"] is not None else "    -"
    line = (f"{r['world_size']:>2} {r['size_mb']:>7g} {r['codec']:>5} {r['data_plane']:>5} | {side('dml')} | {side('gloo')}"
            f" | {r['ratio']:5.2f} {cpu_x} {max(r['max_abs_err'], r['gloo_max_abs_err']):7.1g}")
    if r.get("floor_s") is not None:  # the codec's floor; gloo's is always fp32's
        line += f" | {r['floor_s']:7.4f} {r['dml_s'] / r['floor_s']:6.2f} {r['gloo_s'] / r['gloo_floor_s']:6.2f}"
    if r.get("tls_cost") is not None:  # TLS x: time over plain dml's; CPU x: CPU-s over plain dml's
        cpu = f"{r['tls_cpu_cost']:5.2f}" if r["tls_cpu_cost"] is not None else "    -"
        line += f" | {side('tls')} {r['tls_cost']:5.2f} {cpu}"
    return line


def _csv(kind: type, text: str, flag: str, p: argparse.ArgumentParser) -> list:
    try:
        vals = [kind(x) for x in text.split(",") if x.strip()]
    except ValueError:
        p.error(f"{flag}: expected a comma-separated list, got {text!r}")
    if not vals:
        p.error(f"{flag}: empty list")
    return vals


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="allreduce.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--world-sizes", default="2,3,4", help="comma-separated process counts (default 2,3,4)")
    p.add_argument("--sizes-mb", default="1,64,256", help="comma-separated buffer sizes in MB of 2**20 bytes (default 1,64,256)")
    p.add_argument("--codecs", default="fp32", help=f"comma-separated wire codecs; known: {', '.join(CODECS)}")
    p.add_argument("--data-planes", default="tcp",
                   help="comma-separated ways dml's chunks travel: shm (shared memory on one host, headers "
                        "over TCP), tcp (the fast data plane), grpc (default tcp)")
    p.add_argument("--repeats", type=int, default=5, help="timed repetitions per configuration (default 5)")
    p.add_argument("--chunk-elems", type=int, default=0,
                   help=f"float32 elements per dml wire chunk, at most {1 << 20} (default 0: as peers pick, "
                        f"{chunk_elems_for('tcp')} over tcp, {chunk_elems_for('shm')} over shm, {chunk_elems_for('grpc')} over grpc)")
    p.add_argument("--timeout-s", type=float, default=0.0,
                   help="deadline per all-reduce (default max(60, size_mb x N) seconds)")
    p.add_argument("--verify", choices=("all", "first"), default="all",
                   help="check every repetition's result against the exact sum (default), or only the warm-up's "
                        "(keeps a profiler's samples to the all-reduce itself)")
    p.add_argument("--open-in-time", action="store_true",
                   help="negotiate each link inside the timed span (peers negotiate while they train; by "
                        "default the benchmark does it before the barrier, as they do)")
    p.add_argument("--link-mbit", type=float, default=0.0,
                   help="emulate a LAN of this many Mbit/s per rank and direction (network namespaces, veth, tbf; "
                        "needs root and iproute2); default 0: plain 127.0.0.1")
    p.add_argument("--egress-only", action="store_true",
                   help="with --link-mbit, shape only what each rank sends (default: both directions)")
    p.add_argument("--link-probe-s", type=float, default=1.0,
                   help="with --link-mbit, seconds of plain-socket ring traffic per world size before the "
                        "all-reduces, to report the rate the link reaches (default 1; 0: skip)")
    p.add_argument("--tls", action="store_true",
                   help="also time dml over mutual TLS (gRPC and the data plane), beside plain dml and gloo, "
                        "and print what it costs")
    p.add_argument("--json", action="store_true", help="one JSON object per configuration on stdout")
    a = p.parse_args(argv)
    a.world_sizes = _csv(int, a.world_sizes, "--world-sizes", p)
    a.sizes_mb = _csv(float, a.sizes_mb, "--sizes-mb", p)
    a.codecs = [c.strip() for c in a.codecs.split(",") if c.strip()]
    if not a.codecs:
        p.error("--codecs: empty list")
    unknown = [c for c in a.codecs if c not in CODECS]
    if unknown:
        p.error(f"--codecs: unknown codec(s) {', '.join(map(repr, unknown))}; choose from {', '.join(CODECS)}")
    a.data_planes = [c.strip() for c in a.data_planes.split(",") if c.strip()]
    if not a.data_planes or any(c not in DATA_PLANES for c in a.data_planes):
        p.error(f"--data-planes: expected a comma-separated list of {', '.join(DATA_PLANES)}")
    if any(w < 2 for w in a.world_sizes):
        p.error("--world-sizes: every world size must be at least 2")
    if any(s <= 0 for s in a.sizes_mb):
        p.error("--sizes-mb: sizes must be positive")
    if a.repeats < 1:
        p.error("--repeats must be at least 1")
    if not 0 <= a.chunk_elems <= 1 << 20:
        p.error(f"--chunk-elems must be 0 (auto) or 1..{1 << 20} (4 MiB messages), got {a.chunk_elems}")
    if a.timeout_s < 0:
        p.error("--timeout-s must not be negative")
    if not a.link_mbit >= 0:  # also NaN
        p.error(f"--link-mbit must be 0 (loopback) or a positive rate in Mbit/s, got {a.link_mbit:g}")
    if a.link_mbit and max(a.world_sizes) > netem.MAX_RANKS:
        p.error(f"--link-mbit: at most {netem.MAX_RANKS} ranks")
    if a.link_probe_s < 0:
        p.error("--link-probe-s must not be negative")
    a.tls_files = None  # (cert, key, ca) once main has made them
    return a


def _raise_exit(signum: int, frame: Any) -> None:
    raise SystemExit(128 + signum)  # unwinds through the finally blocks: workers stopped, LAN deleted


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.link_mbit > 0:
        why = netem.check_prereqs()
        if why is not None:
            print(f"allreduce.py: error: {why}", file=sys.stderr)
            return 2
    ctx = mp.get_context("spawn")
    lan: netem.Lan | None = None
    old_term = signal.signal(signal.SIGTERM, _raise_exit)
    certs_dir = None
    try:
        if args.tls or args.link_mbit > 0:
            import tempfile

            from dml.common import certs

            certs_dir = tempfile.TemporaryDirectory(prefix="allreduce-tls-")
            made = certs.make_certs(pathlib.Path(certs_dir.name), ["localhost"])[0]
            args.tls_files = (str(made.cert), str(made.key), str(made.ca))
        if args.link_mbit > 0:
            lan = netem.Lan(max(args.world_sizes), args.link_mbit, egress_only=args.egress_only)
            try:
                lan.open()
            except netem.NetemError as e:
                print(f"allreduce.py: error: cannot build the emulated network: {e}", file=sys.stderr)
                return 2
            _log(lan.describe())
        where = "127.0.0.1" if lan is None else f"one network namespace per rank, {lan.mbit:g} Mbit/s links"
        if not args.json:
            print(f"# all-reduce (sum, float32 buffers): dml ring vs torch.distributed gloo (always fp32), {where}, "
                  f"{os.cpu_count()} CPUs, Python {platform.python_version()}")
            print(f"# chunk_elems={args.chunk_elems or 'auto'} repeats={args.repeats}; time = median [min..max] s from the first "
                  f"rank leaving the barrier to the last one done; algbw/busbw GB/s (busbw = algbw x 2(N-1)/N); "
                  f"CPU-s = median over repeats of the sum over ranks; ratio = dml/gloo median time; CPU x = dml/gloo "
                  f"CPU-s; max_err = max |result - exact sum| over both, every rank and repeat")
            if lan is not None:
                print(f"# {lan.describe()}")
                print("# dml runs inside mutual TLS here (the namespaces' addresses are not loopback, and dml "
                      "serves plain text on loopback only); gloo is plain TCP")
                print("# floor s = 2(N-1)/N x the codec's wire bytes x 8 / rate (each rank's share of the ring on its "
                      "link); dml/fl = dml median / that floor; gl/fl = gloo median / fp32's floor")
            if args.tls:
                print("# dml+TLS: the same dml ring inside mutual TLS (TLS 1.3, ECDSA P-256); TLS x = its median "
                      "time / plain dml's, CPU x = its CPU-s / plain dml's")
            print(HEADER + (LINK_HEADER if lan is not None else "") + (TLS_HEADER if args.tls else ""), flush=True)
        for world in args.world_sizes:
            if lan is not None and args.link_probe_s > 0:
                rates = netem.probe_ring(ctx, lan, world, args.link_probe_s)
                msg = (f"ring probe, N={world}: every rank sending to the next for {args.link_probe_s:g} s over plain "
                       f"TCP, received Mbit/s by rank: {', '.join(f'{r:.0f}' for r in rates)}")
                _log(msg)
                if not args.json:
                    print(f"# {msg}", flush=True)
            for size_mb in args.sizes_mb:
                for codec in args.codecs:
                    for plane in args.data_planes:
                        row = measure(ctx, world, size_mb, codec, plane, args, lan)
                        print(json.dumps(row) if args.json else _fmt_row(row), flush=True)
    except KeyboardInterrupt:
        _log("interrupted")
        return 130
    finally:
        if lan is not None:
            lan.close()
        if certs_dir is not None:
            certs_dir.cleanup()
        signal.signal(signal.SIGTERM, old_term)
    return 0


if __name__ == "__main__":
    sys.exit(main())
