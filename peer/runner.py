"""The peer process: exchange server, registration, heartbeats and the round loop (the
parameters it holds between rounds: :mod:`peer.params`)."""
from __future__ import annotations

import logging
import math
import tempfile
import threading
import time
from dataclasses import dataclass

import grpc
import numpy as np
from dml.v1 import (
    control_pb2,
    exchange_pb2,
    exchange_pb2_grpc,
    jobs_pb2,
    jobs_pb2_grpc,
    types_pb2,
)

from dml.aggregation.allreduce import chunk_elems_for
from dml.aggregation.averaging import delta_ring_average, digest, weighted_ring_average
from dml.aggregation.codecs import Codec, get_codec
from dml.aggregation.topology import partner_ids
from dml.aggregation.transport import ExchangeError
from dml.common import rpc
from dml.common.sampling import shard_order
from dml.peer.advertise import advertise_host
from dml.peer.client import CALL_TIMEOUT_S, ControlClient, Evicted
from dml.peer.exchange import ExchangeServicer, add_exchange_to_server
from dml.peer.gossip import GossipNode, Outcome
from dml.peer.link import PeerLink
from dml.peer.params import ParamStore, Snapshot
from dml.common.tasks import get_task
from dml.peer.trainer import Trainer

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PeerConfig:
    """Everything dml-peer is configured with."""

    coordinator: str
    host: str = "127.0.0.1"
    port: int = 0
    advertise_host: str = ""  # host others dial; "" or "auto": see dml.peer.advertise
    device: str = "cpu"
    exchange_timeout_s: float = 30.0  # longest wait for the next chunk from the ring predecessor
    plan_wait_s: float = 5.0
    chunk_elems: int = 0  # float32 elements per wire chunk; 0: the best measured for the job's data plane
    tcp: bool = True  # serve the TCP data plane (jobs may still choose gRPC)
    # Experiments only: after training, wait (slowdown - 1) times as long as training took, so
    # this peer trains `slowdown` times slower than it can (a stand-in for a slower machine).
    slowdown: float = 1.0


def _superseded(e: BaseException) -> bool:
    """The coordinator refused a report or upload as stale: the plan moved on without us."""
    return isinstance(e, grpc.Call) and e.code() == grpc.StatusCode.FAILED_PRECONDITION


class Peer:
    """One dml peer. ``start()`` then ``run()`` (blocks) or ``run_in_thread()``; ``stop()`` ends it."""

    def __init__(self, config: PeerConfig) -> None:
        self.config = config
        self.stop_event = threading.Event()
        self.peer_id = ""
        self.store = ParamStore()
        self._abort = threading.Event()
        self._exchange: tuple[str, int] = ("", 0)  # (job, epoch) of the exchange under way
        self._round_deadline_s = 120.0
        self._evicted = threading.Event()
        self._heartbeat_s = 0.5
        self._residual: tuple[str, np.ndarray] | None = None  # (job, error-feedback residual)
        self._codecs: dict[str, Codec] = {}
        self.servicer = ExchangeServicer(self.store.serve, recv_timeout_s=config.exchange_timeout_s,
                                         data_plane_host=config.host if config.tcp else None)
        self.gossip = GossipNode("")
        self.servicer.gossip = self.gossip
        self._channels: dict[str, grpc.Channel] = {}  # gossip partners' exchange servers, by address
        self._suspects: dict[str, float] = {}  # gossip partners that failed -> skip until (monotonic)
        self._gossip_bytes_reported = 0
        self._gossip_served_seen = 0  # the node's `served` count when this peer last exchanged
        self._server = rpc.server(workers=16, max_message_bytes=rpc.EXCHANGE_MESSAGE_BYTES)
        add_exchange_to_server(self.servicer, self._server)
        self.port = rpc.bind(self._server, config.host, config.port)
        self.address = f"{advertise_host(config.host, config.advertise_host, config.coordinator)}:{self.port}"
        self.client = ControlClient(config.coordinator, self.stop_event)
        self._hb_thread = threading.Thread(target=self._heartbeat_loop, name="heartbeat", daemon=True)
        self._main: threading.Thread | None = None

    # -- lifecycle --------------------------------------------------------------------------
    def start(self) -> Peer:
        """Starts the exchange server and registers with the coordinator."""
        self._server.start()
        Trainer.warm_up()
        self._register()
        self._hb_thread.start()
        return self

    def _register(self) -> None:
        if self.peer_id:  # evicted: whatever it held may be stale, start clean as a new member
            self.gossip.detach()
            self.store.clear()
            self._residual = None
        resp = self.client.register(self.address, self.config.device, 0)
        self.peer_id = resp.peer_id
        self.gossip.peer_id = resp.peer_id
        self._heartbeat_s = resp.heartbeat_interval_ms / 1000.0
        self._round_deadline_s = (resp.round_deadline_ms or 120_000) / 1000.0
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
        self._server.stop(0.5).wait(2)
        self.servicer.close()
        self._close_channels()
        self.client.close()

    # -- heartbeats -------------------------------------------------------------------------
    def _heartbeat_loop(self) -> None:
        failing = False
        while not self.stop_event.wait(self._heartbeat_s):
            if self._evicted.is_set():
                continue
            me = self.peer_id  # a NOT_FOUND for an id we no longer use must not evict the new one
            try:
                hb = self.client.stub.Heartbeat(control_pb2.HeartbeatRequest(peer_id=me),
                                                timeout=max(self._heartbeat_s * 2, 1.0))
                if failing:
                    log.info("peer %s: coordinator reachable again", me)
                failing = False
                job, epoch = self._exchange
                if job and (hb.job_id != job or hb.epoch > epoch):  # cancelled, finished, or re-formed
                    self._abort.set()
            except grpc.RpcError as e:
                code = e.code() if isinstance(e, grpc.Call) else None
                if code == grpc.StatusCode.NOT_FOUND:
                    if me == self.peer_id:
                        log.warning("peer %s: evicted by the coordinator; will re-register", me)
                        self._evicted.set()
                        self._abort.set()
                elif not failing:
                    log.warning("peer %s: heartbeat failed (%s); retrying", self.peer_id, code)
                    failing = True

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
                plan: types_pb2.Plan | None = resp.plan
                while plan is not None and not self.stop_event.is_set():
                    last = (plan.job_id, plan.round, plan.epoch)
                    if plan.gossip:  # a gossip step's report answers with the next step
                        plan = self._run_gossip_step(plan)
                    else:
                        self._run_round(plan)
                        plan = None
            except Evicted as e:
                log.warning("peer %s: %s", self.peer_id, e)
                self._evicted.set()
            except grpc.RpcError as e:
                if self.stop_event.is_set():
                    return
                log.error("peer %s: coordinator call failed: %s", self.peer_id,
                          e.details() if isinstance(e, grpc.Call) else e)
                self.stop_event.wait(1.0)

    def _prepare(self, plan: types_pb2.Plan) -> Trainer:
        """Makes sure the trainer holds the parameters of round ``plan.round - 1``."""
        spec = plan.spec
        trainer = self.store.trainer_for(plan.job_id)
        if trainer is None:
            trainer = Trainer(get_task(spec.task), spec.seed, spec.learning_rate, self.config.device)
            init = trainer.params()
            self.store.start(plan.job_id, trainer, Snapshot(plan.job_id, 0, init, digest(init)))
        start = plan.round - 1
        if spec.aggregation == "gossip":
            self._end_gossip(plan.job_id, start)
        got = self.store.begin(start, plan.start_digest)
        if got.dropped and self._residual is not None:
            self._residual[1].fill(0.0)  # its errors belong to a round that never counted
        in_place = got.in_place  # the trainer already holds the starting parameters
        if not got.ready:
            self._fetch(plan, start, trainer)
            in_place = False
        committed = self.store.committed
        assert committed is not None
        if not in_place:
            trainer.set_params(committed.params)
        return trainer

    def _end_gossip(self, job_id: str, rnd: int) -> None:
        """A gossip job's closing ring round: partners may no longer change the parameters, and
        this peer's own (gossiped) parameters become the round's starting point, kept so a
        re-issued round starts from them again."""
        self.gossip.detach()
        self._close_channels()
        self.store.keep_own(job_id, rnd)

    def _fetch(self, plan: types_pb2.Plan, rnd: int, trainer: Trainer) -> None:
        """Pulls round ``rnd``'s parameters (a joiner catching up): from a live member, else from
        the coordinator's checkpoint when it is of that round. Each download is digest-checked."""
        sources = [(m.peer_id, m.address) for m in plan.members if m.peer_id != self.peer_id]
        for name, address in sources:
            try:
                with rpc.channel(address, max_message_bytes=rpc.EXCHANGE_MESSAGE_BYTES) as ch:
                    stub = exchange_pb2_grpc.PeerExchangeStub(ch)
                    parts = list(stub.FetchParameters(exchange_pb2.FetchParametersRequest(job_id=plan.job_id, round=rnd),
                                                      timeout=self.config.exchange_timeout_s))
            except grpc.RpcError as e:
                log.info("peer %s: %s has no round %d parameters (%s)", self.peer_id, name, rnd,
                         e.code() if isinstance(e, grpc.Call) else e)
                continue
            if parts and parts[0].round == rnd and plan.start_digest in ("", parts[0].digest) and self._adopt(
                    plan.job_id, rnd, trainer, parts[0].digest, b"".join(p.data for p in parts), name):
                return
        try:
            stub = jobs_pb2_grpc.JobServiceStub(self.client.channel)
            chunks = list(stub.DownloadModel(jobs_pb2.DownloadModelRequest(job_id=plan.job_id),
                                             timeout=self.config.exchange_timeout_s))
            if chunks and chunks[0].round == rnd and plan.start_digest in ("", chunks[0].digest) and self._adopt(
                    plan.job_id, rnd, trainer, chunks[0].digest, b"".join(c.data for c in chunks), "the coordinator"):
                return
        except grpc.RpcError as e:
            log.info("peer %s: no checkpoint of round %d at the coordinator (%s)", self.peer_id, rnd,
                     e.code() if isinstance(e, grpc.Call) else e)
        raise ExchangeError(f"neither a member nor the coordinator could provide round {rnd} parameters")

    def _adopt(self, job_id: str, rnd: int, trainer: Trainer, want: str, data: bytes, source: str) -> bool:
        """Loads a downloaded state_dict as round ``rnd``'s committed parameters if its digest matches."""
        import io

        import torch

        sd = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
        trainer.model.load_state_dict(sd)
        if not self.store.adopt(job_id, rnd, trainer.params(), want):
            log.warning("peer %s: round %d parameters from %s failed their digest check", self.peer_id, rnd, source)
            return False
        log.info("peer %s job %s: caught up to round %d from %s", self.peer_id, job_id, rnd, source)
        return True

    @staticmethod
    def _samples(plan: types_pb2.Plan, rank: int) -> np.ndarray:
        """The training-set indices this member trains on, in order, as the plan allocates them."""
        parts = []
        for r in plan.members[rank].samples:
            indices = np.asarray(plan.shard_indices[r.shard_id].indices, dtype=np.int64)
            parts.append(shard_order(indices, plan.spec.seed, r.data_epoch, r.shard_id)[r.start : r.stop])
        return np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)

    def _run_round(self, plan: types_pb2.Plan) -> None:
        me = [i for i, m in enumerate(plan.members) if m.peer_id == self.peer_id]
        if not me:
            return
        tag = f"peer {self.peer_id} job {plan.job_id} round {plan.round} epoch {plan.epoch}"
        self._abort.clear()
        self._exchange = (plan.job_id, plan.epoch)
        link = self._make_link(plan, me[0])
        link.open_early()  # the stream to the successor is negotiated while we train
        try:
            self._train_and_average(plan, me[0], tag, link)
        except ExchangeError as e:
            log.warning("%s: exchange failed: %s", tag, e)
            if not self._abort.is_set():  # an abort means the coordinator already moved on
                self._report_failure(plan, e.suspect, str(e))
        except Evicted:
            raise
        except Exception as e:
            if _superseded(e):
                log.info("%s: round superseded (%s)", tag, e)
                return
            log.exception("%s: local failure; leaving the ring so the round can go on without us", tag)
            self._report_failure(plan, self.peer_id, f"local failure: {e!r}")
        finally:
            # Only now: closing our outgoing stream first would let our successor see it break
            # and blame us before our own report (naming the real culprit) reaches the coordinator.
            link.shutdown()
            self._exchange = ("", 0)

    def _throttle(self, trained_s: float) -> None:
        """``--slowdown``: idles (slowdown - 1) x the training time just spent."""
        if self.config.slowdown > 1:
            self.stop_event.wait((self.config.slowdown - 1) * trained_s)

    def _report_failure(self, plan: types_pb2.Plan, suspect: str, detail: str) -> None:
        fail = control_pb2.ReportFailureRequest(peer_id=self.peer_id, job_id=plan.job_id, round=plan.round,
                                                epoch=plan.epoch, suspect_peer_id=suspect, detail=detail)
        try:
            self.client.call(lambda: self.client.stub.ReportFailure(fail, timeout=CALL_TIMEOUT_S),
                             "report failure", give_up_s=30)
        except (grpc.RpcError, Evicted) as e:
            log.warning("peer %s: could not report the failure: %s", self.peer_id, e)

    def _make_link(self, plan: types_pb2.Plan, rank: int) -> PeerLink:
        """The ring link for this round (a seam for fault-injection tests)."""
        world = len(plan.members)
        succ = plan.members[(rank + 1) % world]
        trainer = self.store.trainer_for(plan.job_id)
        return PeerLink(self.servicer, (plan.job_id, plan.round, plan.epoch), self.peer_id,
                        plan.members[(rank - 1) % world].peer_id, succ.peer_id, succ.address,
                        self._round_deadline_s, self._abort, idle_timeout_s=self.config.exchange_timeout_s,
                        data_plane=plan.spec.data_plane or "auto",
                        payload_bytes=4 * trainer.numel if trainer is not None else 0)

    def _codec(self, name: str) -> Codec:
        if name not in self._codecs:
            self._codecs[name] = get_codec(name)
        return self._codecs[name]

    def _residual_for(self, job_id: str, n: int) -> np.ndarray:
        """This job's error-feedback residual (zeros when new)."""
        if self._residual is None or self._residual[0] != job_id or self._residual[1].size != n:
            self._residual = None  # free the old one first
            self._residual = (job_id, np.zeros(n, dtype=np.float32))
        return self._residual[1]

    def _average(self, plan: types_pb2.Plan, rank: int, buf: np.ndarray, samples: int, link: PeerLink) -> None:
        """Averages ``buf`` (parameters, then the weight slot) with the other members."""
        world = len(plan.members)
        codec = plan.spec.codec or "fp32"
        chunk = self.config.chunk_elems or chunk_elems_for(plan.spec.data_plane or "auto")
        # Lossy codecs send changes against a base every member must hold bit for bit: the
        # committed round, whose digest the plan carries. Before the first commit there is no
        # such proof (inits agree only as far as seeding does), so that round averages exactly.
        if codec == "fp32" or not plan.start_digest:
            weighted_ring_average(buf, float(samples), rank, world, link, self._round_deadline_s, chunk)
            return
        total = sum(r.stop - r.start for m in plan.members for r in m.samples)
        if total <= 0:
            raise ValueError("the plan allocates no samples: nothing to average")
        committed = self.store.committed
        assert committed is not None
        residual = self._residual_for(plan.job_id, buf.size - 1)
        try:
            delta_ring_average(buf[:-1], committed.params, samples / total, rank, world, link,
                               self._round_deadline_s, self._codec(codec), residual, chunk)
        except BaseException:
            residual.fill(0.0)  # half-updated: drop it rather than feed back a wrong correction
            raise

    def _train_and_average(self, plan: types_pb2.Plan, rank: int, tag: str, link: PeerLink) -> None:
        t0 = time.monotonic()
        trainer = self._prepare(plan)
        samples = self._samples(plan, rank)
        t_train = time.monotonic()
        res = trainer.train_on(samples, plan.spec.batch_size)
        t_done = time.monotonic()
        self._throttle(t_done - t_train)
        t1 = time.monotonic()
        buf = trainer.host_buffer()
        self._average(plan, rank, buf, res.samples, link)  # closes the link when it succeeds
        trainer.load_host_buffer(buf)
        t2 = time.monotonic()
        params, live = trainer.params_view()
        dig = digest(params)
        self.store.set_tentative(Snapshot(plan.job_id, plan.round, params, dig, live=live))
        req = control_pb2.ReportRoundRequest(
            peer_id=self.peer_id, job_id=plan.job_id, round=plan.round, epoch=plan.epoch, samples=res.samples,
            train_loss=res.loss, digest=dig,
            train_samples_per_s=res.samples / (t1 - t_train) if res.samples and t1 > t_train else 0.0,  # throttle included
            train_ms=int((t1 - t0) * 1000), exchange_ms=int((t2 - t1) * 1000), bytes_sent=link.bytes_sent)
        every = max(plan.spec.eval_every_rounds, 1)
        if rank == 0 and (plan.round % every == 0 or plan.round >= plan.spec.rounds):
            t_eval = time.monotonic()
            acc, loss = trainer.evaluate()
            req.has_test_metrics, req.test_accuracy, req.test_loss = True, acc, loss
            req.eval_ms = int((time.monotonic() - t_eval) * 1000)
        if rank == 0 and plan.checkpoint:  # whether or not this round is evaluated
            with tempfile.TemporaryFile(prefix="dml-checkpoint-") as f:  # on disk, not another model in memory
                trainer.save_state_dict(f, params)
                self.client.upload_checkpoint(self.peer_id, plan.job_id, plan.round, plan.epoch, dig, f)
        self.client.call(lambda: self.client.stub.ReportRound(req, timeout=CALL_TIMEOUT_S), "report round", give_up_s=60)
        log.debug("%s: train %.3fs exchange %.3fs report %.3fs", tag, t1 - t0, t2 - t1, time.monotonic() - t2)

    # -- gossip steps -------------------------------------------------------------------------
    def _close_channels(self) -> None:
        chans, self._channels = list(self._channels.values()), {}
        for ch in chans:
            ch.close()
        self._suspects.clear()

    def _channel(self, address: str) -> grpc.Channel:
        if address not in self._channels:
            self._channels[address] = rpc.channel(address, max_message_bytes=rpc.EXCHANGE_MESSAGE_BYTES)
        return self._channels[address]

    def _gossip_trainer(self, plan: types_pb2.Plan) -> Trainer:
        """The job's trainer (a new member starts from the seeded model, with weight 0, so its
        first exchange takes on its partner's parameters), attached to the gossip node."""
        spec = plan.spec
        trainer = self.store.trainer_for(plan.job_id)
        if trainer is None:
            self.gossip.detach()
            self._close_channels()
            trainer = Trainer(get_task(spec.task), spec.seed, spec.learning_rate, self.config.device)
            self.store.start(plan.job_id, trainer, None)
        self.gossip.attach(plan.job_id, trainer)
        return trainer

    def _gossip_exchange(self, plan: types_pb2.Plan) -> Outcome | None:
        """Averages with the first candidate partner that takes part; busy or failed ones are
        skipped (a failed one for a while). None when nobody could, or when a partner averaged
        with this peer while it trained: that was this step's exchange (as in AD-PSGD, every
        step averages once, and starting another would only collide with the partners' own)."""
        served = self.gossip.served
        if served != self._gossip_served_seen:
            self._gossip_served_seen = served
            return None
        spec = plan.spec
        ids = [m.peer_id for m in plan.members]
        address = {m.peer_id: m.address for m in plan.members}
        live = set(address.values())
        for addr in [a for a in self._channels if a not in live]:  # members that left
            self._channels.pop(addr).close()
        rng = np.random.default_rng([spec.seed, int.from_bytes(self.peer_id.encode()[-8:], "little"), plan.round])
        now = time.monotonic()
        timeout = (spec.gossip_timeout_ms or 10_000) / 1000.0
        for cand in partner_ids(spec.gossip_topology or "uniform", ids, self.peer_id, plan.round, rng):
            if self.stop_event.is_set():
                return None
            if self._suspects.get(cand, 0.0) > now:
                continue
            out = self.gossip.exchange(plan.job_id, cand, address[cand], timeout, self._channel(address[cand]))
            if out.ok:
                self._suspects.pop(cand, None)
                self._gossip_served_seen = self.gossip.served
                return out
            if not out.busy:
                log.info("peer %s job %s step %d: exchange with %s failed (%s); trying another partner",
                         self.peer_id, plan.job_id, plan.round, cand, out.detail)
                self._suspects[cand] = time.monotonic() + max(2 * timeout, 5.0)
            elif out.serving:
                return None  # we are being averaged right now: that is this step's exchange
        return None

    def _run_gossip_step(self, plan: types_pb2.Plan) -> types_pb2.Plan | None:
        """One gossip step: train on the step's samples, average with one partner, report.
        Returns the next plan when the report's answer carries one."""
        me = [i for i, m in enumerate(plan.members) if m.peer_id == self.peer_id]
        if not me:
            return None
        rank = me[0]
        tag = f"peer {self.peer_id} job {plan.job_id} gossip step {plan.round}"
        try:
            t0 = time.monotonic()
            trainer = self._gossip_trainer(plan)
            samples = self._samples(plan, rank)
            t_train = time.monotonic()
            res = trainer.train_on(samples, plan.spec.batch_size)
            t_done = time.monotonic()
            self._throttle(t_done - t_train)
            self.gossip.add_samples(res.samples)
            t1 = time.monotonic()
            self._gossip_exchange(plan)
            t2 = time.monotonic()
            sent = self.gossip.bytes_sent
            req = control_pb2.ReportRoundRequest(
                peer_id=self.peer_id, job_id=plan.job_id, round=plan.round, epoch=plan.epoch, samples=res.samples,
                train_loss=res.loss, train_ms=int((t1 - t0) * 1000), exchange_ms=int((t2 - t1) * 1000),
                train_samples_per_s=res.samples / (t1 - t_train) if res.samples and t1 > t_train else 0.0,  # throttle included
                bytes_sent=sent - self._gossip_bytes_reported)
            dist = self.gossip.last_distance
            if not math.isnan(dist):
                req.has_pair_distance, req.pair_distance = True, dist
            if plan.evaluate:  # about once per virtual round, whoever the coordinator asks
                t_eval = time.monotonic()
                with trainer.lock:  # a partner's averaging must not land mid-evaluation
                    acc, loss = trainer.evaluate()
                req.has_test_metrics, req.test_accuracy, req.test_loss = True, acc, loss
                req.eval_ms = int((time.monotonic() - t_eval) * 1000)
            resp = self.client.call(lambda: self.client.stub.ReportRound(req, timeout=CALL_TIMEOUT_S), "report step",
                                    give_up_s=60)
            self._gossip_bytes_reported = sent
            if plan.round % 100 == 0:
                slot = self.gossip.slot
                log.info("%s: exchanges applied %d, dropped %d, refused while busy %d, one-sided %d; weight %.0f",
                         tag, slot.commits, slot.aborts, slot.refusals, self.gossip.one_sided, self.gossip.weight)
            return resp.next if resp.has_next else None
        except Evicted:
            raise
        except Exception as e:
            if _superseded(e):
                log.info("%s: superseded (%s)", tag, e)
                return None
            log.exception("%s: local failure; leaving the job", tag)
            self._report_failure(plan, self.peer_id, f"local failure: {e!r}")
        return None
