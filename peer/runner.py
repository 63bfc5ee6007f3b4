"""The peer process: its exchange server, registration, heartbeats, eviction and the loop that
waits for plans and runs them (ring rounds: :mod:`peer.ring_round`, gossip steps:
:mod:`peer.gossip_step`; the parameters they hold: :mod:`peer.params`)."""
from __future__ import annotations

import logging
import os
import pathlib
import threading
import time
from dataclasses import dataclass

import grpc
import numpy as np
from dml.v1 import control_pb2, types_pb2

from dml.common import guard, rpc, version
from dml.common import metrics as metricsmod
from dml.common.metrics import MetricsConfig, MetricsServer
from dml.common.spec import DEFAULT_POOL
from dml.common.tls import TlsConfig
from dml.peer import datausage, shm
from dml.peer.advertise import address_problem, advertise_host
from dml.peer.auth import ExchangeGuard, PeerCredentials
from dml.peer.client import CALL_TIMEOUT_S, ControlClient, Evicted, VersionMismatch, evicted_code, refusing_cluster
from dml.peer.datacache import ChunkCache, StoreSource
from dml.peer.exchange import ExchangeServicer, add_exchange_to_server, call_policies, guarded_method
from dml.peer.faults import Fault
from dml.peer.gossip import GossipNode
from dml.peer.gossip_step import GossipStep
from dml.peer.link import PeerLink
from dml.peer.metrics import PeerMetrics
from dml.peer.params import ParamStore
from dml.peer.prefetch import Prefetcher, plan_indices
from dml.peer.ring_round import RingRound
from dml.peer.torchplane import TorchPlane
from dml.peer.take import take
from dml.peer.taskload import CodeCache
from dml.peer.trainer import Trainer
from dml.peer.workers import WorkerHost

log = logging.getLogger(__name__)

# The exchange server's pool: ring streams, watches, gossip and parameter downloads hold a thread
# each (a handful in a healthy ring); the call guard keeps a quarter of it for short calls.
EXCHANGE_WORKERS = 64


def device_memory(device: str) -> int:
    """Memory of ``device`` in bytes, for the capability record (``dml peers``): a CUDA device's
    total memory, the machine's physical memory for ``cpu``; 0 when unknown."""
    try:
        if device.startswith("cuda"):
            import torch

            return int(torch.cuda.get_device_properties(torch.device(device)).total_memory)
        if device == "cpu":
            return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
    except (ValueError, OSError, RuntimeError, AssertionError, AttributeError) as e:
        log.warning("cannot tell the memory of device %s: %s", device, e)
    return 0


@dataclass(frozen=True)
class PeerConfig:
    """Everything dml-peer is configured with."""

    coordinator: str
    join_token: str = ""  # the cluster's join token ("" for a coordinator run with --no-auth)
    host: str = "127.0.0.1"
    port: int = 0
    advertise_host: str = ""  # host others dial; "" or "auto": see dml.peer.advertise
    device: str = "cpu"
    exchange_timeout_s: float = 30.0  # longest wait for the next chunk from the ring predecessor
    plan_wait_s: float = 5.0
    chunk_elems: int = 0  # float32 elements per wire chunk; 0: the best measured for the job's data plane
    tcp: bool = True  # serve the TCP data plane (jobs may still choose gRPC)
    cluster_id: str = ""  # refuse coordinators of any other cluster; "": the first one joined
    # Experiments only: after training, wait (slowdown - 1) times as long as training took, so
    # this peer trains `slowdown` times slower than it can (a stand-in for a slower machine).
    slowdown: float = 1.0
    max_samples: int = 0  # --max-samples: the most training samples this peer takes (0: no cap)
    pool: str = DEFAULT_POOL  # --pool: the resource pool it serves
    metrics: MetricsConfig | None = None  # the Prometheus endpoint (None: off)
    tls: TlsConfig | None = None  # every port and every dial over TLS; None: plain text, loopback only
    # Tests only (fault injection, off by default): peer addresses (host:port) this peer acts as
    # if it cannot reach, for ring neighbours, gossip partners and parameter fetches alike. A
    # one-way partition: the others still reach this peer, and it them.
    unreachable: tuple[str, ...] = ()
    fault: Fault | None = None  # tests only (peer.faults): make this a broken peer at one round
    allow_job_code: bool = False  # run task code sent with jobs (dml-peer --allow-job-code)
    allow_torch_plane: bool = False  # with TLS on, take --data-plane torch jobs all the same (unencrypted)
    data_dir: pathlib.Path | None = None  # the tasks' ctx.data_dir (dml-peer --data-dir); None: the working directory
    code_cache_dir: pathlib.Path | None = None  # where fetched task code is kept; None: a temp dir, removed at stop
    cache_dir: pathlib.Path | None = None  # datasets fetched from the coordinator's store; None: a temp dir, removed at stop
    cache_max_bytes: int = 0  # the most bytes of dataset chunks kept in cache_dir (0: no limit)
    local_data: tuple[tuple[str, pathlib.Path], ...] = ()  # --data NAME=PATH: local datasets offered, by name
    workers: int = 1  # --workers: CPU training worker processes (peer.workers); 1: train in this process
    gpus: tuple[int, ...] = ()  # --gpus: one worker per listed CUDA device (then workers = len(gpus))
    committed_copy_dir: pathlib.Path | None = None  # --committed-copy disk: where (peer.diskcopy); None: in memory

    def injected_fault(self, address: str) -> str:
        """Why this peer must act as if ``address`` were unreachable ("" when it need not)."""
        return "connection refused (injected fault: --fault-unreachable)" if address in self.unreachable else ""


class Peer:
    """One dml peer. ``start()`` then ``run()`` (blocks) or ``run_in_thread()``; ``stop()`` ends it."""

    def __init__(self, config: PeerConfig) -> None:
        self.config = config
        self.stop_event = threading.Event()
        self.peer_id = ""
        self.store = ParamStore(config.committed_copy_dir)
        self.code_cache = CodeCache(config.code_cache_dir)  # task code fetched for jobs (peer.taskload)
        self.data_cache = ChunkCache(config.cache_dir, config.cache_max_bytes)  # datasets of jobs (peer.datacache)
        self.prefetch = Prefetcher()  # a plan's rows of a store dataset, fetched ahead of its batches
        self.workers = WorkerHost(config.workers, config.gpus, config.fault)  # --workers / --gpus (peer.workers)
        self._abort = threading.Event()
        self._evicted = threading.Event()
        # Held while peer_id changes with _evicted cleared (a registration), and while the heartbeat
        # thread acts on a NOT_FOUND: so a notice for the id just replaced cannot mark the new one evicted.
        self._id_lock = threading.Lock()
        self._heartbeat_s = 0.5
        self.metrics = PeerMetrics()
        self.held_out = ""  # why the coordinator holds this peer out of a job's rings ("" when it does not)
        self.fatal = ""  # why the round loop stopped the peer for good ("": it did not)
        self.credentials = PeerCredentials(config.join_token)
        self.servicer = ExchangeServicer(self.store.serve, recv_timeout_s=config.exchange_timeout_s,
                                         data_plane_host=config.host if config.tcp else None, tls=config.tls)
        self.servicer.guarded = True
        self.gossip = GossipNode("", self.credentials)
        self.gossip.on_bytes = lambda sent, received: self.metrics.exchanged("gossip", sent, received)
        self.servicer.gossip = self.gossip
        self._gossip_step = GossipStep(self)
        self._ring = RingRound(self, self._abort, self._make_link, self._gossip_step)
        self._server = rpc.server(workers=EXCHANGE_WORKERS, max_message_bytes=rpc.EXCHANGE_MESSAGE_BYTES,
                                  interceptors=[ExchangeGuard(self.credentials, guarded_method)],
                                  limits=guard.Limits.for_pool(EXCHANGE_WORKERS,
                                                               call_policies(config.exchange_timeout_s)))
        add_exchange_to_server(self.servicer, self._server)
        try:
            self.port = rpc.bind(self._server, config.host, config.port, tls=config.tls)
        except BaseException:
            self.servicer.close()  # the data plane listens already
            raise
        try:
            self.metrics_server: MetricsServer | None = metricsmod.serve(self.metrics.registry, config.metrics,
                                                                         f"peer on port {self.port}")
        except BaseException:
            self._server.stop(None)
            self.servicer.close()
            raise
        self.address = f"{advertise_host(config.host, config.advertise_host, config.coordinator)}:{self.port}"
        host = self.address.rsplit(":", 1)[0].strip("[]")
        self.torch = TorchPlane(lambda: self.peer_id, self.credentials, host, tls=config.tls, device=config.device)
        self.servicer.torch = self.torch  # --data-plane torch: its rendezvous store and probes
        self.client = ControlClient(config.coordinator, self.stop_event, cluster_id=config.cluster_id,
                                    credentials=self.credentials, tls=config.tls)
        self._hb_thread = threading.Thread(target=self._heartbeat_loop, name="heartbeat", daemon=True)
        self._main: threading.Thread | None = None

    @property
    def metrics_port(self) -> int | None:
        """The port the metrics endpoint listens on (None when it is off)."""
        return self.metrics_server.port if self.metrics_server is not None else None

    # -- lifecycle --------------------------------------------------------------------------
    def start(self) -> Peer:
        """Starts the exchange server, checks that its advertised address answers, and registers
        with the coordinator."""
        shm.remove_orphans()  # files a killed peer on this host left in /dev/shm
        self._server.start()
        dp = self.servicer.data_plane
        rpc.log_transport("this peer's exchange server" + (f" and data plane (port {dp.port})" if dp else ""),
                          f"{self.config.host}:{self.port}", self.config.tls)
        problem = address_problem(self.address)
        if problem:
            log.warning("this peer cannot reach its own advertised address %s (%s): other peers will likely not "
                        "reach it either, and the coordinator will hold it out of rings; check --advertise-host "
                        "(and --host, --port)", self.address, problem)
        else:
            log.info("advertised address %s answers", self.address)
        Trainer.warm_up()
        self._register()
        self._hb_thread.start()
        return self

    def _register(self) -> None:
        # Registered first, cleared after: only this cluster's coordinator (which may take a
        # while to come back) can tell this peer to drop what it holds.
        resp = self.client.register(self.address, self.config.device, device_memory(self.config.device),
                                    max_samples=self.config.max_samples, pool=self.config.pool,
                                    cache_free=datausage.cache_free(self.data_cache),
                                    local_datasets=[n for n, _ in self.config.local_data],
                                    workers=self.workers.count, worker_devices=self.workers.devices)
        if self.peer_id:  # evicted: whatever it held may be stale, start clean as a new member
            self.servicer.forget_job()  # kept data-plane streams too
            self.gossip.detach()
            self.store.clear()
            self.workers.close()  # a new take starts fresh ones
            self._ring.forget()
        self.credentials.registered(resp.peer_id, resp.peer_token, resp.coordinator_public_key)
        with self._id_lock:
            self.peer_id = resp.peer_id
            self.gossip.peer_id = resp.peer_id
            self._heartbeat_s = resp.heartbeat_interval_ms / 1000.0
            self._ring.deadline_s = (resp.round_deadline_ms or 120_000) / 1000.0
            self._evicted.clear()
        log.info("peer %s: registered at %s with coordinator %s", self.peer_id, self.address, self.config.coordinator)

    def run_in_thread(self) -> threading.Thread:
        """Runs the round loop in a daemon thread."""
        self._main = threading.Thread(target=self.run, name=f"peer-{self.port}", daemon=True)
        self._main.start()
        return self._main

    def stop(self) -> None:
        """Stops the loops and the server."""
        self.stop_event.set()
        self._abort.set()
        if self._main is not None:
            self._main.join(10)
        self._ring.unwatch()
        self.torch.drop("the peer stops")
        self._server.stop(0.5).wait(2)
        self.servicer.close()
        if self.metrics_server is not None:
            self.metrics_server.stop()
        self._gossip_step.close_channels()
        self.prefetch.cancel()
        self.prefetch.join(5)
        self.workers.close()
        self.client.close()
        self.code_cache.close()
        self.data_cache.close()

    # -- heartbeats -------------------------------------------------------------------------
    def _heartbeat_loop(self) -> None:
        failing = False
        while not self.stop_event.wait(self._heartbeat_s):
            if self._evicted.is_set():
                continue
            me = self.peer_id  # a NOT_FOUND for an id we no longer use must not evict the new one
            try:
                sent = time.monotonic()
                hb = self.client.stub.Heartbeat(control_pb2.HeartbeatRequest(peer_id=me),
                                                timeout=max(self._heartbeat_s * 2, 1.0))
                self.metrics.heartbeat_seconds.observe(time.monotonic() - sent)
                if not self.client.answer_ok(hb.cluster_id, "heartbeat"):
                    continue  # another cluster's coordinator: nothing it says applies to this peer
                if why := version.mismatch(version.PROTOCOL_VERSION, hb.protocol_version, "this peer", "the coordinator"):
                    # It came back on another release with this peer's registration kept: the
                    # same refusal as at registration, which this peer will not make again.
                    self._stop_for_good(why)
                    return
                if failing:
                    log.info("peer %s: coordinator reachable again", me)
                failing = False
                self._note_held_out(me, hb.held_out_reason)
                fetching = self.prefetch.job_id
                if fetching and hb.job_id != fetching:  # the job ended here: stop fetching its rows
                    self.prefetch.cancel(fetching)
                self.servicer.keep_only(hb.job_id, hb.epoch)  # streams of ended jobs and epochs go
                job, epoch = self._ring.under_way
                if job and (hb.job_id != job or hb.epoch > epoch):  # cancelled, finished, or re-formed
                    self._abort.set()
                watch = self._ring.watch
                if watch is not None and (hb.job_id != watch.job_id or hb.epoch > watch.epoch):
                    watch.close()  # its round is over either way: nothing left to report
            except grpc.RpcError as e:
                code = e.code() if isinstance(e, grpc.Call) else None
                self.metrics.heartbeat_failures.labels(code.name if code is not None else "UNKNOWN").inc()
                other = refusing_cluster(e)
                if other is not None:
                    self.client.note_wrong_cluster("heartbeat", other)
                elif evicted_code(code):
                    # Checked and set under the lock a registration holds: the round loop may have
                    # learnt of the eviction first and registered again meanwhile, and marking
                    # that new id evicted would stop its heartbeats (the loop, in a long poll,
                    # would not register again before the new lease ran out).
                    with self._id_lock:
                        if me == self.peer_id:
                            log.warning("peer %s: evicted by the coordinator; will re-register", me)
                            self._evicted.set()
                            self._abort.set()
                elif not failing:
                    log.warning("peer %s: heartbeat failed (%s); retrying", self.peer_id, code)
                    failing = True

    def _stop_for_good(self, why: str) -> None:
        """Stops this peer for a reason no retry mends (a coordinator of another release):
        :attr:`fatal` says it, and dml-peer exits 2 with it. A round under way is aborted."""
        self.fatal = f"{self.config.coordinator}: {why}"
        log.critical("peer %s: %s; stopping", self.peer_id, self.fatal)
        self._abort.set()
        self.stop_event.set()

    def _note_held_out(self, me: str, reason: str) -> None:
        """Logs once when the coordinator starts (or stops) holding this peer out of a job's
        rings. The peer stays registered and idle rather than registering again: it is the
        same peer at the same address, which would only be held out again."""
        if reason == self.held_out:
            return
        self.held_out = reason
        if reason:
            log.error("peer %s: the coordinator holds this peer out of rings (%s). It stays registered and idle; "
                      "once the cause is fixed (e.g. --advertise-host), restart it to take part again", me, reason)
        else:
            log.info("peer %s: no longer held out of any job", me)

    # -- the round loop ---------------------------------------------------------------------
    def run(self) -> None:
        """Waits for plans and runs rounds until stopped. If the loop itself dies the whole peer
        stops (heartbeats included), rather than lingering as a member that never reports."""
        try:
            self._loop()
        finally:
            if not self.stop_event.is_set():
                log.critical("peer %s: round loop ended unexpectedly; stopping", self.peer_id)
            self.stop_event.set()

    def _loop(self) -> None:
        last: tuple[str, int, int] = ("", 0, 0)
        while not self.stop_event.is_set():
            try:
                if self._evicted.is_set():
                    self._register()
                    last = ("", 0, 0)
                ask = control_pb2.GetPlanRequest(peer_id=self.peer_id, last_job_id=last[0], last_round=last[1],
                                                 last_epoch=last[2], wait_ms=int(self.config.plan_wait_s * 1000))
                resp = self.client.call(
                    lambda: self.client.stub.GetPlan(ask, timeout=self.config.plan_wait_s + CALL_TIMEOUT_S),  # noqa: B023 (called now)
                    "get plan")
                if not resp.has_plan:
                    continue
                if resp.plan.take:  # an idle peer's offer of a job: load its task and say what it found
                    if self.store.trainer_for(resp.plan.job_id) is None:
                        self._gossip_step.leave()  # whatever it gossiped before is over
                    take(self, resp.plan)
                    continue
                plan: types_pb2.Plan | None = resp.plan
                while plan is not None and not self.stop_event.is_set():
                    self._ring.unwatch()  # a new plan: the watched round committed or was re-formed
                    self.credentials.note_plan(plan.job_id, plan.epoch, plan.member_ticket)
                    last = (plan.job_id, plan.round, plan.epoch)
                    self._prefetch(plan)
                    if plan.gossip:  # a gossip step's report answers with the next step
                        plan = self._gossip_step.run(plan)
                    else:  # and the report that commits a ring round with the next round
                        plan = self._ring.run(plan)
            except Evicted as e:
                log.warning("peer %s: %s", self.peer_id, e)
                self._evicted.set()
            except VersionMismatch as e:  # re-registering with a coordinator of another release
                self._stop_for_good(str(e))
                return
            except grpc.RpcError as e:
                if self.stop_event.is_set():
                    return
                log.error("peer %s: coordinator call failed: %s", self.peer_id,
                          e.details() if isinstance(e, grpc.Call) else e)
                self.stop_event.wait(1.0)

    def _prefetch(self, plan: types_pb2.Plan) -> None:
        """Starts fetching the rows of this peer's shards in ``plan`` when its job reads a
        dataset of the coordinator's store (and this peer holds the job's trainer)."""
        trainer = self.store.trainer_for(plan.job_id)
        usage = datausage.of(trainer) if trainer is not None else None
        if usage is not None:
            datausage.note_plan(usage, plan)  # the shards whose presence its reports tell
        source = trainer.ctx.source if trainer is not None else None
        if not isinstance(source, StoreSource):
            return
        me = next((m for m in plan.members if m.peer_id == self.peer_id), None)
        assigned = sorted(me.shard_ids) if me is not None else []
        if usage is None or not assigned:  # no record of its shards: this round's, from the plan
            if plan.shard_indices:
                self.prefetch.submit(plan.job_id, source, plan_indices(plan), trainer.train_data.size)
            return
        job_id = plan.job_id

        def indices() -> np.ndarray:
            """Every assigned shard's indices: those the plans gave, the others asked for."""
            known, missing = datausage.known_indices(usage, assigned)
            if missing:
                datausage.note_indices(usage, self.client.shard_indices(self.peer_id, job_id, missing))
                known, _ = datausage.known_indices(usage, assigned)
            return known

        self.prefetch.submit(job_id, source, indices, trainer.train_data.size, key=tuple(assigned))

    def _make_link(self, plan: types_pb2.Plan, rank: int) -> PeerLink:
        """The ring link for this round (a seam for fault-injection tests)."""
        return self._ring.link(plan, rank)
