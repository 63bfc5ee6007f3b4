"""One ring round on a peer: settle the starting parameters (fetching them if this peer lacks
them), train, all-reduce with the ring over a :class:`PeerLink`, report; a failed exchange is
reported naming its suspect. The round's rules: docs/architecture.md, "A synchronous round"."""
from __future__ import annotations

import io
import logging
import tempfile
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING

import grpc
import numpy as np
from dml.v1 import control_pb2, exchange_pb2, exchange_pb2_grpc, jobs_pb2, jobs_pb2_grpc, types_pb2

from dml.aggregation.allreduce import chunk_elems_for
from dml.aggregation.averaging import delta_ring_average, digest, weighted_ring_average
from dml.aggregation.codecs import Codec, get_codec
from dml.aggregation.guard import Poisoned, RingGuard
from dml.aggregation.transport import Cancelled, ExchangeError
from dml.common import rpc
from dml.peer.taskload import make_trainer
from dml.peer import faults
from dml.peer.auth import FETCH_PARAMETERS
from dml.peer.client import Evicted
from dml.peer.gossip_step import GossipStep
from dml.peer.link import PeerLink
from dml.peer.params import Snapshot
from dml.peer.step import NotFinite, check_own, report_failure, superseded, task_error_detail, train_and_report
from dml.peer.trainer import TaskError, Trainer
from dml.peer.watch import SuccessorWatch

if TYPE_CHECKING:
    from dml.peer.runner import Peer

log = logging.getLogger(__name__)

# The guard's floors (aggregation.guard), per unit of weight: fp32 sends parameters times the
# member's samples, so its floor is a parameter RMS; lossy codecs send the update times the
# member's share, so theirs is an update RMS.
FP32_FLOOR = 1e-3
DELTA_FLOOR = 1e-4


def acceptable(plan: types_pb2.Plan, rnd: int, got_round: int, got_digest: str) -> bool:
    """Whether downloaded parameters that claim (``got_round``, ``got_digest``) may stand for
    round ``rnd`` of ``plan``: the round must match, and so must the plan's ``start_digest``
    (the committed digest every member reported). Only a plan naming none (a gossip job's
    closing round, whose members start from their own parameters) takes the claimed digest;
    either way :meth:`RingRound._adopt` then checks the bytes hash to it."""
    return got_round == rnd and bool(got_digest) and plan.start_digest in ("", got_digest)


class RingRound:
    """Runs a peer's ring rounds. ``abort`` is set (by the peer's heartbeat or stop) when the
    round under way is cancelled; ``make_link`` builds each round's link (the peer's seam for
    fault-injection tests, :meth:`link` unless overridden); ``gossip`` is left when a gossip
    job's closing ring round starts."""

    def __init__(self, peer: Peer, abort: threading.Event, make_link: Callable[[types_pb2.Plan, int], PeerLink],
                 gossip: GossipStep) -> None:
        self._peer = peer
        self._abort = abort
        self._make_link = make_link
        self._gossip = gossip
        self.under_way: tuple[str, int] = ("", 0)  # (job, epoch) of the exchange under way
        self.deadline_s = 120.0  # the coordinator's round deadline (set at registration)
        self._residual: tuple[str, np.ndarray] | None = None  # (job, error-feedback residual)
        self._codecs: dict[str, Codec] = {}
        self.watch: SuccessorWatch | None = None  # the successor, from our all-reduce to our next plan

    def forget(self) -> None:
        """Drops what rounds carry over (the error-feedback residual, the watch): the peer starts clean."""
        self._residual = None
        self.unwatch()

    def unwatch(self) -> None:
        """Ends the watch on the last round's successor (a new plan came, or the peer stops)."""
        watch, self.watch = self.watch, None
        if watch is not None:
            watch.close()

    def _keep_watch(self, plan: types_pb2.Plan, watch: SuccessorWatch) -> None:
        """Keeps watching the successor after this member's all-reduce, until the next plan
        (:mod:`peer.watch`): killed before its report, it would otherwise be noticed only by
        its lease."""
        peer = self._peer
        tag = f"peer {peer.peer_id} job {plan.job_id} round {plan.round} epoch {plan.epoch}"

        def report(lost: str) -> None:
            if peer.stop_event.is_set():
                return
            log.warning("%s: after the all-reduce, %s", tag, lost)
            report_failure(peer, plan, watch.succ_id, f"after the all-reduce, {lost}")

        self.unwatch()
        self.watch = watch
        watch.on_lost(report)

    def run(self, plan: types_pb2.Plan) -> None:
        """Runs round ``plan.round`` if this peer is in its ring; failures are reported, not raised
        (but :class:`Evicted` is)."""
        peer = self._peer
        me = [i for i, m in enumerate(plan.members) if m.peer_id == peer.peer_id]
        if not me:
            return
        tag = f"peer {peer.peer_id} job {plan.job_id} round {plan.round} epoch {plan.epoch}"
        self._abort.clear()
        self.under_way = (plan.job_id, plan.epoch)
        link = self._make_link(plan, me[0])
        link.open_early()  # the stream to the successor is negotiated while we train
        try:
            self._train_and_average(plan, me[0], tag, link)
        except TaskError as e:
            log.error("%s: the task failed: %s", tag, e)
            report_failure(peer, plan, peer.peer_id, task_error_detail(e), control_pb2.FAILURE_KIND_TASK)
        except NotFinite as e:
            log.error("%s: %s; not exchanging, and reporting it", tag, e)
            report_failure(peer, plan, peer.peer_id, str(e), control_pb2.FAILURE_KIND_POISONED)
        except Poisoned as e:
            log.error("%s: %s; not forwarding it, and reporting %s", tag, e, e.suspect)
            if not self._abort.is_set():
                report_failure(peer, plan, e.suspect, str(e), control_pb2.FAILURE_KIND_POISONED)
        except Cancelled as e:  # cancelled or superseded on our side: the coordinator has moved on
            log.info("%s: exchange cancelled: %s", tag, e)
        except ExchangeError as e:
            log.warning("%s: exchange failed: %s", tag, e)
            if not self._abort.is_set():  # an abort means the coordinator already moved on
                report_failure(peer, plan, e.suspect, str(e))
        except Evicted:
            raise
        except Exception as e:
            if superseded(e):
                log.info("%s: round superseded (%s)", tag, e)
                return
            log.exception("%s: local failure; leaving the ring so the round can go on without us", tag)
            report_failure(peer, plan, peer.peer_id, f"local failure: {e!r}")
        finally:
            # Only now: closing our outgoing stream first would let our successor see it break
            # and blame us before our own report (naming the real culprit) reaches the coordinator.
            link.shutdown()
            peer.metrics.exchanged("ring", link.bytes_sent, link.bytes_received)
            self.under_way = ("", 0)

    def link(self, plan: types_pb2.Plan, rank: int) -> PeerLink:
        """The ring link for this round."""
        peer = self._peer
        world = len(plan.members)
        succ = plan.members[(rank + 1) % world]
        trainer = peer.store.trainer_for(plan.job_id)
        return PeerLink(peer.servicer, (plan.job_id, plan.round, plan.epoch), peer.peer_id,
                        plan.members[(rank - 1) % world].peer_id, succ.peer_id, succ.address,
                        self.deadline_s, self._abort, idle_timeout_s=peer.config.exchange_timeout_s,
                        data_plane=plan.spec.data_plane or "auto",
                        payload_bytes=4 * trainer.numel if trainer is not None else 0,
                        keep_watch=lambda watch: self._keep_watch(plan, watch),
                        injected_fault=peer.config.injected_fault(succ.address), credentials=peer.credentials,
                        tls=peer.config.tls)

    # -- the starting point -------------------------------------------------------------------
    def _prepare(self, plan: types_pb2.Plan) -> Trainer:
        """Makes sure the trainer holds the parameters of round ``plan.round - 1``."""
        peer, store = self._peer, self._peer.store
        spec = plan.spec
        trainer = store.trainer_for(plan.job_id)
        if trainer is None:
            trainer = make_trainer(peer, plan.job_id, spec)
            init = trainer.params()
            store.start(plan.job_id, trainer, Snapshot(plan.job_id, 0, init, digest(init)))
        start = plan.round - 1
        if spec.aggregation == "gossip":
            self._end_gossip(plan.job_id, start)
        got = store.begin(start, plan.start_digest)
        if got.dropped and self._residual is not None:
            self._residual[1].fill(0.0)  # its errors belong to a round that never counted
        in_place = got.in_place  # the trainer already holds the starting parameters
        if not got.ready:
            self._fetch(plan, start, trainer)
            in_place = False
        committed = store.committed
        assert committed is not None
        if not in_place:
            trainer.set_params(committed.params)
        return trainer

    def _end_gossip(self, job_id: str, rnd: int) -> None:
        """A gossip job's closing ring round: partners may no longer change the parameters, and
        this peer's own (gossiped) parameters become the round's starting point, kept so a
        re-issued round starts from them again."""
        self._gossip.leave()
        self._peer.store.keep_own(job_id, rnd)

    def _fetch(self, plan: types_pb2.Plan, rnd: int, trainer: Trainer) -> None:
        """Pulls round ``rnd``'s parameters (a joiner catching up): from a live member, else from
        the coordinator's checkpoint when it is of that round. Each download is digest-checked."""
        peer = self._peer
        sources = [(m.peer_id, m.address) for m in plan.members
                   if m.peer_id != peer.peer_id and not peer.config.injected_fault(m.address)]
        for name, address in sources:
            try:
                with rpc.channel(address, tls=peer.config.tls, max_message_bytes=rpc.EXCHANGE_MESSAGE_BYTES) as ch:
                    stub = exchange_pb2_grpc.PeerExchangeStub(ch)
                    md = peer.credentials.sign(FETCH_PARAMETERS, plan.job_id, plan.epoch, str(rnd), name)
                    parts = list(stub.FetchParameters(exchange_pb2.FetchParametersRequest(job_id=plan.job_id, round=rnd),
                                                      timeout=peer.config.exchange_timeout_s, metadata=md))
            except grpc.RpcError as e:
                log.info("peer %s: %s has no round %d parameters (%s)", peer.peer_id, name, rnd,
                         e.code() if isinstance(e, grpc.Call) else e)
                continue
            if parts and acceptable(plan, rnd, parts[0].round, parts[0].digest) and self._adopt(
                    plan.job_id, rnd, trainer, parts[0].digest, b"".join(p.data for p in parts), name):
                return
        try:
            stub = jobs_pb2_grpc.JobServiceStub(peer.client.channel)
            chunks = list(stub.DownloadModel(jobs_pb2.DownloadModelRequest(job_id=plan.job_id),
                                             timeout=peer.config.exchange_timeout_s))
            if chunks and acceptable(plan, rnd, chunks[0].round, chunks[0].digest) and self._adopt(
                    plan.job_id, rnd, trainer, chunks[0].digest, b"".join(c.data for c in chunks), "the coordinator"):
                return
        except grpc.RpcError as e:
            log.info("peer %s: no checkpoint of round %d at the coordinator (%s)", peer.peer_id, rnd,
                     e.code() if isinstance(e, grpc.Call) else e)
        raise ExchangeError(f"neither a member nor the coordinator could provide round {rnd} parameters")

    def _adopt(self, job_id: str, rnd: int, trainer: Trainer, want: str, data: bytes, source: str) -> bool:
        """Loads a downloaded state_dict as round ``rnd``'s committed parameters if its digest matches."""
        import torch

        peer = self._peer
        try:
            sd = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
            params = trainer.params_from_state_dict(sd)
        except Exception as e:  # noqa: BLE001 - whatever the bytes are, they are not round rnd's parameters
            log.warning("peer %s: round %d parameters from %s are unreadable: %s", peer.peer_id, rnd, source, e)
            return False
        # Checked before the trainer sees them: a failed download leaves its parameters alone.
        if not peer.store.adopt(job_id, rnd, params, want):
            log.warning("peer %s: round %d parameters from %s failed their digest check", peer.peer_id, rnd, source)
            return False
        trainer.set_params(params)
        log.info("peer %s job %s: caught up to round %d from %s", peer.peer_id, job_id, rnd, source)
        return True

    # -- the all-reduce -----------------------------------------------------------------------
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
        chunk = self._peer.config.chunk_elems or chunk_elems_for(plan.spec.data_plane or "auto")
        weights = [float(sum(r.stop - r.start for r in m.samples)) for m in plan.members]
        pred = plan.members[(rank - 1) % world].peer_id
        # Lossy codecs send changes against a base every member must hold bit for bit: the
        # committed round, whose digest the plan carries. Before the first commit there is no
        # such proof (inits agree only as far as seeding does), so that round averages exactly.
        if codec == "fp32" or not plan.start_digest:
            guard = RingGuard(pred, rank, weights, FP32_FLOOR, weight_index=buf.size - 1, max_weight=sum(weights))
            weighted_ring_average(buf, float(samples), rank, world, link, self.deadline_s, chunk, guard=guard)
            return
        total = sum(weights)
        if total <= 0:
            raise ValueError("the plan allocates no samples: nothing to average")
        guard = RingGuard(pred, rank, [w / total for w in weights], DELTA_FLOOR)
        committed = self._peer.store.committed
        assert committed is not None
        residual = self._residual_for(plan.job_id, buf.size - 1)
        try:
            delta_ring_average(buf[:-1], committed.params, samples / total, rank, world, link,
                               self.deadline_s, self._codec(codec), residual, chunk, guard=guard)
        except BaseException:
            residual.fill(0.0)  # half-updated: drop it rather than feed back a wrong correction
            raise

    def _train_and_average(self, plan: types_pb2.Plan, rank: int, tag: str, link: PeerLink) -> None:
        peer = self._peer
        norm = 0.0

        def average(trainer: Trainer, samples: int) -> None:
            nonlocal norm
            buf = trainer.host_buffer()
            committed = peer.store.committed
            assert committed is not None
            if faults.inject(peer.config.fault, plan.round, buf[:-1]):
                log.warning("%s: test fault %s injected; skipping this member's own check", tag, peer.config.fault)
            else:  # before anything leaves this member
                norm = check_own(buf[:-1], committed.params, f"round {plan.round}")
            self._average(plan, rank, buf, samples, link)  # closes the link when it succeeds
            trainer.load_host_buffer(buf)

        def results(trainer: Trainer, req: control_pb2.ReportRoundRequest) -> None:
            params, live = trainer.params_view()
            dig = digest(params)
            peer.store.set_tentative(Snapshot(plan.job_id, plan.round, params, dig, live=live))
            req.digest, req.bytes_sent, req.update_norm = dig, link.bytes_sent, norm
            if rank == 0 and plan.checkpoint:  # whether or not this round is evaluated
                with tempfile.TemporaryFile(prefix="dml-checkpoint-") as f:  # on disk, not another model in memory
                    trainer.save_state_dict(f, params)
                    peer.client.upload_checkpoint(peer.peer_id, plan.job_id, plan.round, plan.epoch, dig, f)

        every = max(plan.spec.eval_every_rounds, 1)
        train_and_report(peer, plan, rank, tag, "report round", prepare=lambda: self._prepare(plan),
                         average=average, results=results,
                         evaluate=rank == 0 and (plan.round % every == 0 or plan.round >= plan.spec.rounds))
