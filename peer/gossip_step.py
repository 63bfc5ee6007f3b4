"""One gossip step on a peer: train on the step's samples, average with one partner through the
peer's :class:`GossipNode`, report; the report's answer carries the next step. The rules:
docs/architecture.md, "Gossip jobs"."""
from __future__ import annotations

import logging
import math
import time
from typing import TYPE_CHECKING

import grpc
import numpy as np
from dml.v1 import control_pb2, types_pb2

from dml.aggregation.topology import partner_ids
from dml.common import rpc
from dml.peer.taskload import make_trainer
from dml.peer import faults
from dml.peer.client import Evicted
from dml.peer.gossip import Outcome
from dml.peer.step import NotFinite, check_own, report_failure, superseded, task_error_detail, train_and_report
from dml.peer.trainer import TaskError, Trainer

if TYPE_CHECKING:
    from dml.peer.runner import Peer

log = logging.getLogger(__name__)


class GossipStep:
    """Runs a peer's gossip steps, keeping channels to its partners and which of them failed."""

    def __init__(self, peer: Peer) -> None:
        self._peer = peer
        self._channels: dict[str, grpc.Channel] = {}  # gossip partners' exchange servers, by address
        self._suspects: dict[str, float] = {}  # gossip partners that failed -> skip until (monotonic)
        self._failures: dict[str, int] = {}  # gossip partners -> failed exchanges in a row
        self._bytes_reported = 0
        self._served_seen = 0  # the node's `served` count when this peer last exchanged
        self._plan: types_pb2.Plan | None = None  # the step under way, for reports the partner side makes
        peer.gossip.on_poisoned = self._report_poisoned

    def _report_poisoned(self, job_id: str, sender: str, detail: str) -> None:
        """As a partner, this peer refused ``sender``'s offer: tells the coordinator (on the
        exchange server's thread, which the refused exchange holds anyway)."""
        plan = self._plan
        if plan is not None and plan.job_id == job_id and sender in {m.peer_id for m in plan.members}:
            report_failure(self._peer, plan, sender, detail, control_pb2.FAILURE_KIND_POISONED)

    def close_channels(self) -> None:
        """Closes the channels to partners and forgets which ones failed."""
        chans, self._channels = list(self._channels.values()), {}
        for ch in chans:
            ch.close()
        self._suspects.clear()
        self._failures.clear()

    def leave(self) -> None:
        """Stops gossiping: partners may no longer change this peer's parameters."""
        self._peer.gossip.detach()
        self.close_channels()

    def _channel(self, address: str) -> grpc.Channel:
        if address not in self._channels:
            self._channels[address] = rpc.channel(address, tls=self._peer.config.tls,
                                                  max_message_bytes=rpc.EXCHANGE_MESSAGE_BYTES)
        return self._channels[address]

    def _trainer(self, plan: types_pb2.Plan) -> Trainer:
        """The job's trainer (a new member starts from the seeded model, with weight 0, so its
        first exchange takes on its partner's parameters), attached to the gossip node."""
        peer, spec = self._peer, plan.spec
        trainer = peer.store.trainer_for(plan.job_id)
        if trainer is None:
            self.leave()
            trainer = make_trainer(peer, plan.job_id, spec)
            peer.store.start(plan.job_id, trainer, None)
        # The most weight an honest offer can carry: every sample the job can train, twice over.
        most = 2.0 * spec.rounds * max(len(plan.members), 1) * spec.local_steps * spec.batch_size
        peer.gossip.attach(plan.job_id, trainer, max_weight=most)
        return trainer

    def _exchange(self, plan: types_pb2.Plan) -> Outcome | None:
        """Averages with the first candidate partner that takes part; busy or failed ones are
        skipped (a failed one for a while). None when nobody could, or when a partner averaged
        with this peer while it trained: that was this step's exchange (as in AD-PSGD, every
        step averages once, and starting another would only collide with the partners' own)."""
        peer, node = self._peer, self._peer.gossip
        served = node.served
        if served != self._served_seen:
            self._served_seen = served
            return None
        spec = plan.spec
        ids = [m.peer_id for m in plan.members]
        address = {m.peer_id: m.address for m in plan.members}
        live = set(address.values())
        for addr in [a for a in self._channels if a not in live]:  # members that left
            self._channels.pop(addr).close()
        rng = np.random.default_rng([spec.seed, int.from_bytes(peer.peer_id.encode()[-8:], "little"), plan.round])
        now = time.monotonic()
        timeout = (spec.gossip_timeout_ms or 10_000) / 1000.0
        for cand in partner_ids(spec.gossip_topology or "uniform", ids, peer.peer_id, plan.round, rng):
            if peer.stop_event.is_set():
                return None
            if self._suspects.get(cand, 0.0) > now:
                continue
            fault = peer.config.injected_fault(address[cand])
            if fault:
                out = Outcome(cand, False, detail=fault)
            else:
                out = node.exchange(plan.job_id, cand, address[cand], timeout, self._channel(address[cand]),
                                    epoch=plan.epoch)
            if out.poisoned:
                report_failure(peer, plan, cand, out.detail, control_pb2.FAILURE_KIND_POISONED)
            if out.ok:
                self._suspects.pop(cand, None)
                self._failures.pop(cand, None)
                self._served_seen = node.served
                return out
            if not out.busy:
                # Partner choice avoids a broken link: each failure in a row skips the partner
                # twice as long (from twice the exchange timeout, at least 5 s, up to 64 times that).
                n = self._failures[cand] = self._failures.get(cand, 0) + 1
                skip = max(2 * timeout, 5.0) * 2 ** min(n - 1, 6)
                log.info("peer %s job %s step %d: exchange with %s failed (%s); trying another partner, and not "
                         "this one for %.0fs", peer.peer_id, plan.job_id, plan.round, cand, out.detail, skip)
                self._suspects[cand] = time.monotonic() + skip
            elif out.serving:
                return None  # we are being averaged right now: that is this step's exchange
        return None

    def run(self, plan: types_pb2.Plan) -> types_pb2.Plan | None:
        """One gossip step: train on the step's samples, average with one partner, report.
        Returns the next plan when the report's answer carries one."""
        peer, node = self._peer, self._peer.gossip
        me = [i for i, m in enumerate(plan.members) if m.peer_id == peer.peer_id]
        if not me:
            return None
        rank = me[0]
        tag = f"peer {peer.peer_id} job {plan.job_id} gossip step {plan.round}"
        sent = 0
        self._plan = plan

        def average(trainer: Trainer, samples: int) -> Outcome | None:
            buf = trainer.host_buffer()
            params = buf[: trainer.numel]
            if faults.inject(peer.config.fault, plan.round, params):
                log.warning("%s: test fault %s injected; skipping this member's own check", tag, peer.config.fault)
                trainer.load_host_buffer(buf)  # a no-op on CPU, where buf is the live buffer
            else:  # gossip sends whole parameters: they must be finite before they leave
                check_own(params, None, f"gossip step {plan.round}")
            return self._exchange(plan)

        def results(trainer: Trainer, req: control_pb2.ReportRoundRequest) -> None:
            nonlocal sent
            sent = node.bytes_sent
            req.bytes_sent = sent - self._bytes_reported
            dist = node.last_distance
            if not math.isnan(dist):
                req.has_pair_distance, req.pair_distance = True, dist

        try:
            resp = train_and_report(peer, plan, rank, tag, "report step", prepare=lambda: self._trainer(plan),
                                    trained=node.add_samples, average=average,
                                    results=results, evaluate=plan.evaluate)  # about once per virtual round
            self._bytes_reported = sent
            if plan.round % 100 == 0:
                slot = node.slot
                log.info("%s: exchanges applied %d, dropped %d, refused while busy %d, one-sided %d; weight %.0f",
                         tag, slot.commits, slot.aborts, slot.refusals, node.one_sided, node.weight)
            return resp.next if resp.has_next else None
        except Evicted:
            raise
        except TaskError as e:
            log.error("%s: the task failed: %s", tag, e)
            report_failure(peer, plan, peer.peer_id, task_error_detail(e), control_pb2.FAILURE_KIND_TASK)
        except NotFinite as e:
            log.error("%s: %s; not exchanging, and reporting it", tag, e)
            report_failure(peer, plan, peer.peer_id, str(e), control_pb2.FAILURE_KIND_POISONED)
        except Exception as e:
            if superseded(e):
                log.info("%s: superseded (%s)", tag, e)
                return None
            log.exception("%s: local failure; leaving the job", tag)
            report_failure(peer, plan, peer.peer_id, f"local failure: {e!r}")
        return None
