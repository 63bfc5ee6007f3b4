"""``dml``: the job client. Submit, list, watch, cancel jobs, download models, run a local cluster.

Exit codes: 0 success, 1 the coordinator failed or is unreachable, 2 bad input (a usage error or
the coordinator's INVALID_ARGUMENT), 3 a job that ended FAILED or CANCELLED (``status --watch``,
``local``).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import pathlib
import sys
import time
from collections.abc import Callable
from typing import Any, NoReturn, TypeVar

import grpc
from dml.v1 import jobs_pb2, jobs_pb2_grpc, types_pb2

from dml.aggregation.topology import TOPOLOGY_NAMES
from dml.common import rpc as grpcs
from dml.common.spec import spec_to_pb
from dml.common.spec import AGGREGATIONS, CODECS, DATA_PLANES, JobSpec

T = TypeVar("T")
STATE_NAMES = {v: types_pb2.JobState.Name(v).removeprefix("JOB_STATE_") for v in types_pb2.JobState.values()}
FINISHED = {"SUCCEEDED", "FAILED", "CANCELLED"}


class CliError(Exception):
    """A one-line error for the user, with the exit code to leave with."""

    def __init__(self, message: str, code: int = 1) -> None:
        super().__init__(message)
        self.code = code


def cli_error(e: grpc.RpcError, coordinator: str) -> CliError:
    """The user-facing error for a failed call."""
    code = e.code() if isinstance(e, grpc.Call) else None
    details = e.details() if isinstance(e, grpc.Call) else str(e)
    if code == grpc.StatusCode.INVALID_ARGUMENT:
        return CliError(f"invalid job: {details}", 2)
    if code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
        return CliError(f"cannot reach coordinator at {coordinator} ({code.name.lower()})", 1)
    if code == grpc.StatusCode.NOT_FOUND:
        return CliError(details, 1)
    return CliError(f"coordinator error: {code.name if code else '?'}: {details}", 1)


def rpc(fn: Callable[[], T], coordinator: str) -> T:
    try:
        return fn()
    except grpc.RpcError as e:
        raise cli_error(e, coordinator) from None


def job_stub(coordinator: str) -> jobs_pb2_grpc.JobServiceStub:
    if ":" not in coordinator:
        raise CliError(f"--coordinator must be HOST:PORT, got {coordinator!r}", 2)
    return jobs_pb2_grpc.JobServiceStub(grpcs.channel(coordinator))


def status_dict(job: jobs_pb2.JobStatus) -> dict[str, Any]:
    """A job status as the JSON object `dml status --json` prints."""
    last = job.last
    return {
        "job_id": job.job_id,
        "state": STATE_NAMES[job.state],
        "round": job.round,
        "rounds": job.spec.rounds,
        "epoch": job.epoch,
        "peers": list(job.peers),
        "samples": job.samples,
        "data_epoch": job.data_epoch,
        "reason": job.reason,
        "checkpoint_round": job.checkpoint_round,
        "task": job.spec.task,
        "aggregation": job.spec.aggregation or "ring",
        "metrics": {
            "train_loss": last.train_loss if job.HasField("last") else None,
            "test_accuracy": last.test_accuracy if job.HasField("last") else None,
            "test_loss": last.test_loss if job.HasField("last") else None,
            "round_ms": last.duration_ms if job.HasField("last") else None,
            "digest": last.digest if job.HasField("last") else None,
            "consensus_distance": last.consensus_distance if job.HasField("last") else None,
            "bytes_sent": last.bytes_sent if job.HasField("last") else None,
        },
    }


def history_dict(r: types_pb2.RoundMetrics) -> dict[str, Any]:
    """One committed round, with its sample ledger, as JSON-friendly data."""
    return {"round": r.round, "epoch": r.epoch, "train_loss": r.train_loss, "test_accuracy": r.test_accuracy,
            "samples": r.samples, "members": r.members, "duration_ms": r.duration_ms, "digest": r.digest,
            "train_ms": r.train_ms, "exchange_ms": r.exchange_ms, "committed_unix_ms": r.committed_unix_ms,
            "test_evaluated": r.test_evaluated, "eval_ms": r.eval_ms,
            "data_epoch": r.data_epoch, "consensus_distance": r.consensus_distance, "bytes_sent": r.bytes_sent,
            "consumed": {m.peer_id: [[x.shard_id, x.data_epoch, x.start, x.stop] for x in m.ranges]
                         for m in r.consumed}}


def fmt_metric(x: float | None, spec: str = ".4f") -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, spec)


def status_line(job: jobs_pb2.JobStatus, width: int = 30) -> str:
    """One line: a progress bar, round, loss, accuracy, peers and state."""
    d = status_dict(job)
    frac = d["round"] / max(d["rounds"], 1)
    bar = "#" * int(frac * width) + "." * (width - int(frac * width))
    m = d["metrics"]
    gossip = d["aggregation"] == "gossip" and d["state"] == "RUNNING" and not (m["digest"] or "")
    line = (f"{d['job_id']} [{bar}] round {d['round']}/{d['rounds']} loss {fmt_metric(m['train_loss'])} "
            f"acc {fmt_metric(m['test_accuracy'])}"
            + (f" consensus {fmt_metric(m['consensus_distance'], '.3g')}" if gossip and m["consensus_distance"] is not None else "")
            + f" peers {len(d['peers'])} {d['state']}")
    return line + (f" ({d['reason']})" if d["reason"] and d["state"] not in ("SUCCEEDED",) else "")


# -- commands --------------------------------------------------------------------------------
def spec_from_args(a: argparse.Namespace) -> JobSpec:
    """The job spec the submit flags describe."""
    d = JobSpec()
    return JobSpec(task=a.task, rounds=a.rounds, local_steps=a.local_steps, batch_size=a.batch_size,
                   learning_rate=a.lr, min_peers=a.min_peers if a.min_peers is not None else d.min_peers, sharding=a.sharding, aggregation=a.aggregation,
                   seed=a.seed, num_shards=a.num_shards or d.num_shards,
                   checkpoint_every_rounds=a.checkpoint_every or d.checkpoint_every_rounds,
                   peer_grace_s=a.peer_grace_s or d.peer_grace_s, codec=a.codec, data_plane=a.data_plane,
                   eval_every_rounds=a.eval_every or d.eval_every_rounds,
                   gossip_topology=a.topology, gossip_timeout_ms=a.gossip_timeout_ms or d.gossip_timeout_ms)


def submit(coordinator: str, spec: JobSpec, timeout: float) -> str:
    """Submits a job; returns its id."""
    stub = job_stub(coordinator)
    return rpc(lambda: stub.SubmitJob(jobs_pb2.SubmitJobRequest(spec=spec_to_pb(spec)), timeout=timeout),
                coordinator).job_id


def history(coordinator: str, job_id: str, timeout: float) -> list[types_pb2.RoundMetrics]:
    """Every committed round of a job, oldest first."""
    stub = job_stub(coordinator)
    return list(rpc(lambda: stub.GetJob(jobs_pb2.GetJobRequest(job_id=job_id, include_history=True), timeout=timeout),
                    coordinator).history)


def cmd_submit(a: argparse.Namespace) -> int:
    jid = submit(a.coordinator, spec_from_args(a), a.timeout)
    print(f"submitted to {a.coordinator}", file=sys.stderr)
    print(jid)
    return 0


def _latest_job(stub: jobs_pb2_grpc.JobServiceStub, coordinator: str, timeout: float) -> str:
    jobs = rpc(lambda: stub.ListJobs(jobs_pb2.ListJobsRequest(), timeout=timeout), coordinator).jobs
    if not jobs:
        raise CliError(f"no jobs on {coordinator}", 1)
    return jobs[0].job_id


def watch(coordinator: str, job_id: str, timeout: float, on_update: Callable[[jobs_pb2.JobStatus], None],
          max_s: float = 24 * 3600) -> jobs_pb2.JobStatus:
    """Follows a job until it finishes (reconnecting if the coordinator restarts); returns the end status."""
    stub = job_stub(coordinator)
    deadline = time.monotonic() + max_s
    last: jobs_pb2.JobStatus | None = None
    while time.monotonic() < deadline:
        try:
            for st in stub.WatchJob(jobs_pb2.WatchJobRequest(job_id=job_id), timeout=min(300.0, deadline - time.monotonic())):
                last = st
                on_update(st)
                if STATE_NAMES[st.state] in FINISHED:
                    return st
        except grpc.RpcError as e:
            code = e.code() if isinstance(e, grpc.Call) else None
            if code not in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED) or last is None:
                raise cli_error(e, coordinator) from None
            time.sleep(0.5)  # the coordinator is restarting: reconnect after a pause
    raise CliError(f"gave up watching {job_id} after {max_s:.0f}s", 1)


def cmd_status(a: argparse.Namespace) -> int:
    stub = job_stub(a.coordinator)
    jid = a.job or _latest_job(stub, a.coordinator, a.timeout)
    if not a.watch:
        resp = rpc(lambda: stub.GetJob(jobs_pb2.GetJobRequest(job_id=jid, include_history=a.history), timeout=a.timeout),
                    a.coordinator)
        if a.json:
            d = status_dict(resp.job)
            if a.history:
                d["history"] = [history_dict(r) for r in resp.history]
            print(json.dumps(d))
        else:
            print(status_line(resp.job))
        return 0
    tty = sys.stdout.isatty() and not a.json

    def show(st: jobs_pb2.JobStatus) -> None:
        if a.json:
            print(json.dumps(status_dict(st)), flush=True)
        elif tty:
            print("\r\033[K" + status_line(st), end="", flush=True)
        else:
            print(status_line(st), flush=True)

    end = watch(a.coordinator, jid, a.timeout, show)
    if tty:
        print()
    return 0 if STATE_NAMES[end.state] == "SUCCEEDED" else 3


def cmd_jobs(a: argparse.Namespace) -> int:
    stub = job_stub(a.coordinator)
    jobs = rpc(lambda: stub.ListJobs(jobs_pb2.ListJobsRequest(), timeout=a.timeout), a.coordinator).jobs
    if a.json:
        print(json.dumps([status_dict(j) for j in jobs]))
        return 0
    print(f"{'JOB':<24} {'STATE':<10} {'ROUND':>11} {'ACC':>7} {'PEERS':>5}  TASK")
    for j in jobs:
        d = status_dict(j)
        print(f"{d['job_id']:<24} {d['state']:<10} {d['round']:>5}/{d['rounds']:<5} "
              f"{fmt_metric(d['metrics']['test_accuracy'], '.4f'):>7} {len(d['peers']):>5}  {d['task']}")
    return 0


def cmd_cancel(a: argparse.Namespace) -> int:
    stub = job_stub(a.coordinator)
    st = rpc(lambda: stub.CancelJob(jobs_pb2.CancelJobRequest(job_id=a.job), timeout=a.timeout), a.coordinator).state
    print(f"{a.job} {STATE_NAMES[st]}")
    return 0


def download_model(coordinator: str, job_id: str, out: pathlib.Path, timeout: float) -> tuple[int, str]:
    """Saves the job's last checkpoint (a torch state_dict file); returns (round, digest)."""
    stub = job_stub(coordinator)
    parts = rpc(lambda: list(stub.DownloadModel(jobs_pb2.DownloadModelRequest(job_id=job_id), timeout=timeout)),
                 coordinator)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".part")
    tmp.write_bytes(b"".join(p.data for p in parts))
    tmp.replace(out)
    return parts[0].round, parts[0].digest


def cmd_model(a: argparse.Namespace) -> int:
    rnd, dig = download_model(a.coordinator, a.job, a.output, max(a.timeout, 60.0))
    print(f"saved round {rnd} of {a.job} to {a.output} (parameter digest {dig[:16]})")
    return 0


def cmd_plot(a: argparse.Namespace) -> int:
    """Saves a PNG of train loss and test accuracy per committed round."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise CliError("dml plot needs matplotlib: pip install 'dml[plot]'", 2) from None
    stub = job_stub(a.coordinator)
    resp = rpc(lambda: stub.GetJob(jobs_pb2.GetJobRequest(job_id=a.job, include_history=True), timeout=a.timeout),
                a.coordinator)
    if not resp.history:
        raise CliError(f"{a.job} has no committed rounds yet", 1)
    rounds = [r.round for r in resp.history]
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(rounds, [r.train_loss for r in resp.history], color="tab:red", label="train loss")
    ax.set_xlabel("committed round")
    ax.set_ylabel("train loss", color="tab:red")
    ax2 = ax.twinx()
    ax2.plot(rounds, [r.test_accuracy for r in resp.history], color="tab:blue", label="test accuracy")
    ax2.set_ylabel("test accuracy", color="tab:blue")
    ax2.set_ylim(0, 1)
    for prev, r in zip(resp.history, resp.history[1:]):
        if r.epoch != prev.epoch:
            ax.axvline(r.round, color="grey", lw=0.5, ls=":")
    st = status_dict(resp.job)
    ax.set_title(f"{st['job_id']} ({st['task']}, {st['state']}); dotted: membership changes")
    fig.tight_layout()
    fig.savefig(a.output, dpi=110)
    print(f"saved {len(rounds)} rounds to {a.output}")
    return 0


def cmd_health(a: argparse.Namespace) -> int:
    """Asks the standard gRPC health service; exit 0 when SERVING (docker health checks)."""
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    if ":" not in a.coordinator:
        raise CliError(f"--coordinator must be HOST:PORT, got {a.coordinator!r}", 2)
    stub = health_pb2_grpc.HealthStub(grpcs.channel(a.coordinator))
    resp = rpc(lambda: stub.Check(health_pb2.HealthCheckRequest(service=a.service), timeout=a.timeout), a.coordinator)
    name = health_pb2.HealthCheckResponse.ServingStatus.Name(resp.status)
    print(name)
    return 0 if resp.status == health_pb2.HealthCheckResponse.SERVING else 1


# -- parser ----------------------------------------------------------------------------------
def int_in(lo: int, hi: int) -> Callable[[str], int]:
    """An argparse type: an int in lo..hi, else a clear usage error."""
    def parse(text: str) -> int:
        try:
            v = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"invalid int value: {text!r}") from None
        if not lo <= v <= hi:
            raise argparse.ArgumentTypeError(f"{v} is outside {lo}..{hi}")
        return v
    return parse


def positive_float(text: str) -> float:
    """An argparse type: a finite number above 0."""
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid float value: {text!r}") from None
    if not (v > 0 and math.isfinite(v)):
        raise argparse.ArgumentTypeError(f"must be a positive number, got {text}")
    return v


U32 = 2**32 - 1


def add_job_options(p: argparse.ArgumentParser) -> None:
    """The job flags shared by ``submit`` and ``local`` (range-checked: bad values exit 2)."""
    d = JobSpec()
    p.add_argument("--task", default=d.task, help="digits (default) or synthetic:SIZE, e.g. synthetic:10M")
    # Zero passes through: the coordinator answers INVALID_ARGUMENT. Where proto3 would read a
    # zero as "use the default" (steps, batch, lr, peers), the client refuses it instead.
    p.add_argument("--rounds", type=int_in(0, U32), default=d.rounds, help=f"rounds to commit (default {d.rounds})")
    p.add_argument("--local-steps", type=int_in(1, U32), default=d.local_steps, help="SGD steps per round per peer")
    p.add_argument("--batch-size", type=int_in(1, U32), default=d.batch_size)
    p.add_argument("--lr", type=positive_float, default=d.learning_rate, help="learning rate")
    p.add_argument("--min-peers", type=int_in(1, U32), default=None,
                   help=f"peers needed to run a round (default {d.min_peers}; `local`: all its peers)")
    p.add_argument("--sharding", default=d.sharding, help="iid or dirichlet:ALPHA")
    p.add_argument("--aggregation", choices=AGGREGATIONS, default=d.aggregation,
                   help="ring (synchronous all-reduce, the default) or gossip (pairwise averaging, no barrier; "
                        "the last round is one exact ring average)")
    p.add_argument("--topology", choices=TOPOLOGY_NAMES, default=d.gossip_topology,
                   help=f"gossip: how peers pick partners (default {d.gossip_topology})")
    p.add_argument("--gossip-timeout-ms", type=int_in(0, U32), default=0,
                   help=f"gossip: give up on a partner after this long (default {d.gossip_timeout_ms})")
    p.add_argument("--codec", choices=CODECS, default=d.codec,
                   help="wire codec of the exchange: fp32 (exact, default), bf16, fp16, int8 (lossy ones use error feedback)")
    p.add_argument("--data-plane", choices=DATA_PLANES, default=d.data_plane,
                   help="how ring chunks travel: auto (TCP negotiated over gRPC, else gRPC; default), tcp, grpc")
    p.add_argument("--seed", type=int_in(0, 2**63 - 1), default=d.seed)
    p.add_argument("--num-shards", type=int_in(0, U32), default=0, help=f"shards to cut the data into (default {d.num_shards})")
    p.add_argument("--eval-every", type=int_in(0, U32), default=0,
                   help=f"rounds between test evaluations, always including the last (default {d.eval_every_rounds})")
    p.add_argument("--checkpoint-every", type=int_in(0, U32), default=0,
                   help=f"rounds between checkpoints (default {d.checkpoint_every_rounds})")
    p.add_argument("--peer-grace-s", type=int_in(0, U32), default=0,
                   help=f"fail a running job that has fewer than --min-peers for this long (default {d.peer_grace_s})")


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    """The ``dml`` argument parser."""
    env_coord = os.environ.get("DML_COORDINATOR", "127.0.0.1:50051")
    p = _Parser(prog="dml", description="dml job client: submit, watch and manage training jobs.")
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)

    def common(sp: argparse.ArgumentParser) -> None:
        sp.add_argument("--coordinator", default=env_coord, help="coordinator HOST:PORT (env DML_COORDINATOR)")
        sp.add_argument("--timeout", type=positive_float, default=15.0,
                        help="deadline per call in seconds (an unreachable address fails at once)")

    sp = sub.add_parser("submit", help="submit a job; prints its id on the last line")
    common(sp)
    add_job_options(sp)
    sp.set_defaults(fn=cmd_submit)

    sp = sub.add_parser("status", help="show a job (default: the newest)")
    common(sp)
    sp.add_argument("job", nargs="?")
    sp.add_argument("--watch", action="store_true", help="follow the job with a progress bar until it ends")
    sp.add_argument("--json", action="store_true", help="print JSON")
    sp.add_argument("--history", action="store_true", help="include every committed round (with --json)")
    sp.set_defaults(fn=cmd_status)

    sp = sub.add_parser("jobs", help="list jobs")
    common(sp)
    sp.add_argument("--json", action="store_true")
    sp.set_defaults(fn=cmd_jobs)

    sp = sub.add_parser("cancel", help="cancel a job")
    common(sp)
    sp.add_argument("job")
    sp.set_defaults(fn=cmd_cancel)

    sp = sub.add_parser("model", help="download a job's committed parameters as a torch state_dict")
    common(sp)
    sp.add_argument("job")
    sp.add_argument("-o", "--output", type=pathlib.Path, required=True)
    sp.set_defaults(fn=cmd_model)

    sp = sub.add_parser("plot", help="plot train loss and test accuracy per round to a PNG")
    common(sp)
    sp.add_argument("job")
    sp.add_argument("-o", "--output", type=pathlib.Path, required=True)
    sp.set_defaults(fn=cmd_plot)

    sp = sub.add_parser("health", help="check the coordinator's gRPC health service")
    common(sp)
    sp.add_argument("--service", default="", help="service name ('' for the whole server)")
    sp.set_defaults(fn=cmd_health)

    from dml.client import local

    sp = sub.add_parser("local", help="run a coordinator and N peers here, train a job, print the accuracy")
    local.add_arguments(sp)
    add_job_options(sp)
    sp.set_defaults(fn=local.cmd_local)
    return p


def main(argv: list[str] | None = None) -> None:
    """Entry point."""
    a = build_parser().parse_args(argv)
    try:
        code = a.fn(a)
    except CliError as e:
        print(f"dml: {e}", file=sys.stderr)
        code = e.code
    except KeyboardInterrupt:
        print("\ndml: interrupted", file=sys.stderr)
        code = 130
    sys.exit(code)


if __name__ == "__main__":
    main()
