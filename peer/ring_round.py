"""One ring round on a peer: settle the starting parameters (fetching them if this peer lacks
them), train, all-reduce with the ring over a :class:`PeerLink`, report; a failed exchange is
reported naming its suspect. The round's rules: docs/architecture.md, "A synchronous round"."""
from __future__ import annotations

import hashlib
import io
import logging
import math
import tempfile
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING

import grpc
import numpy as np
from dml.v1 import control_pb2, exchange_pb2, exchange_pb2_grpc, jobs_pb2, jobs_pb2_grpc, types_pb2

from dml.aggregation.allreduce import chunk_elems_for
from dml.aggregation.averaging import delta_ring_average, weighted_ring_average
from dml.aggregation.codecs import Codec, get_codec
from dml.aggregation.guard import GradientGuards, Poisoned, RingGuard, sum_squares
from dml.aggregation.transport import Cancelled, ExchangeError
from dml.common import rpc
from dml.common.spec import spec_from_pb
from dml.peer.taskload import make_trainer
from dml.peer import faults, outer, trainstate
from dml.peer.auth import FETCH_PARAMETERS
from dml.peer.client import Evicted
from dml.peer.gossip_step import GossipStep
from dml.peer.link import PeerLink
from dml.peer.params import Snapshot
from dml.peer.torchplane import PLANE as TORCH_PLANE, TorchLink
from dml.peer.take import start_workers
from dml.peer.step import NotFinite, check_own, report_failure, superseded, task_error_detail, train_and_report
from dml.peer.trainer import StepResult, TaskError, Trainer
from dml.peer.watch import SuccessorWatch
from dml.peer.workers import WorkersFailed

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
        self._paused = False  # tests only (faults.PAUSE): this process has stopped itself once

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

    def run(self, plan: types_pb2.Plan) -> types_pb2.Plan | None:
        """Runs round ``plan.round`` if this peer is in its ring; failures are reported, not raised
        (but :class:`Evicted` is). Returns the next plan when the report's answer carried one
        (this member's report committed the round), else None: the caller asks for it."""
        peer = self._peer
        me = [i for i, m in enumerate(plan.members) if m.peer_id == peer.peer_id]
        if not me:
            return None
        tag = f"peer {peer.peer_id} job {plan.job_id} round {plan.round} epoch {plan.epoch}"
        if not self._paused and faults.pause(peer.config.fault, plan.round, tag, log):
            self._paused = True  # once: a re-issued round after the test continues it runs
        self._abort.clear()
        self.under_way = (plan.job_id, plan.epoch)
        link: PeerLink | TorchLink = (self.torch_link(plan, me[0]) if plan.spec.data_plane == TORCH_PLANE
                                      else self._make_link(plan, me[0]))
        link.open_early()  # the stream to the successor is negotiated while we train
        resp: control_pb2.ReportRoundResponse | None = None
        try:
            resp = self._train_and_average(plan, me[0], tag, link)
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
        except WorkersFailed as e:
            log.error("%s: this host's workers failed (%s); reporting it and leaving the ring", tag, e)
            report_failure(peer, plan, peer.peer_id, f"local failure: the host's workers failed: {e}")
        except Exception as e:
            if superseded(e):
                log.info("%s: round superseded (%s)", tag, e)
                return None
            log.exception("%s: local failure; leaving the ring so the round can go on without us", tag)
            report_failure(peer, plan, peer.peer_id, f"local failure: {e!r}")
        finally:
            # Only now: closing our outgoing stream first would let our successor see it break
            # and blame us before our own report (naming the real culprit) reaches the coordinator.
            link.shutdown()
            peer.metrics.exchanged("ring", link.bytes_sent, link.bytes_received)
            if log.isEnabledFor(logging.DEBUG):  # which plane carried the round, and to where (benchmarks check it)
                succ = plan.members[(me[0] + 1) % len(plan.members)]
                sent, got = ((TORCH_PLANE, TORCH_PLANE) if isinstance(link, TorchLink)
                             else (getattr(link, "sender_kind", "") or "-", getattr(link, "receiver_kind", "") or "-"))
                log.debug("%s: data plane: sent %s to %s at %s, received %s", tag, sent, succ.peer_id, succ.address, got)
            self.under_way = ("", 0)
        return resp.next if resp is not None and resp.has_next else None

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
                        tls=peer.config.tls, chunk_elems=self._chunk(plan))

    def _chunk(self, plan: types_pb2.Plan) -> int:
        """Float32 elements per wire chunk for ``plan``: the peer's --chunk-elems, else the
        measured best for the job's data plane."""
        return self._peer.config.chunk_elems or chunk_elems_for(plan.spec.data_plane or "auto")

    def torch_link(self, plan: types_pb2.Plan, rank: int) -> TorchLink:
        """The round's link on the torch data plane (:mod:`peer.torchplane`): the epoch's process
        group, every wait bounded by the exchange timeout."""
        peer = self._peer
        return TorchLink(peer.torch, plan, rank, peer.config.exchange_timeout_s, self._abort,
                         skip=peer.config.injected_fault, hold=faults.holds(peer.config.fault, plan.round))

    # -- the starting point -------------------------------------------------------------------
    def _prepare(self, plan: types_pb2.Plan) -> Trainer:
        """Makes sure the trainer holds the parameters of round ``plan.round - 1``."""
        peer, store = self._peer, self._peer.store
        spec = plan.spec
        trainer = store.trainer_for(plan.job_id)
        if trainer is None:
            trainer = make_trainer(peer, plan.job_id, spec)
            init, state = trainer.params(), trainer.capture_state()
            store.start(plan.job_id, trainer, Snapshot(plan.job_id, 0, init, trainer.round_digest(init, state), state=state))
        start = plan.round - 1
        if spec.aggregation == "gossip":
            self._end_gossip(plan.job_id, start)
        got = store.begin(start, plan.start_digest)
        if got.dropped and self._residual is not None:
            self._residual[1].fill(0.0)  # its errors belong to a round that never counted
        in_place = got.in_place  # the trainer already holds the starting parameters
        state_in_place = got.promoted  # ... and the starting training state
        if not got.ready:
            self._fetch(plan, start, trainer)  # loads the parameters and the state it fetched
            in_place = state_in_place = True
        if not in_place and not store.restore_into(trainer):  # a copy on disk that read back wrong
            self._fetch(plan, start, trainer)
            state_in_place = True
        committed = store.committed
        assert committed is not None
        if not state_in_place and committed.state is not None:  # a re-issued round: from the committed state
            trainer.restore_state(committed.state)
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
        if rnd == 0 and not plan.start_digest:
            self._from_seed(plan, trainer)
            return
        if not self._from_members(plan, rnd, trainer) and not self._from_checkpoint(plan, rnd, trainer):
            raise ExchangeError(f"neither a member nor the coordinator could provide round {rnd} parameters")

    def _from_seed(self, plan: types_pb2.Plan, trainer: Trainer) -> None:
        """Round 0 is the seeded initial model, which this peer builds again rather than fetch
        (no one serves it once every peer has trained past it): the job was rolled back to it."""
        params = trainer.initial_params()
        trainer.reset_state()
        state = trainer.capture_state()
        digest = trainer.round_digest(params, state)
        self._peer.store.adopt(plan.job_id, 0, params, digest, state=state, got=digest)
        trainer.set_params(params)
        log.warning("peer %s job %s: the job went back to round 0; starting again from the seeded initial model",
                    self._peer.peer_id, plan.job_id)

    def _from_members(self, plan: types_pb2.Plan, rnd: int, trainer: Trainer) -> bool:
        """Takes round ``rnd``'s parameters and training state from the first live member that
        serves them, checked."""
        peer = self._peer
        sources = [(m.peer_id, m.address) for m in plan.members
                   if m.peer_id != peer.peer_id and not peer.config.injected_fault(m.address)]
        for name, address in sources:
            try:
                with rpc.channel(address, tls=peer.config.tls, max_message_bytes=rpc.EXCHANGE_MESSAGE_BYTES) as ch:
                    stub = exchange_pb2_grpc.PeerExchangeStub(ch)
                    md = peer.credentials.sign(FETCH_PARAMETERS, plan.job_id, plan.epoch, str(rnd), name)
                    req = exchange_pb2.FetchParametersRequest(job_id=plan.job_id, round=rnd, training_state=True)
                    parts = list(stub.FetchParameters(req, timeout=peer.config.exchange_timeout_s, metadata=md))
            except grpc.RpcError as e:
                log.info("peer %s: %s has no round %d parameters (%s)", peer.peer_id, name, rnd,
                         e.code() if isinstance(e, grpc.Call) else e)
                continue
            model = [p for p in parts if p.part == 0]
            state = [p for p in parts if p.part == 1]
            if not model or not state:
                log.warning("peer %s: %s sent no %s", peer.peer_id, name, "parameters" if not model else "training state")
                continue
            if acceptable(plan, rnd, model[0].round, model[0].digest) and self._adopt(
                    plan.job_id, rnd, trainer, model[0].digest, b"".join(p.data for p in model), name,
                    b"".join(p.data for p in state), state[0].digest):
                return True
        return False

    def _from_checkpoint(self, plan: types_pb2.Plan, rnd: int, trainer: Trainer) -> bool:
        """Takes round ``rnd`` from the coordinator's checkpoint: its training state (model,
        optimizer and the other parts), else, for a checkpoint that holds none, the model alone
        with the trainer's own state."""
        peer = self._peer
        stub = jobs_pb2_grpc.JobServiceStub(peer.client.channel)
        req = jobs_pb2.DownloadModelRequest(job_id=plan.job_id)
        try:
            chunks = list(stub.DownloadCheckpoint(req, timeout=peer.config.exchange_timeout_s))
            if chunks and chunks[0].round == rnd:
                data = b"".join(c.data for c in chunks)
                if hashlib.sha256(data).hexdigest() != chunks[0].digest:
                    log.warning("peer %s: the coordinator's training state of round %d fails its sha256 check",
                                peer.peer_id, rnd)
                else:
                    try:
                        _, doc = trainstate.load(data, trainer.state_parts)
                        params = trainer.params_from_state_dict(doc["model"])
                    except (ValueError, KeyError, TypeError) as e:
                        log.warning("peer %s: the coordinator's training state of round %d is unreadable: %s",
                                    peer.peer_id, rnd, e)
                    else:
                        state = {n: doc[n] for n in trainer.state_parts}
                        got = trainer.round_digest(params, state, like=plan.start_digest)
                        if acceptable(plan, rnd, rnd, got) and self._take(plan.job_id, rnd, trainer, params, state,
                                                                         got, got, "the coordinator's checkpoint"):
                            return True
        except grpc.RpcError as e:
            log.info("peer %s: no training state of round %d at the coordinator (%s)", peer.peer_id, rnd,
                     e.code() if isinstance(e, grpc.Call) else e)
        try:
            chunks = list(stub.DownloadModel(req, timeout=peer.config.exchange_timeout_s))
            if chunks and acceptable(plan, rnd, chunks[0].round, chunks[0].digest) and self._adopt(
                    plan.job_id, rnd, trainer, chunks[0].digest, b"".join(c.data for c in chunks), "the coordinator"):
                log.warning("peer %s job %s: round %d's checkpoint holds no training state; going on with this "
                            "peer's own", peer.peer_id, plan.job_id, rnd)
                return True
        except grpc.RpcError as e:
            log.info("peer %s: no checkpoint of round %d at the coordinator (%s)", peer.peer_id, rnd,
                     e.code() if isinstance(e, grpc.Call) else e)
        return False

    def _adopt(self, job_id: str, rnd: int, trainer: Trainer, want: str, data: bytes, source: str,
               state_data: bytes | None = None, state_sha256: str = "") -> bool:
        """Loads a downloaded state_dict (and training state, checked against its sha256) as
        round ``rnd``'s committed snapshot if the digest matches. Without a training state the
        trainer's own is kept."""
        import torch

        peer = self._peer
        try:
            sd = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
            params = trainer.params_from_state_dict(sd)
            if state_data is None:
                state = trainer.capture_state()
            elif hashlib.sha256(state_data).hexdigest() != state_sha256:
                raise ValueError("its training state fails its sha256 check")
            else:
                state, _ = trainstate.load(state_data, trainer.state_parts)
        except Exception as e:  # noqa: BLE001 - whatever the bytes are, they are not round rnd's parameters
            log.warning("peer %s: round %d parameters from %s are unreadable: %s", peer.peer_id, rnd, source, e)
            return False
        return self._take(job_id, rnd, trainer, params, state, want, trainer.round_digest(params, state, like=want), source)

    def _take(self, job_id: str, rnd: int, trainer: Trainer, params: np.ndarray, state: dict, want: str,
              got: str, source: str) -> bool:
        """Makes checked parameters and state round ``rnd``'s committed snapshot and loads them."""
        peer = self._peer
        # Checked before the trainer sees them: a failed download leaves its parameters alone.
        if not peer.store.adopt(job_id, rnd, params, want, state=state, got=got):
            log.warning("peer %s: round %d parameters from %s failed their digest check", peer.peer_id, rnd, source)
            return False
        try:
            trainer.restore_state(state)
        except ValueError as e:
            log.warning("peer %s: round %d training state from %s does not load: %s", peer.peer_id, rnd, source, e)
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

    def _average(self, plan: types_pb2.Plan, rank: int, buf: np.ndarray, samples: int,
                 link: PeerLink | TorchLink) -> None:
        """Averages ``buf`` (parameters, then the weight slot) with the other members."""
        if isinstance(link, TorchLink):  # one collective; the spec allows fp32 only on this plane
            link.average(buf, float(samples))
            return
        world = len(plan.members)
        codec = plan.spec.codec or "fp32"
        chunk = self._chunk(plan)
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
            delta_ring_average(buf[:-1], np.asarray(committed.params), samples / total, rank, world, link,
                               self.deadline_s, self._codec(codec), residual, chunk, guard=guard)
        except BaseException:
            residual.fill(0.0)  # half-updated: drop it rather than feed back a wrong correction
            raise

    def _synced(self, plan: types_pb2.Plan, rank: int, tag: str, link: PeerLink | TorchLink) -> Callable[[Trainer, np.ndarray], StepResult]:
        """``--sync grads``: how this member trains a round, one all-reduce of its gradient per
        step over ``link`` (:meth:`Trainer.train_synced`). Every member counts the same steps from
        the plan: as many as the largest allocation needs; a member whose samples ran out takes
        part in the rest with weight 0."""
        peer = self._peer
        world = len(plan.members)
        bs = plan.spec.batch_size
        chunk = self._chunk(plan)
        guards = GradientGuards(plan.members[(rank - 1) % world].peer_id, rank,
                                [sum(r.stop - r.start for r in m.samples) for m in plan.members], bs)
        steps = guards.steps

        parts = 1  # all-reduces per step (Trainer.sync_parts), set when the round trains
        own = [0.0, 0]  # this step's own gradient so far: sum of squares, elements

        def allreduce(buf: np.ndarray, samples: int, step: int, part: int) -> None:
            mine = buf[:-1]
            if part == 0:
                own[0], own[1] = 0.0, 0
            if step == 0 and part == 0 and faults.inject(peer.config.fault, plan.round, mine):
                log.warning("%s: test fault %s injected; skipping this member's own check", tag, peer.config.fault)
                scale = 0.0
            else:  # before anything leaves this member
                ss = sum_squares(mine)
                if not math.isfinite(ss):
                    raise NotFinite(f"round {plan.round} step {step}: own gradient not finite "
                                    f"({int(np.count_nonzero(~np.isfinite(mine)))} non-finite values)")
                own[0] += ss
                own[1] += mine.size
                scale = math.sqrt(own[0] / own[1]) if own[1] else 0.0  # over the step's parts so far
            if isinstance(link, TorchLink):
                link.average(buf, float(samples))
            else:
                weighted_ring_average(buf, float(samples), rank, world, link, self.deadline_s, chunk,
                                      guard=guards.for_step(step, scale, buf.size - 1),
                                      collective=step * parts + part, final=step == steps - 1 and part == parts - 1)
            if part == 0:
                guards.averaged(step, buf[:-1])

        def train(trainer: Trainer, samples: np.ndarray) -> StepResult:
            if steps == 0:
                raise ValueError("the plan allocates no samples: nothing to average")
            nonlocal parts
            parts = trainer.sync_parts
            return trainer.train_synced(samples, bs, steps, allreduce)

        return train

    def _train_and_average(self, plan: types_pb2.Plan, rank: int, tag: str,
                           link: PeerLink | TorchLink) -> control_pb2.ReportRoundResponse:
        peer = self._peer
        norm = 0.0
        grads = plan.spec.sync == "grads"

        def average(trainer: Trainer, samples: int) -> None:
            nonlocal norm
            if grads:  # the steps averaged the gradients; what is left is this member's own check
                committed = peer.store.committed
                assert committed is not None
                norm = check_own(trainer.params_view()[0], committed.params, f"round {plan.round}")
                return
            buf = trainer.exchange_buffer()  # the parameters (and with --optimizer-state average the state)
            committed = peer.store.committed
            assert committed is not None
            if faults.inject(peer.config.fault, plan.round, buf[:-1]):
                log.warning("%s: test fault %s injected; skipping this member's own check", tag, peer.config.fault)
            else:  # before anything leaves this member
                norm = check_own(buf[: trainer.numel], committed.params, f"round {plan.round}")
                if buf.size - 1 > trainer.numel:
                    check_own(buf[trainer.numel : -1], None, f"round {plan.round}'s optimizer state")
            self._average(plan, rank, buf, samples, link)  # closes the link when it succeeds
            step = trainer.state_parts.get(outer.PART)
            # Like the lossy codecs, the first round (no committed digest yet proves the members
            # start from the same parameters) takes the average itself.
            if step is not None and plan.start_digest:
                step.step(np.asarray(committed.params), buf[: trainer.numel])  # DiLoCo: the average becomes a pseudo-gradient
            trainer.load_exchange_buffer(buf)

        def results(trainer: Trainer, req: control_pb2.ReportRoundRequest) -> None:
            params, live = trainer.params_view()
            state = trainer.capture_state(peer.store.spare_state())  # a copy, into one no snapshot holds
            dig = trainer.round_digest(params, state)
            peer.store.set_tentative(Snapshot(plan.job_id, plan.round, params, dig, live=live, state=state))
            req.digest, req.bytes_sent, req.update_norm = dig, link.bytes_sent, norm
            if rank == 0 and plan.checkpoint:  # whether or not this round is evaluated
                # On disk, not another model in memory: the state_dict (dml model) and the whole
                # training state (dml checkpoint), uploaded together.
                with tempfile.TemporaryFile(prefix="dml-checkpoint-") as f, \
                        tempfile.TemporaryFile(prefix="dml-training-state-") as g:
                    trainer.save_state_dict(f, params)
                    sha = trainstate.save(g, state, shapes=trainer.averaged_shapes, job_id=plan.job_id,
                                          round=plan.round, model=trainer.model_state_dict(params),
                                          spec=spec_from_pb(plan.spec).to_dict())
                    peer.client.upload_checkpoint(peer.peer_id, plan.job_id, plan.round, plan.epoch, dig, f, g, sha)

        def on_workers(trainer: Trainer, samples: np.ndarray) -> StepResult:
            """A multi-worker host (peer.workers): its workers train the round."""
            if peer.workers.pool_for(plan.job_id, trainer) is None:  # a restored job's member never took it
                start_workers(peer, plan.job_id, plan.spec, trainer)
            return peer.workers.train(plan.job_id, trainer, samples, plan.spec.batch_size, plan.round,
                                      self.deadline_s, peer.stop_event)

        every = max(plan.spec.eval_every_rounds, 1)
        return train_and_report(peer, plan, rank, tag, "report round", prepare=lambda: self._prepare(plan),
                         train=self._synced(plan, rank, tag, link) if grads else on_workers if peer.workers.multi else None,
                         average=average, results=results,
                         evaluate=rank == 0 and (plan.round % every == 0 or plan.round >= plan.spec.rounds))
