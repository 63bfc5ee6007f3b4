"""Many-peer gossip in one process: the real exchange code over an in-memory transport.

Each simulated peer is a flat float32 buffer, a weight and an :class:`~aggregation.gossip.Exchanger`.
:class:`InMemoryGossipNet` carries :class:`~aggregation.gossip.Snapshot` copies between them
(copying, like a wire) and refuses to reach dead peers; faults are injected by subclassing it.
:func:`open_exchange` and :func:`run_exchange` drive one two-phase exchange exactly as a networked
peer would (take both slots, stage both copies, then commit both; abort both on failure).

:func:`simulate` is deterministic given its seed. A gossip step is one synchronous tick in which
exchanges run concurrently: first every live peer, in a random order from the seeded generator,
asks the candidates :func:`~aggregation.topology.partners` gives it until one accepts (a peer whose
slot is already taken this step refuses and is skipped, a dead one is unreachable and skipped),
so within a step a peer takes part in at most one exchange; then every matched pair exchanges.
Optionally every live peer first takes a gradient step on its own quadratic
``f_i(x) = 0.5 ||x - c_i||^2`` (decentralized SGD); with ``lr = 0`` it is pure averaging.
"""
from __future__ import annotations

import enum
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import numpy as np

from dml.aggregation.gossip import Exchanger, Snapshot, consensus_distance, snapshot
from dml.aggregation.topology import Topology, parse_topology, partners
from dml.aggregation.transport import ExchangeError


@dataclass
class SimPeer:
    """One simulated peer: its parameters, its weight and its exchange slot."""

    index: int
    params: np.ndarray
    weight: float
    exchanger: Exchanger
    target: np.ndarray | None = None  # c_i of its quadratic objective, when it trains


class Opened(enum.Enum):
    """How an attempt to open an exchange ended."""

    OPENED = "opened"
    BUSY = "busy"  # the partner (or the initiator itself) was in another exchange
    UNREACHABLE = "unreachable"  # the partner is dead or the request was lost


class InMemoryGossipNet:
    """The in-memory transport between simulated peers; ``dead`` peers cannot be reached.

    Subclass and override :meth:`reach` or :meth:`send` to inject faults (raise ExchangeError).
    """

    def __init__(self, peers: Sequence[SimPeer], dead: Iterable[int] = ()) -> None:
        self.peers = list(peers)
        self.dead = set(dead)
        self.sent_bytes = 0

    def reach(self, src: int, dst: int) -> None:
        """Delivers ``src``'s exchange request to ``dst``; ExchangeError if ``dst`` is dead."""
        if dst in self.dead:
            raise ExchangeError(f"peer {dst} unreachable from {src}", suspect=str(dst))

    def send(self, src: int, dst: int) -> Snapshot:
        """A copy of ``src``'s parameters and weight as ``dst`` receives it."""
        for p in (src, dst):
            if p in self.dead:
                raise ExchangeError(f"peer {p} died during an exchange {src} -> {dst}", suspect=str(p))
        peer = self.peers[src]
        snap = snapshot(peer.params, peer.weight)
        self.sent_bytes += snap.params.nbytes + 8
        return snap


def open_exchange(net: InMemoryGossipNet, a: SimPeer, b: SimPeer) -> Opened:
    """``a`` asks ``b`` for an exchange: takes ``a``'s slot, then ``b``'s, or neither."""
    if not a.exchanger.try_begin(b.index):
        return Opened.BUSY
    try:
        net.reach(a.index, b.index)
    except ExchangeError:
        a.exchanger.abort(b.index)
        return Opened.UNREACHABLE
    if not b.exchanger.try_begin(a.index):
        a.exchanger.abort(b.index)
        return Opened.BUSY
    return Opened.OPENED


def run_exchange(net: InMemoryGossipNet, a: SimPeer, b: SimPeer) -> bool:
    """Runs an opened exchange two-phase; True if both sides applied it, False if neither did.

    Phase 1 sends each side's copy to the other and stages it; a failure there (ExchangeError)
    aborts both sides, leaving both buffers and weights as they were. Phase 2 commits both.
    """
    try:
        b.exchanger.stage(a.index, net.send(a.index, b.index))
        a.exchanger.stage(b.index, net.send(b.index, a.index))
    except ExchangeError:
        a.exchanger.abort(b.index)
        b.exchanger.abort(a.index)
        return False
    a.weight = a.exchanger.commit(b.index, a.params, a.weight)
    b.weight = b.exchanger.commit(a.index, b.params, b.weight)
    return True


@dataclass
class StepStats:
    """What happened in one gossip step."""

    exchanges: int = 0  # applied by both sides
    failed: int = 0  # opened, then aborted by both sides
    busy: int = 0  # requests refused because a slot was taken
    unreachable: int = 0  # requests to dead peers
    idle: int = 0  # live peers in no exchange this step


def gossip_step(
    net: InMemoryGossipNet, topology: str | Topology, step: int, rng: np.random.Generator, shuffle: bool = False,
) -> StepStats:
    """One synchronous gossip step over ``net``'s peers: match in a seeded random order, then exchange."""
    t = parse_topology(topology)
    n = len(net.peers)
    stats = StepStats()
    pairs: list[tuple[SimPeer, SimPeer]] = []
    for i in rng.permutation(n):
        a = net.peers[int(i)]
        if a.index in net.dead or a.exchanger.busy:
            continue
        for j in partners(t, a.index, n, step, rng, shuffle):
            opened = open_exchange(net, a, net.peers[j])
            if opened is Opened.OPENED:
                pairs.append((a, net.peers[j]))
                break
            if opened is Opened.BUSY:
                stats.busy += 1
            else:
                stats.unreachable += 1
    for a, b in pairs:
        if run_exchange(net, a, b):
            stats.exchanges += 1
        else:
            stats.failed += 1
    stats.idle = n - len(net.dead) - 2 * stats.exchanges
    return stats


@dataclass
class SimResult:
    """A simulation's record: ``distances[t]`` is the consensus distance after ``t`` steps."""

    topology: str
    peers: list[SimPeer]
    dead: set[int]
    distances: list[float] = field(default_factory=list)
    steps: list[StepStats] = field(default_factory=list)
    optimum_distances: list[float] = field(default_factory=list)  # only when training (lr > 0)

    def live_params(self) -> list[np.ndarray]:
        """The live peers' parameter buffers."""
        return [p.params for p in self.peers if p.index not in self.dead]


def simulate(
    peers: int, steps: int, topology: str | Topology, dim: int, seed: int, lr: float = 0.0,
    weights: Sequence[float] | None = None, dead: Iterable[int] = (), shuffle: bool = False,
    net_cls: type[InMemoryGossipNet] = InMemoryGossipNet,
) -> SimResult:
    """Runs ``steps`` gossip steps of ``peers`` simulated peers with ``dim`` parameters each.

    Peer i starts from a standard normal float32 vector; with ``lr > 0`` it also has a standard
    normal target ``c_i`` and takes the step ``x -= lr * (x - c_i)`` before each exchange.
    ``weights`` (default all 1) are the peers' starting weights. ``dead`` peers never answer nor
    initiate and are left out of the distance. The starting vectors depend on ``seed``, ``peers``
    and ``dim`` only, so topologies compared at one seed start from the same point.
    Raises ValueError for bad arguments.
    """
    t = parse_topology(topology)
    if peers < 2:
        raise ValueError(f"need at least 2 peers, got {peers}")
    if steps < 0 or dim < 1:
        raise ValueError(f"need steps >= 0 and dim >= 1, got steps={steps} dim={dim}")
    if not math.isfinite(lr) or not 0 <= lr <= 1:
        raise ValueError(f"lr must be in [0, 1], got {lr}")
    dead_set = set(dead)
    if not dead_set <= set(range(peers)) or len(dead_set) > peers - 2:
        raise ValueError(f"dead peers must be indices in [0, {peers}) leaving at least 2 alive")
    if weights is not None and len(weights) != peers:
        raise ValueError(f"need {peers} weights, got {len(weights)}")
    init_seq, target_seq, step_seq = np.random.SeedSequence(seed).spawn(3)
    start = np.random.default_rng(init_seq).standard_normal((peers, dim)).astype(np.float32)
    targets = np.random.default_rng(target_seq).standard_normal((peers, dim)).astype(np.float32)
    rng = np.random.default_rng(step_seq)
    sim_peers = [
        SimPeer(i, start[i].copy(), float(weights[i]) if weights is not None else 1.0, Exchanger(i),
                targets[i].copy() if lr > 0 else None)
        for i in range(peers)
    ]
    net = net_cls(sim_peers, dead_set)
    result = SimResult(t.value, sim_peers, dead_set)
    live = [p for p in sim_peers if p.index not in dead_set]
    optimum = np.mean([p.target for p in live if p.target is not None], axis=0, dtype=np.float64) if lr > 0 else None

    def record() -> None:
        result.distances.append(consensus_distance([p.params for p in live]))
        if optimum is not None:
            result.optimum_distances.append(
                math.sqrt(float(np.mean([np.sum((p.params - optimum) ** 2) for p in live]))))

    record()
    lr32 = np.float32(lr)
    for step in range(steps):
        if lr > 0:
            for p in live:
                assert p.target is not None
                p.params -= lr32 * (p.params - p.target)
        result.steps.append(gossip_step(net, t, step, rng, shuffle))
        record()
    return result


def fit_rate(distances: Sequence[float], floor: float = 1e-6) -> tuple[float, float]:
    """Fitted geometric rate per step and the fit's R^2: least squares of ``log d_t`` on ``t``.

    Uses the steps from 0 while ``d_t > floor * d_0`` (float32 rounding stops the fall near
    1e-7 of the start, so points under the floor would flatten the fit). Returns
    ``(exp(slope), r_squared)``; a rate of 0.5 halves the distance every step. Raises ValueError
    if ``d_0 <= 0`` or fewer than 3 points are above the floor.
    """
    if len(distances) == 0 or not distances[0] > 0:
        raise ValueError("need a positive starting distance")
    d = np.asarray(distances, dtype=np.float64)
    above = d > floor * d[0]
    n = int(np.argmin(above)) if not above.all() else len(d)
    if n < 3:
        raise ValueError(f"only {n} points above {floor} of the start: too few to fit")
    x = np.arange(n, dtype=np.float64)
    y = np.log(d[:n])
    slope, intercept = np.polyfit(x, y, 1)
    resid = y - (slope * x + intercept)
    ss_tot = float(np.sum((y - y.mean()) ** 2))
    r2 = 1.0 - float(np.sum(resid**2)) / ss_tot if ss_tot > 0 else 1.0
    return math.exp(slope), r2


def steps_to(distances: Sequence[float], fraction: float) -> int | None:
    """The first step ``t`` with ``d_t <= fraction * d_0``, or None if it never gets there."""
    if len(distances) == 0:
        raise ValueError("no distances")
    goal = fraction * distances[0]
    for t, d in enumerate(distances):
        if d <= goal:
            return t
    return None
