"""``dml``: the job client. Submit, list, watch, cancel jobs, download models, run a local cluster.

Argument parsing and printing only; the job API itself is :mod:`dml.client.api`.

Exit codes: 0 success, 1 the coordinator failed or is unreachable, 2 bad input (a usage error, a
malformed address, the coordinator's INVALID_ARGUMENT, an unknown job id, a missing or refused
operator token), 3 a job that ended
FAILED or CANCELLED (``status --watch``, ``local``), 141 stdout closed early (``| head``).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import pathlib
import sys
from typing import Any

from dml.client import api
from dml.client.api import ApiError, JobClient, history_dict, peer_dict, shards_dict, status_dict
from dml.common import args as cliargs
from dml.common import tls
from dml.common.args import dataset_name, int_in, pool_name
from dml.common.spec import (AGGREGATIONS, CODECS, DATA_PLANES, MAX_GOSSIP_TIMEOUT_MS, MAX_LEARNING_RATE,
                             MAX_MAX_PEERS, MAX_PEER_GRACE_S, MAX_PROX_MU, MAX_ROUNDS, MAX_SAMPLES_PER_ROUND, MIN_GOSSIP_TIMEOUT_MS,
                             OPTIMIZER_STATES, OUTER_OPTIMIZERS, PLACEMENTS, PRECISIONS, SYNCS, TOPOLOGY_NAMES, JobSpec)
from dml.v1 import jobs_pb2, types_pb2

DEFAULT_CERT_DAYS = 3650


def fmt_metric(x: float | None, spec: str = ".4f") -> str:
    """A metric for a table: '-' when absent, 'NaN' when it measured NaN (never 0)."""
    if x is None:
        return "-"
    return "NaN" if isinstance(x, float) and math.isnan(x) else format(x, spec)


def quarantine_lines(job: jobs_pb2.JobStatus) -> list[str]:
    """One line per peer quarantined for the job, with the round and why."""
    return [f"quarantined {q.peer_id} at round {q.round} (reported by {q.reporters or '?'}): {q.reason}"
            for q in job.quarantined]


def status_line(job: jobs_pb2.JobStatus, width: int = 30) -> str:
    """One line: a progress bar, round, loss, accuracy, peers and state."""
    d = status_dict(job)
    frac = d["round"] / max(d["rounds"], 1)
    bar = "#" * int(frac * width) + "." * (width - int(frac * width))
    m = d["metrics"]
    gossip = d["aggregation"] == "gossip" and d["state"] == "RUNNING" and not (m["digest"] or "")
    line = (f"{d['job_id']} [{bar}] round {d['round']}/{d['rounds']} loss {fmt_metric(m['train_loss'])} "
            f"acc {fmt_metric(m['test_accuracy'])}"
            + "".join(f" {k} {fmt_metric(v)}" for k, v in m["test_metrics"].items())
            + (f" consensus {fmt_metric(m['consensus_distance'], '.3g')}" if gossip and m["consensus_distance"] is not None else "")
            + f" peers {len(d['peers'])} {d['state']}"
            + (f" quarantined {','.join(q['peer_id'] for q in d['quarantined'])}" if d["quarantined"] else "")
            + data_present_text(d["data_present"]))
    first = d["reason"].split("\n", 1)[0]  # a task's error goes on with its traceback: reason_lines
    return line + (f" ({first})" if first and d["state"] not in ("SUCCEEDED",) else "")


def data_present_text(present: dict[str, Any] | None) -> str:
    """`` data present 75% (1078 of 1437 samples, 3 of 4 peers)`` for a ``--placement local``
    job's status line; "" for other jobs, and before any peer brought its data."""
    if not present or not present["seen_samples"]:
        return ""
    return (f" data present {present['fraction']:.0%} ({present['samples']} of {present['seen_samples']} samples, "
            f"{present['peers']} of {present['seen_peers']} peers)")


def reason_lines(job: jobs_pb2.JobStatus) -> list[str]:
    """The lines of a job's reason after its first (a task's error: the innermost frames of its
    traceback), indented, to print under the status line."""
    return [f"  {line}" for line in job.reason.split("\n")[1:] if line.strip()]


def exclusion_lines(job: jobs_pb2.JobStatus) -> list[str]:
    """One line per peer the job holds out of its rings, and one per peer that declined it
    (or was refused it), with why."""
    return ([f"  held out: {x.peer_id} since round {x.round}: {x.reason}" for x in job.held_out]
            + [f"  declined {x.peer_id}: {x.reason}" for x in job.declined])


def history_table(history: list[types_pb2.RoundMetrics], gossip: bool = False) -> list[str]:
    """Committed rounds as table lines, a header first. Accuracy, test loss and the task's own
    test metrics (a column each, after the others) show '-' on rounds that skipped the test
    evaluation; consensus distance is shown for gossip jobs."""
    names = sorted({k for r in history for k in r.test_metrics})
    widths = [max(7, len(k)) for k in names]
    head = (f"{'ROUND':>6} {'EPOCH':>5} {'PEERS':>5} {'SAMPLES':>10} {'LOSS':>8} {'ACC':>7} {'TEST_LOSS':>9} "
            f"{'ROUND_MS':>8} {'TRAIN_MS':>8} {'EXCH_MS':>8}" + (f" {'CONSENSUS':>9}" if gossip else "")
            + "".join(f" {k.upper():>{w}}" for k, w in zip(names, widths)))
    lines = [head]
    for r in history:
        acc = r.test_accuracy if r.test_evaluated else None
        tl = r.test_loss if r.test_evaluated else None
        lines.append(f"{r.round:>6} {r.epoch:>5} {r.members:>5} {r.samples:>10} {fmt_metric(r.train_loss):>8} "
                     f"{fmt_metric(acc):>7} {fmt_metric(tl):>9} {r.duration_ms:>8} {r.train_ms:>8} {r.exchange_ms:>8}"
                     + (f" {fmt_metric(r.consensus_distance, '.3g'):>9}" if gossip else "")
                     + "".join(f" {fmt_metric(r.test_metrics.get(k) if r.test_evaluated else None):>{w}}"
                               for k, w in zip(names, widths)))
    return lines


# -- commands --------------------------------------------------------------------------------
def spec_from_args(a: argparse.Namespace) -> JobSpec:
    """The job spec the submit flags describe."""
    d = JobSpec()
    return JobSpec(task=a.task, rounds=a.rounds, local_steps=a.local_steps, batch_size=a.batch_size,
                   learning_rate=a.lr, min_peers=a.min_peers if a.min_peers is not None else d.min_peers, sharding=a.sharding, aggregation=a.aggregation,
                   seed=a.seed, num_shards=0 if getattr(a, "placement", "") == "local" else a.num_shards or d.num_shards,
                   checkpoint_every_rounds=a.checkpoint_every or d.checkpoint_every_rounds,
                   peer_grace_s=a.peer_grace_s or d.peer_grace_s, codec=a.codec, data_plane=a.data_plane,
                   eval_every_rounds=a.eval_every or d.eval_every_rounds,
                   gossip_topology=a.topology, gossip_timeout_ms=a.gossip_timeout_ms or d.gossip_timeout_ms,
                   min_shard_samples=a.min_shard_samples, optimizer_state=a.optimizer_state, sync=a.sync,
                   outer_optimizer=a.outer_optimizer, outer_lr=a.outer_lr, outer_momentum=a.outer_momentum,
                   prox_mu=a.prox_mu, dataset=getattr(a, "dataset", ""), pool=getattr(a, "pool", ""),
                   max_peers=getattr(a, "max_peers", 0), placement=getattr(a, "placement", "shared"),
                   local_data=getattr(a, "local_data", ""), precision=getattr(a, "precision", d.precision))


def _client(a: argparse.Namespace) -> JobClient:
    token = api.read_token(a.token_file) if a.token_file is not None and a.command != "health" else ""
    return JobClient(a.coordinator, a.timeout, token=token, tls=a.tls)


def placement_error(a: argparse.Namespace) -> str:
    """Why the submit flags do not fit together as to where the data is ("" when they do): a
    ``--placement local`` job names ``--local-data`` and takes none of the flags that cut or
    name a shared training set (``--sharding``, ``--num-shards``, ``--min-shard-samples``,
    ``--dataset``); ``--local-data`` is for such jobs only."""
    d = JobSpec()
    if a.placement != "local":
        return "--local-data names the peers' own dataset: use it with --placement local" if a.local_data else ""
    if not a.local_data:
        return "--placement local needs --local-data NAME: the dataset its peers offer (dml-peer --data NAME=PATH)"
    given = [flag for flag, bad in (("--sharding", a.sharding != d.sharding), ("--num-shards", a.num_shards != d.num_shards),
                                    ("--min-shard-samples", a.min_shard_samples != d.min_shard_samples),
                                    ("--dataset", bool(a.dataset))) if bad]
    if given:
        return (f"{', '.join(given)} cut or name a shared training set; a --placement local job trains each peer on "
                "its own data (one shard per peer), so it takes none of them")
    return ""


def cmd_submit(a: argparse.Namespace) -> int:
    if err := placement_error(a):
        print(f"dml submit: {err}", file=sys.stderr)
        return 2
    spec, code = api.pack_task(spec_from_args(a))  # bad task code is refused before any call
    if code:
        print(f"sending task code {spec.task} ({len(code) / 1024:.1f} KiB, sha256 {spec.task_digest[:12]})",
              file=sys.stderr)
    with _client(a) as c:
        jid = c.submit(spec, code)
    print(f"submitted to {a.coordinator}", file=sys.stderr)
    print(jid)
    return 0


def cmd_status(a: argparse.Namespace) -> int:
    with _client(a) as c:
        jid = a.job or c.latest()
        if not a.watch:
            resp = c.status(jid, history=a.history)
            if a.json:
                d = status_dict(resp.job)
                if a.history:
                    d["history"] = [history_dict(r) for r in resp.history]
                print(json.dumps(d))
            else:
                print(status_line(resp.job))
                for line in reason_lines(resp.job) + exclusion_lines(resp.job) + quarantine_lines(resp.job):
                    print(line)
                if a.history:
                    print("\n".join(history_table(list(resp.history), gossip=resp.job.spec.aggregation == "gossip")))
            return 0
        tty = sys.stdout.isatty() and not a.json

        def show(st: jobs_pb2.JobStatus) -> None:
            if a.json:
                print(json.dumps(status_dict(st)), flush=True)
            elif tty:
                print("\r\033[K" + status_line(st), end="", flush=True)
            else:
                print(status_line(st), flush=True)

        end = c.watch(jid, show)
    if tty:
        print()
    if not a.json:
        for line in reason_lines(end):
            print(line)
    return 0 if api.STATE_NAMES[end.state] == "SUCCEEDED" else 3


def cmd_jobs(a: argparse.Namespace) -> int:
    with _client(a) as c:
        jobs = c.list()
    if a.json:
        print(json.dumps([status_dict(j) for j in jobs]))
        return 0
    print(f"{'JOB':<24} {'STATE':<10} {'ROUND':>11} {'ACC':>7} {'PEERS':>5}  TASK")
    for j in jobs:
        d = status_dict(j)
        print(f"{d['job_id']:<24} {d['state']:<10} {d['round']:>5}/{d['rounds']:<5} "
              f"{fmt_metric(d['metrics']['test_accuracy'], '.4f'):>7} {len(d['peers']):>5}  {d['task']}")
    return 0


def peers_table(peers: list[dict[str, Any]]) -> list[str]:
    """``dml peers`` as lines: a row per peer (id, pool, device, memory, samples/s, state, job,
    the last minute's training / exchanging / idle shares in percent, address, the local
    datasets it offers, when any, and a multi-worker peer's workers)."""
    lines = [f"{'PEER':<24} {'POOL':<12} {'DEVICE':<8} {'MEMORY':>9} {'SAMPLES/S':>10} {'STATE':<11} {'JOB':<24} "
             f"{'TRAIN':>5} {'XCHG':>5} {'IDLE':>5}  ADDRESS"]
    for p in peers:
        u = p["utilisation"]
        mem = fmt_bytes(p["memory_bytes"]) if p["memory_bytes"] else "-"
        sps = f"{p['samples_per_s']:.0f}" if p["samples_per_s"] else "-"
        lines.append(f"{p['peer_id']:<24} {p['pool']:<12} {p['device'] or '-':<8} {mem:>9} {sps:>10} "
                     f"{p['state']:<11} {p['job_id'] or '-':<24} {u['training']:>5.0%} {u['exchanging']:>5.0%} "
                     f"{u['idle']:>5.0%}  {p['address']}"
                     + (f"  data {','.join(p['local_datasets'])}" if p.get("local_datasets") else "")
                     + (f"  workers {_workers(p)}" if p.get("workers", 1) > 1 or p.get("worker_devices") else ""))
    lines.append(f"{len(peers)} peers; utilisation over the last minute")
    return lines


def _workers(p: dict[str, Any]) -> str:
    """A multi-worker peer's workers as ``dml peers`` shows them: ``2`` (CPU) or
    ``4 (cuda:0,cuda:1,cuda:2,cuda:3)``."""
    devices = p.get("worker_devices") or []
    return f"{p.get('workers', 1)}" + (f" ({','.join(devices)})" if devices else "")


def cmd_peers(a: argparse.Namespace) -> int:
    """Prints every registered peer: pool, device, state, job and utilisation."""
    with _client(a) as c:
        peers = [peer_dict(p) for p in c.peers()]
    if a.json:
        for p in peers:
            print(json.dumps(p))
        return 0
    print("\n".join(peers_table(peers)))
    return 0


def cmd_cancel(a: argparse.Namespace) -> int:
    with _client(a) as c:
        state = c.cancel(a.job)
    print(f"{a.job} {state}")
    return 0


def cmd_model(a: argparse.Namespace) -> int:
    with _client(a) as c:
        rnd, dig = c.download(a.job, a.output)
    print(f"saved round {rnd} of {a.job} to {a.output} (parameter digest {dig[:16]})")
    return 0


def cmd_checkpoint(a: argparse.Namespace) -> int:
    with _client(a) as c:
        rnd, sha = c.download_checkpoint(a.job, a.output)
    print(f"saved the training state of round {rnd} of {a.job} to {a.output} (sha256 {sha[:16]})")
    return 0


def id_ranges(ids: list[int]) -> str:
    """Shard ids as compact ranges: [0, 1, 2, 5] -> "0-2,5" ("-" for none)."""
    runs: list[list[int]] = []
    for i in sorted(ids):
        if runs and runs[-1][1] == i - 1:
            runs[-1][1] = i
        else:
            runs.append([i, i])
    return ",".join(str(a) if a == b else f"{a}-{b}" for a, b in runs) or "-"


def data_columns(u: dict[str, Any] | None) -> str:
    """A member's data usage as ``dml shards`` columns: source, bytes and chunks fetched, cache
    hits, cached shard ids ("-" each when it has not reported)."""
    if u is None:
        return f"{'-':<14} {'-':>10} {'-':>7} {'-':>6}  {'-':<12}"
    return (f"{u['label']:<14} {fmt_bytes(u['bytes_fetched']):>10} {u['chunks_fetched']:>7} {u['cache_hits']:>6}  "
            f"{id_ranges(u['cached_shards']):<12}")


def shards_table(d: dict[str, Any]) -> list[str]:
    """``dml shards`` as lines: a row per member (shard ids, samples, and when any member reported
    its data usage: where its data comes from (local, store: fetched, store: cache), bytes and
    chunks fetched, cache hits and the shards it caches; then its labels' counts as LABEL:COUNT
    for the labels it holds, "-" when the labels are unknown), then the totals."""
    usage = any(p.get("data") for p in d["peers"])
    data_head = f"{'DATA':<14} {'FETCHED':>10} {'CHUNKS':>7} {'HITS':>6}  {'CACHED':<12} " if usage else ""
    lines = [f"{'PEER':<24} {'SHARDS':>6} {'SAMPLES':>9}  {'SHARD_IDS':<16} {data_head}LABELS (label:samples)"]
    for p in d["peers"]:
        counts = p["label_counts"]
        labels = "-" if counts is None else " ".join(f"{i}:{n}" for i, n in enumerate(counts) if n) or "none"
        data = data_columns(p.get("data")) + " " if usage else ""
        lines.append(f"{p['peer_id']:<24} {len(p['shards']):>6} {p['samples']:>9}  {id_ranges(p['shards']):<16} "
                     f"{data}{labels}")
    placed = sum(p["samples"] for p in d["peers"])
    classes = "labels unknown" if d["num_classes"] is None else f"{d['num_classes']} labels"
    lines.append(f"{len(d['peers'])} peers hold {placed} of {d['train_samples']} training samples ({classes})")
    if d["unassigned"]:
        lines.append(f"unassigned: {len(d['unassigned'])} shards ({id_ranges(d['unassigned'])}): no member has room "
                     "under its --max-samples or --cache-max-gb")
    return lines


def cmd_shards(a: argparse.Namespace) -> int:
    """Prints each member's shards, samples and label counts."""
    with _client(a) as c:
        d = shards_dict(c.shards(a.job))
    if a.json:
        print(json.dumps(d))
        return 0
    print("\n".join(shards_table(d)))
    return 0


def _pyplot() -> Any:
    """matplotlib.pyplot on the headless Agg backend; an ApiError (exit 2) when it is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise ApiError("dml plot needs matplotlib: pip install 'dml[plot]'", 2) from None
    return plt


def plot_shards(a: argparse.Namespace) -> int:
    """Saves a PNG with a stacked bar per member: its samples of each label."""
    with _client(a) as c:
        d = shards_dict(c.shards(a.job))  # an unknown job is reported before matplotlib loads
    if not d["peers"]:
        raise ApiError(f"{a.job} has no members holding shards now", 1)
    plt = _pyplot()
    names = [p["peer_id"] for p in d["peers"]]
    fig, ax = plt.subplots(figsize=(max(5.0, 0.9 * len(names) + 2), 4))
    if d["num_classes"] is None:
        ax.bar(names, [p["samples"] for p in d["peers"]], color="tab:grey", label="labels unknown")
    else:
        cmap = plt.get_cmap("tab20" if d["num_classes"] > 10 else "tab10")
        bottom = [0] * len(names)
        for label in range(d["num_classes"]):
            counts = [p["label_counts"][label] for p in d["peers"]]
            if any(counts):
                ax.bar(names, counts, bottom=bottom, color=cmap(label % cmap.N), label=str(label))
                bottom = [b + n for b, n in zip(bottom, counts)]
    ax.set_ylabel("training samples")
    ax.set_title(f"{d['job_id']}: label mix per peer")
    ax.legend(title="label", fontsize="small", bbox_to_anchor=(1.01, 1), loc="upper left")
    ax.tick_params(axis="x", labelrotation=30)
    fig.tight_layout()
    fig.savefig(a.output, dpi=110)
    print(f"saved the label mix of {len(names)} peers to {a.output}")
    return 0


def cmd_plot(a: argparse.Namespace) -> int:
    """Saves a PNG of train loss and test accuracy per committed round (``--shards``: the label
    mix of each member's shards instead)."""
    if a.shards:
        return plot_shards(a)
    with _client(a) as c:
        resp = c.status(a.job, history=True)  # an unknown job is reported before matplotlib loads
    if not resp.history:
        raise ApiError(f"{a.job} has no committed rounds yet", 1)
    plt = _pyplot()
    rounds = [r.round for r in resp.history]
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(rounds, [r.train_loss for r in resp.history], color="tab:red", label="train loss")
    ax.set_xlabel("committed round")
    ax.set_ylabel("train loss", color="tab:red")
    ax2 = ax.twinx()
    ax2.plot(rounds, [r.test_accuracy for r in resp.history], color="tab:blue", label="test accuracy")
    for k in sorted({k for r in resp.history for k in r.test_metrics}):  # the task's own, on the same axis when they fit
        ys = [r.test_metrics.get(k, math.nan) for r in resp.history]
        if all(math.isnan(y) or 0 <= y <= 1 for y in ys):
            ax2.plot(rounds, ys, ls="--", lw=1, label=f"test {k}")
    ax2.set_ylabel("test accuracy", color="tab:blue")
    ax2.set_ylim(0, 1)
    if len(ax2.get_lines()) > 1:
        ax2.legend(loc="lower right", fontsize="small")
    for prev, r in zip(resp.history, resp.history[1:]):
        if r.epoch != prev.epoch:
            ax.axvline(r.round, color="grey", lw=0.5, ls=":")
    st = status_dict(resp.job)
    ax.set_title(f"{st['job_id']} ({st['task']}, {st['state']}); dotted: membership changes")
    fig.tight_layout()
    fig.savefig(a.output, dpi=110)
    print(f"saved {len(rounds)} rounds to {a.output}")
    return 0


def cmd_certs(a: argparse.Namespace) -> int:
    """Writes a private CA and a certificate per host (``dml certs``)."""
    from dml.common import certs

    hosts = [h for h in a.hosts.split(",") if h.strip()]
    if not hosts:
        raise ApiError("--hosts names no host", 2)
    ca = a.out / certs.CA_CERT
    if ca.exists() and not (a.force or a.add):
        if a.if_missing:
            print(f"{a.out} already holds a CA; nothing written", file=sys.stderr)
            return 0
        raise ApiError(f"{ca} exists: pass --force to replace the CA (every certificate it signed stops working), "
                       f"or --add to sign more hosts with it", 2)
    try:
        made = certs.make_certs(a.out, hosts, cluster_name=a.server_name, days=a.days,
                                reuse_ca=ca.exists() and a.add)
    except (ValueError, OSError) as e:
        raise ApiError(f"cannot write certificates to {a.out}: {e}", 2) from None
    print(f"CA: {ca} (its key {a.out / certs.CA_KEY}, mode 0600: keep it off the hosts)")
    for f in made:
        print(f"{f.host}: --tls-cert {f.cert} --tls-key {f.key} --tls-ca {f.ca}")
    return 0


def _data_client(a: argparse.Namespace) -> Any:
    from dml.client.data import DataClient

    token = api.read_token(a.token_file) if a.token_file is not None else ""
    return DataClient(a.coordinator, a.timeout, token=token, tls=a.tls)


def fmt_bytes(n: int) -> str:
    """A byte count for people: 0 B, 512 B, 1.5 KiB, 3.2 GiB."""
    x = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if x < 1024 or unit == "TiB":
            return f"{n} B" if unit == "B" else f"{x:.1f} {unit}"
        x /= 1024
    return f"{n} B"


def cmd_data_put(a: argparse.Namespace) -> int:
    """Uploads a dataset: only the chunks the coordinator lacks travel, then the manifest."""
    from dml.client import data

    upload = data.scan(a.paths)  # unreadable or clashing files are refused before any call
    print(f"{a.name}: {len(upload.files)} files, {fmt_bytes(upload.bytes)} in {len(upload.pieces)} chunks",
          file=sys.stderr)
    with _data_client(a) as c:
        r = c.put(a.name, upload)
    print(f"sent {r.sent_chunks} chunks ({fmt_bytes(r.sent_bytes)}), skipped {r.skipped_chunks} already on the "
          f"coordinator ({fmt_bytes(r.skipped_bytes)})", file=sys.stderr)
    what = "committed" if r.created else "already committed, unchanged"
    print(f"{r.info.name} {what}: {r.info.files} files, {r.info.bytes} bytes, digest {r.info.digest}")
    return 0


def cmd_data_ls(a: argparse.Namespace) -> int:
    """Lists the store's datasets."""
    import datetime

    from dml.client.data import info_dict

    with _data_client(a) as c:
        infos = c.list()
    if a.json:
        print(json.dumps([info_dict(d) for d in infos]))
        return 0
    print(f"{'NAME':<24} {'FILES':>6} {'BYTES':>14} {'DIGEST':<16} CREATED")
    for d in infos:
        when = datetime.datetime.fromtimestamp(d.created_unix_ms / 1000, datetime.timezone.utc)
        print(f"{d.name:<24} {d.files:>6} {d.bytes:>14} {d.digest[:16]:<16} {when:%Y-%m-%d %H:%M:%SZ}")
    return 0


def cmd_data_rm(a: argparse.Namespace) -> int:
    """Removes a dataset (refused while a pending or running job names it)."""
    with _data_client(a) as c:
        r = c.remove(a.name)
    print(f"removed {r.dataset.name} ({r.dataset.files} files, {fmt_bytes(r.dataset.bytes)}; "
          f"{r.chunks_deleted} chunks deleted)")
    return 0


def cmd_health(a: argparse.Namespace) -> int:
    """Asks the standard gRPC health service; exit 0 when SERVING (docker health checks)."""
    with _client(a) as c:
        name = c.health(a.service)
    print(name)
    return 0 if name == "SERVING" else 1


# -- parser ----------------------------------------------------------------------------------
def add_job_options(p: argparse.ArgumentParser) -> None:
    """The job flags shared by ``submit`` and ``local``. Each is range-checked against the job
    spec's validation bounds (a bad value exits 2 naming them); the bounds that depend on the
    task (num_shards at most the training set size) are the coordinator's to check."""
    d = JobSpec()
    p.add_argument("--task", default=d.task,
                   help="what to train: a built-in task (digits, digits-cnn, synthetic:SIZE such as synthetic:10M); "
                        "a task file PATH.py or package directory DIR/ whose code is sent with the job (peers need "
                        "--allow-job-code), either with :NAME for a dml.Task not called task; or "
                        "package.module:NAME imported from each peer's own environment")
    p.add_argument("--rounds", type=int_in(1, MAX_ROUNDS), default=d.rounds, help="rounds to commit")
    p.add_argument("--local-steps", type=int_in(1, MAX_SAMPLES_PER_ROUND), default=d.local_steps,
                   help="SGD steps per round per peer")
    p.add_argument("--batch-size", type=int_in(1, MAX_SAMPLES_PER_ROUND, 0), default=d.batch_size,
                   help="samples per SGD step (default, or 0: the task's own batch size, else 32; "
                        f"--local-steps x --batch-size at most {MAX_SAMPLES_PER_ROUND:,})")
    p.add_argument("--lr", type=cliargs.float_in(0.0, MAX_LEARNING_RATE, lo_open=True, hi_open=True),
                   default=d.learning_rate, help="learning rate")
    p.add_argument("--min-peers", type=int_in(1), default=None,
                   help=f"peers needed to run a round (default {d.min_peers}; `local`: all its peers)")
    p.add_argument("--sharding", default=d.sharding,
                   help="iid, contiguous (index ranges in the data's own order), classes:K (K labels per shard, "
                        "about K per peer) or dirichlet:ALPHA")
    p.add_argument("--min-shard-samples", type=int_in(1), default=d.min_shard_samples,
                   help="refuse a plan with a shard smaller than this")
    p.add_argument("--aggregation", choices=AGGREGATIONS, default=d.aggregation,
                   help="ring (synchronous all-reduce) or gossip (pairwise averaging, no barrier; "
                        "the last round is one exact ring average)")
    p.add_argument("--sync", choices=SYNCS, default=d.sync,
                   help="params: local steps, then average the parameters (local SGD); grads: all-reduce the "
                        "gradients every step, then one identical optimizer step everywhere (data-parallel SGD; "
                        "ring, fp32, no outer optimizer)")
    p.add_argument("--topology", choices=TOPOLOGY_NAMES, default=d.gossip_topology,
                   help="gossip: how peers pick partners")
    # 0 has always meant "the default" for the flags below (proto3's unset); it still does.
    p.add_argument("--gossip-timeout-ms", type=int_in(MIN_GOSSIP_TIMEOUT_MS, MAX_GOSSIP_TIMEOUT_MS, d.gossip_timeout_ms),
                   default=d.gossip_timeout_ms, help="gossip: give up on a partner after this long")
    p.add_argument("--codec", choices=CODECS, default=d.codec,
                   help="wire codec of the exchange: fp32 (exact), bf16, fp16, int8 (lossy ones use error feedback)")
    p.add_argument("--data-plane", choices=DATA_PLANES, default=d.data_plane,
                   help="how ring chunks travel: auto (TCP negotiated over gRPC, shared memory for large buffers on one host, "
                        "else gRPC), shm, tcp, grpc; torch: one torch.distributed all-reduce per average (gloo, NCCL when "
                        "every member is on CUDA; fp32; unencrypted: TLS peers need --allow-torch-plane)")
    p.add_argument("--outer-optimizer", choices=OUTER_OPTIMIZERS, default=d.outer_optimizer,
                   help="ring jobs: apply each round's averaged change through an outer optimizer (DiLoCo: nesterov); "
                        "none takes the average itself")
    p.add_argument("--outer-lr", type=cliargs.float_in(0.0, MAX_LEARNING_RATE), default=d.outer_lr,
                   help="the outer optimizer's learning rate")
    p.add_argument("--outer-momentum", type=cliargs.float_in(0.0, 1.0, lo_open=False, hi_open=True),
                   default=d.outer_momentum, help="the outer optimizer's momentum")
    p.add_argument("--prox-mu", type=cliargs.float_in(0.0, MAX_PROX_MU, lo_open=False), default=d.prox_mu,
                   help="FedProx: add (mu/2)||w - w_round||^2 to every local step's loss, for non-IID data (0: off)")
    p.add_argument("--precision", choices=PRECISIONS, default=d.precision,
                   help="mixed precision of training: fp32 (none), bf16 (autocast; CPU or CUDA), fp16 (autocast with "
                        "a GradScaler); parameters and the exchange stay fp32")
    p.add_argument("--seed", type=int_in(0, 2**63 - 1), default=d.seed, help="seed of model init, shard plan and sampling")
    p.add_argument("--num-shards", type=int_in(1, None, d.num_shards), default=d.num_shards,
                   help="shards to cut the training data into (at most its size)")
    p.add_argument("--eval-every", type=int_in(1, None, d.eval_every_rounds), default=d.eval_every_rounds,
                   help="rounds between test evaluations, always including the last")
    p.add_argument("--checkpoint-every", type=int_in(1, None, d.checkpoint_every_rounds), default=d.checkpoint_every_rounds,
                   help="rounds between checkpoints")
    p.add_argument("--optimizer-state", choices=OPTIMIZER_STATES, default=d.optimizer_state,
                   help="local: each peer keeps its own optimizer state (local SGD / FedAvg); average: its floating "
                        "tensors are averaged with the parameters every round (fp32 codec)")
    p.add_argument("--peer-grace-s", type=int_in(1, MAX_PEER_GRACE_S, d.peer_grace_s), default=d.peer_grace_s,
                   help="fail a running job that has fewer than --min-peers for this long")


def build_parser() -> argparse.ArgumentParser:
    """The ``dml`` argument parser."""
    env_coord = os.environ.get("DML_COORDINATOR", "127.0.0.1:50051")
    p = cliargs.Parser(prog="dml", description="dml job client: submit, watch and manage training jobs.")
    cliargs.add_version(p)
    sub = p.add_subparsers(dest="command", required=True, parser_class=cliargs.Parser)

    def common(sp: argparse.ArgumentParser) -> None:
        sp.add_argument("--coordinator", type=cliargs.address, default=env_coord,
                        help="coordinator HOST:PORT (env DML_COORDINATOR)")
        sp.add_argument("--timeout", type=cliargs.positive_float, default=api.DEFAULT_TIMEOUT_S,
                        help="deadline per call in seconds (an unreachable address fails at once)")
        cliargs.add_auth_flags(sp, "client")
        cliargs.add_tls_flags(sp)

    sp = sub.add_parser("submit", help="submit a job; prints its id on the last line")
    common(sp)
    add_job_options(sp)
    sp.add_argument("--dataset", default="",
                    help="train on this dataset of the coordinator's store (dml data put); refused when it has none")
    sp.add_argument("--placement", choices=PLACEMENTS, default="shared",
                    help="where the training data is: shared (one training set every peer reads, cut into "
                         "--num-shards shards) or local (federated: each peer trains on its own --local-data "
                         "dataset, which never leaves it; no sharding flags)")
    sp.add_argument("--local-data", type=dataset_name, default="", metavar="NAME",
                    help="--placement local: the dataset the peers offer (dml-peer --data NAME=PATH); the job runs only "
                         "on peers offering it")
    sp.add_argument("--pool", type=pool_name, default="",
                    help="run only on peers of this pool (dml-peer --pool; default: the pool 'default', that of peers started without --pool)")
    sp.add_argument("--max-peers", type=int_in(0, MAX_MAX_PEERS), default=0,
                    help="take at most this many peers at once (default 0: no limit beyond --num-shards)")
    sp.set_defaults(fn=cmd_submit)

    sp = sub.add_parser("status", help="show a job (default: the newest)")
    common(sp)
    sp.add_argument("job", nargs="?", help="job id (default: the newest job)")
    sp.add_argument("--watch", action="store_true", help="follow the job with a progress bar until it ends")
    sp.add_argument("--json", action="store_true", help="print JSON")
    sp.add_argument("--history", action="store_true",
                    help="also every committed round: a table, or a 'history' list with --json (not with --watch)")
    sp.set_defaults(fn=cmd_status)

    sp = sub.add_parser("jobs", help="list jobs")
    common(sp)
    sp.add_argument("--json", action="store_true", help="print JSON")
    sp.set_defaults(fn=cmd_jobs)

    sp = sub.add_parser("peers", help="list registered peers: pool, device, state, job, utilisation")
    common(sp)
    sp.add_argument("--json", action="store_true", help="print one JSON object per peer, a line each")
    sp.set_defaults(fn=cmd_peers)

    sp = sub.add_parser("cancel", help="cancel a job")
    common(sp)
    sp.add_argument("job", help="job id")
    sp.set_defaults(fn=cmd_cancel)

    sp = sub.add_parser("model", help="download a job's committed parameters as a torch state_dict")
    common(sp)
    sp.add_argument("job", help="job id")
    sp.add_argument("-o", "--output", type=pathlib.Path, required=True, help="file to write (required)")
    sp.set_defaults(fn=cmd_model)

    sp = sub.add_parser("checkpoint", help="download a job's whole training state (model, optimizer, round) as a torch file")
    common(sp)
    sp.add_argument("job", help="job id")
    sp.add_argument("-o", "--output", type=pathlib.Path, required=True, help="file to write (required)")
    sp.set_defaults(fn=cmd_checkpoint)

    sp = sub.add_parser("plot", help="plot train loss and test accuracy per round to a PNG")
    common(sp)
    sp.add_argument("job", help="job id")
    sp.add_argument("-o", "--output", type=pathlib.Path, required=True, help="PNG file to write (required)")
    sp.add_argument("--shards", action="store_true", help="plot each peer's label mix (a stacked bar per peer) instead")
    sp.set_defaults(fn=cmd_plot)

    sp = sub.add_parser("shards", help="show each peer's shards, samples, label counts and data use (source, bytes fetched, cache hits)")
    common(sp)
    sp.add_argument("job", help="job id")
    sp.add_argument("--json", action="store_true", help="print JSON")
    sp.set_defaults(fn=cmd_shards)

    sp = sub.add_parser("data", help="the coordinator's dataset store: put, ls, rm")
    dsub = sp.add_subparsers(dest="data_command", required=True, parser_class=cliargs.Parser)
    dp = dsub.add_parser("put", help="upload files or directories as a dataset (resumable: run it again after a "
                                     "broken connection; only chunks the coordinator lacks are sent)")
    common(dp)
    dp.add_argument("name", help="dataset name: 1-64 letters, digits, '.', '_' or '-'")
    dp.add_argument("paths", nargs="+", type=pathlib.Path, metavar="FILE|DIR",
                    help="a file goes in at its name, a directory's files at their paths below it")
    dp.set_defaults(fn=cmd_data_put)
    dp = dsub.add_parser("ls", help="list datasets: name, files, bytes, digest, created")
    common(dp)
    dp.add_argument("--json", action="store_true", help="print JSON")
    dp.set_defaults(fn=cmd_data_ls)
    dp = dsub.add_parser("rm", help="remove a dataset (refused while a pending or running job uses it)")
    common(dp)
    dp.add_argument("name", help="dataset name")
    dp.set_defaults(fn=cmd_data_rm)

    sp = sub.add_parser("health", help="check the coordinator's gRPC health service")
    common(sp)
    sp.add_argument("--service", default="", help="service name ('' for the whole server)")
    sp.set_defaults(fn=cmd_health)

    sp = sub.add_parser("certs", help="write a private CA and per-host TLS certificates (server and client use)")
    sp.add_argument("--out", type=pathlib.Path, required=True, help="directory to write them to (required)")
    sp.add_argument("--hosts", default="localhost",
                    help="comma-separated host names or IP addresses, one certificate each")
    sp.add_argument("--server-name", default=tls.CLUSTER_NAME,
                    help="the cluster-wide name every certificate also carries (what dialers verify, "
                         "--tls-server-name); '' for none")
    sp.add_argument("--days", type=int_in(1, 36500), default=DEFAULT_CERT_DAYS, help="validity in days")
    g = sp.add_mutually_exclusive_group()
    g.add_argument("--force", action="store_true", help="replace an existing CA")
    g.add_argument("--add", action="store_true", help="sign the hosts with the CA already in --out")
    g.add_argument("--if-missing", action="store_true",
                   help="do nothing (exit 0) when --out already holds a CA (a one-shot container's step)")
    sp.set_defaults(fn=cmd_certs)

    from dml.client import local

    sp = sub.add_parser("local", help="run a coordinator and N peers here, train a job, print the accuracy")
    local.add_arguments(sp)
    add_job_options(sp)
    sp.set_defaults(fn=local.cmd_local)
    return p


def run(argv: list[str] | None = None) -> int:
    """Parses ``argv`` and runs the command; returns the exit code (usage errors exit 2 from the parser)."""
    p = build_parser()
    a = p.parse_args(argv)
    if hasattr(a, "tls_cert"):
        a.tls = cliargs.tls_config(p, a)
    try:
        return int(a.fn(a))
    except ApiError as e:
        print(f"dml: {e}", file=sys.stderr)
        return e.code
    except KeyboardInterrupt:
        print("\ndml: interrupted", file=sys.stderr)
        return 130


def main(argv: list[str] | None = None) -> None:
    """Entry point: exits with the command's code, quietly when stdout closes early (``| head``)."""
    cliargs.run_quietly(lambda: run(argv))


if __name__ == "__main__":
    main()
