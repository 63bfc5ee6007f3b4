"""``dml-peer``: joins a coordinator and trains until SIGINT or SIGTERM."""
from __future__ import annotations

from dml.common import lifeline

if __name__ == "__main__":  # `python -m` (as LocalCluster starts it): watch the parent from before the
    lifeline.watch_parent()  # imports below (torch: seconds, more on a loaded machine)

import argparse
import dataclasses
import logging
import os
import pathlib
import sys
from typing import TYPE_CHECKING

import grpc

from dml.aggregation.allreduce import DEFAULT_CHUNK_ELEMS, SHM_CHUNK_ELEMS, TCP_CHUNK_ELEMS
from dml.common import args as cliargs
from dml.common import portcheck, rpc, tls
from dml.common.metrics import MetricsBindError
from dml.common.spec import DEFAULT_POOL
from dml.common.auth import AuthError, read_token_file
from dml.peer import diskcopy
from dml.peer.client import VersionMismatch
from dml.peer.faults import parse_fault
from dml.peer.worksplit import MAX_WORKERS

if TYPE_CHECKING:
    from dml.peer.runner import PeerConfig


def resolve_device(choice: str) -> str:
    """``auto`` picks CUDA when present; ``cuda:N`` is checked to exist. torch is imported only
    to look for CUDA, so a mistyped flag is answered at once rather than after torch's start-up."""
    if choice == "cpu":
        return "cpu"
    if choice != "auto" and not choice.startswith("cuda"):
        raise ValueError(f"--device must be auto, cpu or cuda:N, got {choice!r}")
    import torch

    if choice == "auto":
        return "cuda:0" if torch.cuda.is_available() else "cpu"
    if choice.startswith("cuda"):
        idx = int(choice.split(":", 1)[1]) if ":" in choice else 0
        if not torch.cuda.is_available() or idx >= torch.cuda.device_count():
            raise ValueError(f"--device {choice}: no such CUDA device ({torch.cuda.device_count()} visible)")
        return f"cuda:{idx}"
    raise ValueError(f"--device must be auto, cpu or cuda:N, got {choice!r}")


def gpu_list(text: str) -> tuple[int, ...]:
    """``--gpus 0,1,3``: CUDA device indices, one worker each ("" for none). An index may
    repeat (``0,0``: two workers on one GPU, which then reduce over gloo: NCCL refuses two
    ranks on one device)."""
    if not text.strip():
        return ()
    try:
        out = tuple(int(x) for x in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be comma-separated device indices such as 0,1, got {text!r}") from None
    if any(g < 0 for g in out) or len(out) > MAX_WORKERS:
        raise argparse.ArgumentTypeError(f"must be device indices >= 0, at most {MAX_WORKERS}, got {text!r}")
    return out


def build_parser() -> argparse.ArgumentParser:
    """The ``dml-peer`` argument parser (defaults from DML_* environment variables)."""
    p = cliargs.Parser(prog="dml-peer", description="Join a dml coordinator and train.")
    cliargs.add_version(p)
    p.add_argument("--coordinator", type=cliargs.address, default=os.environ.get("DML_COORDINATOR"),
                   help="coordinator HOST:PORT (required unless env DML_COORDINATOR is set)")
    p.add_argument("--host", default=os.environ.get("DML_PEER_HOST", "127.0.0.1"), help="address to bind the exchange server")
    p.add_argument("--port", type=cliargs.int_in(0, 65535), default=int(os.environ.get("DML_PEER_PORT", "0")),
                   help="exchange port; 0 picks a free one")
    p.add_argument("--advertise-host", default=os.environ.get("DML_ADVERTISE_HOST", "auto"),
                   help="host other peers dial; auto: --host, or for 0.0.0.0 and :: this "
                        "machine's address on the route to the coordinator (in a container, its own IP)")
    p.add_argument("--device", default=os.environ.get("DML_DEVICE", "auto"), help="auto, cpu or cuda:N")
    p.add_argument("--exchange-timeout-s", type=float, default=float(os.environ.get("DML_EXCHANGE_TIMEOUT_S", "30")),
                   help="give up on the ring when no chunk arrives for this many seconds")
    p.add_argument("--no-tcp", action="store_true", default=os.environ.get("DML_NO_TCP", "") not in ("", "0"),
                   help="serve no TCP data plane: neighbours send ring chunks over gRPC (env DML_NO_TCP=1)")
    p.add_argument("--chunk-elems", type=int, default=int(os.environ.get("DML_CHUNK_ELEMS", "0")),
                   help=f"float32 elements per exchange chunk, at most 1M (default 0: {TCP_CHUNK_ELEMS} over TCP, "
                        f"{SHM_CHUNK_ELEMS} where shared memory may carry them (shm, auto), "
                        f"{DEFAULT_CHUNK_ELEMS} over gRPC, as measured fastest)")
    p.add_argument("--torch-threads", type=int, default=int(os.environ.get("DML_TORCH_THREADS", "1")),
                   help="intra-op threads for torch (1 suits several peers per machine)")
    p.add_argument("--slowdown", type=float, default=float(os.environ.get("DML_SLOWDOWN", "1")),
                   help="experiments: train this many times slower than this machine can, by idling "
                        "(slowdown - 1) x the training time after each local training (default 1: off)")
    p.add_argument("--max-samples", type=cliargs.int_in(0, 2**63 - 1), default=int(os.environ.get("DML_MAX_SAMPLES", "0")),
                   help="the most training samples this peer takes (its data capacity; the coordinator never "
                        "places more shards on it, and leaves data unassigned rather than overfill; env "
                        "DML_MAX_SAMPLES; default 0: no cap)")
    p.add_argument("--pool", type=cliargs.pool_name, default=os.environ.get("DML_POOL", DEFAULT_POOL),
                   help="the resource pool this peer serves: it runs only jobs submitted to it (dml submit --pool) "
                        f"or to no pool (env DML_POOL; default {DEFAULT_POOL!r})")
    p.add_argument("--fault-unreachable", default=os.environ.get("DML_FAULT_UNREACHABLE", ""), metavar="ADDRS",
                   help="tests only (fault injection, off by default): comma-separated peer addresses HOST:PORT "
                        "this peer acts as if it cannot reach (a one-way partition; env DML_FAULT_UNREACHABLE)")
    p.add_argument("--fault", default=os.environ.get("DML_FAULT", ""), metavar="KIND:ROUND",
                   help="tests only (fault injection, off by default): from round ROUND on, write NaN (KIND "
                        "nan-params) or 1e30 (huge-params) into this peer's parameters and skip its own check, "
                        "a broken peer its neighbours must refuse; hold-collective: on the torch data plane, "
                        "never enter round ROUND's collective once the others have; pause-round: stop this process (SIGSTOP) "
                        "at the start of round ROUND, once; kill-worker: worker 1 of a "
                        "--workers peer dies at round ROUND, once (env DML_FAULT)")
    p.add_argument("--workers", type=cliargs.int_in(1, MAX_WORKERS), default=int(os.environ.get("DML_WORKERS", "1")),
                   help="train with N worker processes (DistributedDataParallel over gloo inside this host); the "
                        "peer stays the host's one member of the ring and is allocated N members' samples a round "
                        "(env DML_WORKERS; default 1: train in the peer process)")
    p.add_argument("--gpus", type=gpu_list, default=os.environ.get("DML_GPUS", ""), metavar="0,1,...",
                   help="one worker per listed CUDA device, each started with CUDA_VISIBLE_DEVICES set to it "
                        "(DistributedDataParallel over NCCL); excludes --workers (env DML_GPUS)")
    p.add_argument("--allow-job-code", action="store_true",
                   default=os.environ.get("DML_ALLOW_JOB_CODE", "") not in ("", "0"),
                   help="run the task code a job sends (a task file or package); without it this peer declines "
                        "such jobs and runs only built-in tasks and package.module:NAME from its own environment "
                        "(env DML_ALLOW_JOB_CODE=1)")
    p.add_argument("--allow-torch-plane", action="store_true",
                   default=os.environ.get("DML_ALLOW_TORCH_PLANE", "") not in ("", "0"),
                   help="with TLS on, still take --data-plane torch jobs, whose tensors travel over "
                        "torch.distributed's own sockets unencrypted (gloo/NCCL: trusted networks only); "
                        "without it such a peer declines them (env DML_ALLOW_TORCH_PLANE=1)")
    p.add_argument("--data-dir", type=pathlib.Path, default=os.environ.get("DML_DATA_DIR") or None,
                   help="where tasks read their data (their ctx.data_dir; default: the working directory; "
                        "env DML_DATA_DIR)")
    p.add_argument("--data", dest="local_data", type=cliargs.local_dataset, action="append", default=[],
                   metavar="NAME=PATH",
                   help="offer a local dataset to --placement local jobs naming NAME (dml submit --local-data NAME): "
                        "their tasks read PATH (a folder or a file) as ctx.data_dir, and the data never leaves this "
                        "peer (the coordinator hears its sample and label counts only); repeatable")
    p.add_argument("--code-cache-dir", type=pathlib.Path, default=os.environ.get("DML_CODE_CACHE_DIR") or None,
                   help="keep fetched task code here (default: a temp dir removed at exit; env DML_CODE_CACHE_DIR)")
    p.add_argument("--cache-dir", type=pathlib.Path, default=os.environ.get("DML_CACHE_DIR") or None,
                   help="keep datasets fetched from the coordinator's store (jobs submitted with --dataset) here, "
                        "so later jobs and restarts reuse them (default: .dml-cache in the working directory; "
                        "env DML_CACHE_DIR)")
    p.add_argument("--cache-max-gb", type=cliargs.float_in(0, 1 << 20, lo_open=False),
                   default=os.environ.get("DML_CACHE_MAX_GB", "0"),
                   help="the most GB (1e9 bytes) of dataset chunks kept in --cache-dir, least recently used "
                        "punched out first (never one being read; env DML_CACHE_MAX_GB; "
                        "default 0: no limit)")
    p.add_argument("--committed-copy", choices=("memory", "disk"), default=os.environ.get("DML_COMMITTED_COPY", "memory"),
                   help="where the committed parameters a failed round restarts from are kept: memory (default), "
                        "or disk, an unlinked file in --committed-copy-dir that lives in the page cache, which the "
                        "kernel can write back and reclaim: a model's worth less resident memory, for a read or "
                        "write through the kernel when a round commits, checks or restarts (env DML_COMMITTED_COPY)")
    p.add_argument("--committed-copy-dir", type=pathlib.Path, default=os.environ.get("DML_COMMITTED_COPY_DIR") or None,
                   help="with --committed-copy disk: a directory on a disk, not tmpfs (default /var/tmp; "
                        "env DML_COMMITTED_COPY_DIR)")
    cliargs.add_cluster_flag(p)
    p.add_argument("--log-level", default=os.environ.get("DML_LOG_LEVEL", "INFO"), help="logging level")
    cliargs.add_metrics_flag(p)
    cliargs.add_auth_flags(p, "peer")
    cliargs.add_tls_flags(p)
    return p


def build_config(argv: list[str] | None = None) -> tuple[PeerConfig, argparse.Namespace]:
    """Flags, then DML_* environment variables, then defaults."""
    p = build_parser()
    a = p.parse_args(argv)
    if not a.coordinator:
        p.error("--coordinator HOST:PORT is required")
    if not 0 <= a.chunk_elems <= 1 << 20:
        p.error(f"--chunk-elems must be 0 (auto) or 1..{1 << 20} (4 MiB messages), got {a.chunk_elems}")
    if not a.exchange_timeout_s > 0:
        p.error("--exchange-timeout-s must be positive")
    if not 1 <= a.slowdown <= 1000:
        p.error(f"--slowdown must be between 1 and 1000, got {a.slowdown}")
    if a.gpus and a.workers != 1:
        p.error("--gpus starts one worker per listed device; do not give --workers with it")
    names = [n for n, _ in a.local_data]
    if len(set(names)) != len(names):
        p.error(f"--data: each NAME once (got {', '.join(sorted(names))})")
    data_dir = (a.data_dir or pathlib.Path.cwd()).resolve()
    if not data_dir.is_dir():
        p.error(f"--data-dir {a.data_dir}: no such directory")
    disk_dir = None
    if a.committed_copy not in ("memory", "disk"):  # argparse checks a flag's value, not a default's
        p.error(f"--committed-copy (env DML_COMMITTED_COPY): choose memory or disk, got {a.committed_copy!r}")
    if a.committed_copy == "disk":
        disk_dir = (a.committed_copy_dir or diskcopy.default_dir()).resolve()
        why = diskcopy.check_dir(disk_dir)
        if why:
            p.error(f"--committed-copy-dir: {why}")
    elif a.committed_copy_dir is not None:
        p.error("--committed-copy-dir is for --committed-copy disk")
    try:
        # With --gpus the workers hold the GPUs; the supervisor's own copy (exchange, evaluation)
        # stays on the CPU unless --device says otherwise.
        device = "cpu" if a.gpus and a.device == "auto" else resolve_device(a.device)
        fault = parse_fault(a.fault)
    except ValueError as e:
        p.error(str(e))
    from dml.peer.runner import PeerConfig  # torch and the whole peer: only once the flags are good

    cfg = PeerConfig(coordinator=a.coordinator, host=a.host, port=a.port, advertise_host=a.advertise_host,
                     device=device, exchange_timeout_s=a.exchange_timeout_s, chunk_elems=a.chunk_elems,
                     tcp=not a.no_tcp, slowdown=a.slowdown, max_samples=a.max_samples, pool=a.pool, metrics=cliargs.metrics_config(a),
                     unreachable=tuple(x.strip() for x in a.fault_unreachable.split(",") if x.strip()),
                     cluster_id=a.cluster_id, fault=fault, tls=cliargs.tls_config(p, a, serve=True),
                     allow_job_code=a.allow_job_code, allow_torch_plane=a.allow_torch_plane, data_dir=data_dir, local_data=tuple(a.local_data),
                     code_cache_dir=a.code_cache_dir.resolve() if a.code_cache_dir is not None else None,
                     cache_dir=(a.cache_dir or pathlib.Path.cwd() / ".dml-cache").resolve(),
                     cache_max_bytes=int(a.cache_max_gb * 1e9), workers=len(a.gpus) or a.workers,
                     gpus=tuple(a.gpus), committed_copy_dir=disk_dir)
    return cfg, a


M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter


def return_big_buffers_to_the_os(threshold: int = 1 << 20) -> None:
    """Serves every allocation of ``threshold`` bytes or more with its own mapping, so freeing
    it (gradients, evaluation activations, exchange buffers) gives the memory back. glibc's
    default raises the threshold after each large free, up to 32 MiB, and then keeps freed
    gradient-sized blocks resident: measured on synthetic:10M, 20 MB more RSS after the first
    step and a 54 MB higher peak. A no-op where the C library is not glibc."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").mallopt(M_MMAP_THRESHOLD, threshold)
    except (OSError, AttributeError):
        pass


def main(argv: list[str] | None = None) -> None:
    """Entry point."""
    lifeline.watch_parent()  # first (a no-op when done at import): a parent that died already is seen at once
    cfg, a = build_config(argv)
    if a.join_token_file is not None:  # read at start, not at parse time: the coordinator may make it later
        try:
            cfg = dataclasses.replace(cfg, join_token=read_token_file(a.join_token_file))
        except (OSError, AuthError) as e:
            print(f"dml-peer: cannot read the join token from {a.join_token_file}: {getattr(e, 'strerror', None) or e}",
                  file=sys.stderr)
            sys.exit(2)
    return_big_buffers_to_the_os()
    logging.basicConfig(level=a.log_level.upper(), format="%(asctime)s %(levelname)s peer %(name)s: %(message)s")
    import torch

    torch.set_num_threads(max(1, a.torch_threads))
    from dml.peer.runner import Peer

    try:
        peer = Peer(cfg)
    except (MetricsBindError, tls.TlsError) as e:  # --metrics-port taken or not this machine's; plain text off loopback
        print(f"dml-peer: {e}", file=sys.stderr)
        sys.exit(2)
    except rpc.BindError:  # --port taken, or --host not this machine's
        print(f"dml-peer: {portcheck.bind_failure(cfg.host, cfg.port, tls=cfg.tls)}", file=sys.stderr)
        sys.exit(2)
    except OSError as e:
        print(f"dml-peer: {e}", file=sys.stderr)
        sys.exit(1)
    lifeline.on_stop_signals(lambda _signum: peer.stop_event.set())  # set on a thread, never in a signal handler
    try:
        peer.start()
    except VersionMismatch as e:
        print(f"dml-peer: {cfg.coordinator}: {e}", file=sys.stderr)
        peer.stop()
        leave(2)
    except grpc.RpcError as e:
        code = e.code() if isinstance(e, grpc.Call) else None
        if code in (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED):
            print(f"dml-peer: {cfg.coordinator} refused the registration: {e.details()}", file=sys.stderr)  # type: ignore[union-attr]
            peer.stop()
            leave(2)
        print(f"dml-peer: cannot register with {cfg.coordinator}: {code or e}", file=sys.stderr)
        peer.stop()
        leave(1)
    print(f"dml-peer {peer.peer_id} exchanging on {peer.address}", flush=True)
    if peer.metrics_server is not None:
        print(f"dml-peer {peer.peer_id} metrics on {peer.metrics_server.url}", flush=True)
    peer.run_in_thread()
    while not peer.stop_event.wait(1.0):  # set by SIGINT/SIGTERM, or if the round loop dies
        pass
    peer.stop()
    if peer.fatal:  # e.g. a coordinator restarted on another release
        print(f"dml-peer: {peer.fatal}", file=sys.stderr)
        leave(2)
    leave()


def leave(code: int = 0) -> None:
    """Ends the process with ``code`` at once, once the peer has stopped (its server, data
    plane, shared memory and channels are closed by then) and its logs are flushed. What the
    interpreter's own exit would add is tearing down the ~1900 modules a torch optimizer imports
    (dynamo, sympy): about 2 s of CPU, 9 to 15 s on a loaded machine, for nothing, while a
    supervisor waiting for the peer to stop (docker's 10 s, `dml local`'s 5 s) SIGKILLs it first."""
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    main()
