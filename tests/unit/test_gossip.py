"""Gossip: partner choice, pairwise averaging, the exchange slot, and the many-peer simulation.

No sockets: simulated peers exchange over ``InMemoryGossipNet``; faults are injected by
subclassing it. Threads are joined with a timeout, so a hang fails the test instead of stalling it.
"""
from __future__ import annotations

import importlib.util
import itertools
import math
import pathlib
import threading
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dml.aggregation import topology as topo
from dml.aggregation.gossip import (
    SCRATCH_ELEMS,
    Exchanger,
    ExchangeStateError,
    Snapshot,
    consensus_distance,
    merged_weight,
    pair_average,
    pair_weights,
    snapshot,
)
from dml.aggregation.gossip_sim import (
    InMemoryGossipNet,
    Opened,
    SimPeer,
    fit_rate,
    gossip_step,
    open_exchange,
    run_exchange,
    simulate,
    steps_to,
)
from dml.aggregation.transport import ExchangeError

ROOT = pathlib.Path(__file__).resolve().parents[2]
JOIN_S = 20.0
TOPOLOGIES = ["uniform", "ring", "exponential"]
weights_st = st.one_of(st.integers(0, 10_000).map(float), st.floats(1e-3, 1e6, allow_nan=False))


def both_sides(a: np.ndarray, b: np.ndarray, wa: float, wb: float) -> tuple[np.ndarray, np.ndarray]:
    """What A and B each end with after averaging with the other's copy."""
    mine_a, mine_b = a.copy(), b.copy()
    pair_average(mine_a, b.copy(), wa, wb)
    pair_average(mine_b, a.copy(), wb, wa)
    return mine_a, mine_b


def make_peers(n: int, dim: int, seed: int, weights: list[float] | None = None) -> list[SimPeer]:
    rng = np.random.default_rng(seed)
    return [SimPeer(i, rng.standard_normal(dim).astype(np.float32), 1.0 if weights is None else weights[i],
                    Exchanger(i)) for i in range(n)]


def mass(peers: list[SimPeer]) -> np.ndarray:
    """sum_i w_i x_i in float64."""
    return np.sum([p.weight * p.params.astype(np.float64) for p in peers], axis=0)


# -- pair_average ----------------------------------------------------------------------------


@settings(max_examples=200, deadline=None, database=None)
@given(n=st.integers(0, 300), seed=st.integers(0, 2**16), wa=weights_st, wb=weights_st,
       scale=st.sampled_from([1e-30, 1e-3, 1.0, 1e3, 1e30]))
def test_pair_average_is_bit_identical_on_both_sides_and_the_weighted_mean(
    n: int, seed: int, wa: float, wb: float, scale: float,
) -> None:
    if wa + wb == 0:
        wb = 1.0
    rng = np.random.default_rng(seed)
    a = (rng.standard_normal(n) * scale).astype(np.float32)
    b = (rng.standard_normal(n) * scale).astype(np.float32)
    got_a, got_b = both_sides(a, b, wa, wb)
    assert got_a.tobytes() == got_b.tobytes()
    want = (wa * a.astype(np.float64) + wb * b.astype(np.float64)) / (wa + wb)
    assert np.allclose(got_a, want, rtol=1e-5, atol=1e-6 * scale)


def test_asymmetric_formula_would_fail_the_bit_identity_check() -> None:
    """The bit-identity property has teeth: the textbook ``a + q (b - a)`` differs between sides."""
    rng = np.random.default_rng(0)
    a, b = rng.standard_normal(1000).astype(np.float32), rng.standard_normal(1000).astype(np.float32)

    def naive(mine: np.ndarray, theirs: np.ndarray, wm: float, wt: float) -> np.ndarray:
        return mine + np.float32(wt / (wm + wt)) * (theirs - mine)

    assert naive(a, b, 3.0, 1.0).tobytes() != naive(b, a, 1.0, 3.0).tobytes()
    got_a, got_b = both_sides(a, b, 3.0, 1.0)
    assert got_a.tobytes() == got_b.tobytes()


def test_pair_average_known_values() -> None:
    """Weights 3 and 1: the mean of 0 and 4 is 3, not 2; equal weights give the exact midpoint."""
    a, b = np.zeros(3, np.float32), np.array([4.0, 4.0, -8.0], np.float32)
    got_a, got_b = both_sides(a, b, 1.0, 3.0)
    assert np.array_equal(got_a, np.array([3.0, 3.0, -6.0], np.float32))
    assert np.array_equal(got_b, got_a)
    mid_a, _ = both_sides(np.array([1.0, -3.0], np.float32), np.array([2.0, 5.0], np.float32), 7.0, 7.0)
    assert np.array_equal(mid_a, np.array([1.5, 1.0], np.float32))
    assert pair_weights(5.0, 5.0) == (np.float32(0.5), np.float32(0.5))
    keep, _ = both_sides(np.array([2.0], np.float32), np.array([9.0], np.float32), 1.0, 0.0)
    assert keep[0] == 2.0  # a weight-0 partner contributes nothing


def test_pair_average_works_across_scratch_pieces() -> None:
    """A buffer longer than the scratch gets the same bytes as the one-shot formula."""
    n = 2 * SCRATCH_ELEMS + 7
    rng = np.random.default_rng(1)
    a, b = rng.standard_normal(n).astype(np.float32), rng.standard_normal(n).astype(np.float32)
    pa, pb = pair_weights(2.0, 5.0)
    want = a * pa + b * pb
    got = a.copy()
    pair_average(got, b, 2.0, 5.0)
    assert got.tobytes() == want.tobytes()


@pytest.mark.parametrize("mine,theirs,wm,wt", [
    (np.zeros(4, np.float64), np.zeros(4, np.float64), 1.0, 1.0),
    (np.zeros((2, 2), np.float32), np.zeros((2, 2), np.float32), 1.0, 1.0),
    (np.zeros(4, np.float32), np.zeros(5, np.float32), 1.0, 1.0),
    (np.ones(4, np.float32), np.zeros(4, np.float32), -1.0, 1.0),
    (np.ones(4, np.float32), np.zeros(4, np.float32), 0.0, 0.0),
    (np.ones(4, np.float32), np.zeros(4, np.float32), float("nan"), 1.0),
    (np.ones(4, np.float32), np.zeros(4, np.float32), 1.0, float("inf")),
    (np.ones(4, np.float32), np.zeros(4, np.float32), True, 1.0),
])
def test_pair_average_rejects_bad_input_and_leaves_mine(mine: np.ndarray, theirs: np.ndarray, wm: Any, wt: Any) -> None:
    before = mine.copy()
    with pytest.raises(ValueError):
        pair_average(mine, theirs, wm, wt)
    assert np.array_equal(mine, before)


def test_pair_average_rejects_overlap_and_read_only() -> None:
    buf = np.arange(8, dtype=np.float32)
    with pytest.raises(ValueError, match="overlap"):
        pair_average(buf[:4], buf[2:6], 1.0, 1.0)
    ro = np.zeros(4, np.float32)
    ro.flags.writeable = False
    with pytest.raises(ValueError, match="writeable"):
        pair_average(ro, np.ones(4, np.float32), 1.0, 1.0)


@settings(max_examples=200, deadline=None, database=None)
@given(n=st.integers(1, 200), seed=st.integers(0, 2**16), wa=weights_st, wb=weights_st)
def test_every_exchange_conserves_mass_and_weight(n: int, seed: int, wa: float, wb: float) -> None:
    """w_a a + w_b b before equals w' (a' + b') after, and the weights' sum is exactly kept."""
    if wa + wb == 0:
        wa = 1.0
    rng = np.random.default_rng(seed)
    a, b = rng.standard_normal(n).astype(np.float32), rng.standard_normal(n).astype(np.float32)
    before = wa * a.astype(np.float64) + wb * b.astype(np.float64)
    got_a, got_b = both_sides(a, b, wa, wb)
    w = merged_weight(wa, wb)
    assert w == merged_weight(wb, wa)
    assert 2 * w == wa + wb
    after = w * (got_a.astype(np.float64) + got_b.astype(np.float64))
    scale = (wa + wb) * (np.abs(a).max() + np.abs(b).max())
    assert np.allclose(after, before, rtol=0, atol=1e-6 * scale)


def test_mass_check_catches_a_one_sided_exchange() -> None:
    """The mass check used below fails when only one side applies an exchange."""
    peers = make_peers(2, 50, seed=3, weights=[1.0, 3.0])
    net = InMemoryGossipNet(peers)
    start = mass(peers)
    a, b = peers
    assert open_exchange(net, a, b) is Opened.OPENED
    b.exchanger.stage(a.index, net.send(a.index, b.index))
    a.exchanger.stage(b.index, net.send(b.index, a.index))
    a.weight = a.exchanger.commit(b.index, a.params, a.weight)
    b.exchanger.abort(a.index)  # B never applies: the update is lost on one side
    assert not np.allclose(mass(peers), start, atol=1e-3)


# -- consensus distance ----------------------------------------------------------------------


def test_consensus_distance_values() -> None:
    x = np.linspace(-3, 3, 17, dtype=np.float32)
    assert consensus_distance([x, x.copy(), x.copy()]) == 0.0
    assert consensus_distance([x]) == 0.0
    # Mean 1, deviations -1 and +1 in one coordinate: sqrt((1 + 1) / 2) = 1.
    assert consensus_distance([np.array([0.0, 5.0], np.float32), np.array([2.0, 5.0], np.float32)]) == 1.0
    rng = np.random.default_rng(0)
    bufs = [rng.standard_normal(40).astype(np.float32) for _ in range(6)]
    stacked = np.stack(bufs).astype(np.float64)
    want = math.sqrt(np.mean(np.sum((stacked - stacked.mean(0)) ** 2, axis=1)))
    assert consensus_distance(bufs) == pytest.approx(want, rel=1e-12)
    shifted = [b + np.float32(100.0) for b in bufs]  # unaffected by a common shift (up to rounding)
    assert consensus_distance(shifted) == pytest.approx(want, rel=1e-4)
    with pytest.raises(ValueError):
        consensus_distance([])
    with pytest.raises(ValueError):
        consensus_distance([np.zeros(3, np.float32), np.zeros(4, np.float32)])


# -- the exchange slot -----------------------------------------------------------------------


def test_busy_peer_refuses_until_released() -> None:
    ex = Exchanger("b")
    assert not ex.busy and ex.partner is None
    assert ex.try_begin("a")
    assert ex.busy and ex.partner == "a"
    assert not ex.try_begin("c")
    assert ex.partner == "a" and ex.refusals == 1
    assert not ex.abort("c"), "an abort for another exchange must not free the slot"
    assert ex.partner == "a"
    assert ex.abort("a")
    assert not ex.busy and ex.aborts == 1
    assert ex.try_begin("c")


def test_exchanger_rejects_out_of_order_calls() -> None:
    ex = Exchanger("me")
    mine = np.ones(3, np.float32)
    snap = snapshot(np.zeros(3, np.float32), 1.0)
    with pytest.raises(ValueError):
        ex.try_begin("me")
    with pytest.raises(ValueError):
        ex.try_begin(None)
    with pytest.raises(ExchangeStateError):
        ex.stage("a", snap)
    with pytest.raises(ExchangeStateError):
        ex.commit("a", mine, 1.0)
    assert ex.try_begin("a")
    with pytest.raises(ExchangeStateError):
        ex.stage("b", snap)
    with pytest.raises(ExchangeStateError):
        ex.commit("a", mine, 1.0)  # nothing staged yet
    ex.stage("a", snap)
    with pytest.raises(ExchangeStateError):
        ex.stage("a", snap)  # a duplicated message
    assert np.array_equal(mine, np.ones(3, np.float32)), "nothing applied before the commit"
    assert ex.commit("a", mine, 1.0) == 1.0
    assert np.array_equal(mine, np.full(3, 0.5, np.float32))
    assert ex.commits == 1 and not ex.busy
    with pytest.raises(ExchangeStateError):
        ex.commit("a", mine, 1.0)  # applied once only
    assert not ex.abort("a"), "a late abort after the commit changes nothing"
    assert np.array_equal(mine, np.full(3, 0.5, np.float32))


def test_commit_of_a_mismatched_copy_frees_the_slot_and_leaves_mine() -> None:
    ex = Exchanger(0)
    mine = np.ones(4, np.float32)
    assert ex.try_begin(1)
    ex.stage(1, Snapshot(np.zeros(5, np.float32), 1.0))
    with pytest.raises(ValueError):
        ex.commit(1, mine, 1.0)
    assert np.array_equal(mine, np.ones(4, np.float32))
    assert not ex.busy and ex.aborts == 1 and ex.commits == 0


def test_snapshot_is_a_copy() -> None:
    params = np.ones(3, np.float32)
    snap = snapshot(params, 2.0)
    params[:] = 7
    assert np.array_equal(snap.params, np.ones(3, np.float32)) and snap.weight == 2.0


def race_for_one_slot(ex: Exchanger, contenders: int) -> list[int]:
    """``contenders`` threads call ``ex.try_begin`` at once; returns the ones that got True."""
    barrier = threading.Barrier(contenders)
    wins: list[int] = []
    lock = threading.Lock()

    def ask(i: int) -> None:
        barrier.wait(timeout=JOIN_S)
        if ex.try_begin(i):
            with lock:
                wins.append(i)

    threads = [threading.Thread(target=ask, args=(i,), daemon=True) for i in range(contenders)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=JOIN_S)
    assert not any(t.is_alive() for t in threads)
    return wins


def test_try_begin_admits_exactly_one_of_many_threads() -> None:
    for _ in range(30):
        ex = Exchanger("target")
        wins = race_for_one_slot(ex, 12)
        assert len(wins) == 1 and ex.partner == wins[0] and ex.refusals == 11


class FailingNet(InMemoryGossipNet):
    """Raises ExchangeError on the ``fail_at``-th send (1 = before anything is staged, 2 = after
    the responder staged the initiator's copy)."""

    def __init__(self, peers: list[SimPeer], fail_at: int) -> None:
        super().__init__(peers)
        self.fail_at = fail_at
        self.sends = 0

    def send(self, src: int, dst: int) -> Snapshot:
        self.sends += 1
        if self.sends == self.fail_at:
            raise ExchangeError(f"injected failure on send {self.sends}", suspect=str(dst))
        return super().send(src, dst)


@pytest.mark.parametrize("fail_at", [1, 2])
def test_failure_before_commit_leaves_both_sides_unchanged(fail_at: int) -> None:
    peers = make_peers(2, 100, seed=5, weights=[2.0, 6.0])
    a, b = peers
    before = [(p.params.tobytes(), p.weight) for p in peers]
    net = FailingNet(peers, fail_at)
    assert open_exchange(net, a, b) is Opened.OPENED
    assert a.exchanger.busy and b.exchanger.busy
    assert run_exchange(net, a, b) is False
    assert [(p.params.tobytes(), p.weight) for p in peers] == before
    for p in peers:
        assert not p.exchanger.busy and p.exchanger.aborts == 1 and p.exchanger.commits == 0
    # The slots are free again and the next exchange is applied by both sides, identically.
    assert open_exchange(net, a, b) is Opened.OPENED
    assert run_exchange(net, a, b) is True
    assert a.params.tobytes() == b.params.tobytes() and a.weight == b.weight == 4.0
    assert a.exchanger.commits == b.exchanger.commits == 1


def test_initiator_skips_a_busy_partner_for_the_next_candidate() -> None:
    """Ring of 4 at step 0: peer 0 asks 1 first, then 3. Peers 1 and 2 are already exchanging."""
    peers = make_peers(4, 10, seed=7)
    net = InMemoryGossipNet(peers)
    assert topo.partners("ring", 0, 4, 0) == [1, 3]
    assert open_exchange(net, peers[1], peers[2]) is Opened.OPENED
    assert open_exchange(net, peers[0], peers[1]) is Opened.BUSY
    assert not peers[0].exchanger.busy, "a refused request must free the initiator's slot"
    before_12 = [peers[1].params.tobytes(), peers[2].params.tobytes()]
    p0, p3 = peers[0].params.copy(), peers[3].params.copy()
    stats = gossip_step(net, "ring", 0, np.random.default_rng(0))
    assert stats.exchanges == 1 and stats.busy >= 1
    assert [peers[1].params.tobytes(), peers[2].params.tobytes()] == before_12
    assert peers[0].params.tobytes() == peers[3].params.tobytes()
    assert np.allclose(peers[0].params, (p0 + p3) / 2)


def test_dead_partner_is_skipped_and_the_rest_converge() -> None:
    n, dead = 16, {5}
    start = simulate(n, 0, "ring", 20, seed=3, dead=dead)
    res = simulate(n, 80, "ring", 20, seed=3, dead=dead)
    assert res.peers[5].params.tobytes() == start.peers[5].params.tobytes(), "a dead peer takes part in nothing"
    assert res.peers[5].exchanger.commits == 0
    assert sum(s.unreachable for s in res.steps) > 0
    assert res.peers[4].exchanger.commits > 0 and res.peers[6].exchanger.commits > 0
    assert res.distances[-1] < 0.3 * res.distances[0]  # the ring without 5 is a path: slow, but falling
    live = [p for p in res.peers if p.index not in dead]
    live_start = [p for p in start.peers if p.index not in dead]
    assert np.allclose(mass(live), mass(live_start), rtol=0, atol=1e-3)
    expo = simulate(32, 60, "exponential", 20, seed=3, dead={5, 17})
    assert expo.distances[-1] < 1e-3 * expo.distances[0]


class FlakyNet(InMemoryGossipNet):
    """Fails a fraction of sends at random (thread-safe)."""

    def __init__(self, peers: list[SimPeer], p_fail: float, seed: int) -> None:
        super().__init__(peers)
        self.p_fail = p_fail
        self.rng = np.random.default_rng(seed)
        self.lock = threading.Lock()

    def send(self, src: int, dst: int) -> Snapshot:
        with self.lock:
            fail = self.rng.random() < self.p_fail
        if fail:
            raise ExchangeError("injected", suspect=str(dst))
        return super().send(src, dst)


def test_concurrent_gossip_applies_every_exchange_on_both_sides_or_neither() -> None:
    """Peers as threads initiating at will over a flaky net: each exchange is applied by both
    sides or by neither, so the per-peer commit counts match the successful exchanges and the
    mass and total weight are conserved."""
    n, attempts = 8, 40
    weights = [float(w) for w in np.random.default_rng(1).integers(1, 50, n)]
    peers = make_peers(n, 64, seed=11, weights=weights)
    net = FlakyNet(peers, p_fail=0.2, seed=2)
    start_mass, start_weight = mass(peers), sum(p.weight for p in peers)
    done: list[tuple[int, int, bool]] = []
    lock = threading.Lock()

    refused = [0] * n  # requests peer i made that met a busy slot

    def body(i: int) -> None:
        rng = np.random.default_rng(100 + i)
        for step in range(attempts):
            for j in topo.partners("uniform", i, n, step, rng):
                opened = open_exchange(net, peers[i], peers[j])
                if opened is Opened.BUSY:
                    refused[i] += 1
                if opened is Opened.OPENED:
                    ok = run_exchange(net, peers[i], peers[j])
                    with lock:
                        done.append((i, j, ok))
                    break

    threads = [threading.Thread(target=body, args=(i,), daemon=True) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=JOIN_S)
    assert not any(t.is_alive() for t in threads)
    ok = [(i, j) for i, j, s in done if s]
    assert ok and len(ok) < len(done), "the run should see both applied and failed exchanges"
    for p in peers:
        assert not p.exchanger.busy
        assert p.exchanger.commits == sum(p.index in pair for pair in ok), f"peer {p.index}"
        # Aborts: the failed exchanges it was in, plus its own slot released after a refusal.
        failed = sum(p.index in (i, j) for i, j, s in done if not s)
        assert failed <= p.exchanger.aborts <= failed + refused[p.index]
    assert sum(p.weight for p in peers) == pytest.approx(start_weight, rel=1e-12)
    assert np.allclose(mass(peers), start_mass, rtol=0, atol=1e-3)


# -- topology --------------------------------------------------------------------------------


def test_parse_topology() -> None:
    assert [topo.parse_topology(s) for s in TOPOLOGIES] == list(topo.Topology)
    assert topo.parse_topology(" Exponential ") is topo.Topology.EXPONENTIAL
    assert topo.parse_topology(topo.Topology.RING) is topo.Topology.RING
    for bad in ["", "star", "rings"]:
        with pytest.raises(ValueError, match="uniform, ring, exponential"):
            topo.parse_topology(bad)
    with pytest.raises(ValueError):
        topo.parse_topology(3)  # type: ignore[arg-type]


@pytest.mark.parametrize("name", TOPOLOGIES)
@pytest.mark.parametrize("n", [1, 2, 3, 4, 5, 8, 31, 32, 33])
def test_partners_are_valid_distinct_and_exclude_self(name: str, n: int) -> None:
    rng = np.random.default_rng(n)
    for me in range(n):
        allowed = set(topo.neighbours(name, me, n))
        for step in range(7):
            cands = topo.partners(name, me, n, step, rng)
            assert all(isinstance(c, int) and 0 <= c < n for c in cands)
            assert me not in cands and len(set(cands)) == len(cands)
            assert set(cands) == allowed, "the fallbacks cover exactly the topology's neighbours"
            if n > 1:
                assert cands, "every member of a group of 2 or more has someone to ask"


@pytest.mark.parametrize("name", TOPOLOGIES)
def test_partners_are_deterministic_per_seed(name: str) -> None:
    def draw(seed: int) -> list[list[int]]:
        rng = np.random.default_rng(seed)
        return [topo.partners(name, me, 32, step, rng, shuffle=True) for step in range(5) for me in range(32)]

    assert draw(7) == draw(7)
    assert draw(7) != draw(8)


def test_uniform_first_choice_is_spread_over_everyone() -> None:
    rng = np.random.default_rng(0)
    n, draws = 32, 3100
    counts = np.bincount([topo.partners("uniform", 3, n, s, rng)[0] for s in range(draws)], minlength=n)
    assert counts[3] == 0
    others = np.delete(counts, 3)
    assert others.min() > 50 and others.max() < 160, others  # expected 100 each


def test_ring_alternates_between_its_two_neighbours() -> None:
    assert topo.partners("ring", 5, 32, 0) == [6, 4]
    assert topo.partners("ring", 5, 32, 1) == [4, 6]
    assert topo.partners("ring", 0, 32, 2) == [1, 31]
    assert topo.neighbours("ring", 0, 2) == [1]
    assert topo.neighbours("ring", 0, 1) == []


@pytest.mark.parametrize("n", list(range(1, 70)) + [128, 1000])
def test_exponential_graph_has_log2_n_distances(n: int) -> None:
    k = math.ceil(math.log2(n)) if n > 1 else 0
    dists = topo.exponential_distances(n)
    assert dists == [2**i for i in range(k)]
    for me in (0, n // 2, n - 1):
        nb = topo.neighbours("exponential", me, n)
        ahead = {(me + d) % n for d in dists} - {me}
        assert ahead <= set(nb), "every distance ahead is a neighbour"
        assert k <= len(nb) <= 2 * k, f"n={n}: {len(nb)} neighbours for {k} distances"
    if n == 32:
        assert len(topo.neighbours("exponential", 0, n)) == 9  # 1, 2, 4, 8 both ways, and 16


def test_exponential_cycles_through_distances_one_per_step() -> None:
    n = 32
    firsts = [topo.partners("exponential", 3, n, step)[0] for step in range(10)]
    assert firsts == [(3 + 2 ** (s % 5)) % n for s in range(10)]
    # The first fallback is the member behind at the same distance.
    assert topo.partners("exponential", 3, n, 2)[:2] == [7, 31]


def test_partners_reject_bad_input() -> None:
    rng = np.random.default_rng(0)
    with pytest.raises(ValueError, match="unknown topology"):
        topo.partners("mesh", 0, 4, 0, rng)
    for me, n, step in [(0, 0, 0), (4, 4, 0), (-1, 4, 0), (0, 4, -1), (True, 4, 0), (0.5, 4, 0)]:
        with pytest.raises(ValueError):
            topo.partners("ring", me, n, step, rng)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="Generator"):
        topo.partners("uniform", 0, 4, 0)
    with pytest.raises(ValueError, match="Generator"):
        topo.partners("ring", 0, 4, 0, shuffle=True)


def test_partner_ids_over_a_membership_list() -> None:
    members = ["p-a", "p-b", "p-c", "p-d", "p-e"]
    assert topo.partner_ids("ring", members, "p-a", 0) == ["p-b", "p-e"]
    assert topo.partner_ids("exponential", members, "p-c", 1) == ["p-e", "p-a", "p-b", "p-d"]
    with pytest.raises(ValueError, match="not in the membership"):
        topo.partner_ids("ring", members, "p-z", 0)
    with pytest.raises(ValueError, match="duplicate"):
        topo.partner_ids("ring", ["x", "y", "x"], "x", 0)


# -- the simulation --------------------------------------------------------------------------


def test_fit_rate_and_steps_to_on_known_sequences() -> None:
    halving = [0.5**t for t in range(40)]
    rate, r2 = fit_rate(halving)
    assert rate == pytest.approx(0.5) and r2 == pytest.approx(1.0)
    # Points under the floor (float32 noise) are left out of the fit.
    assert fit_rate(halving[:15] + [1e-9] * 30)[0] == pytest.approx(0.5)
    assert steps_to(halving, 1e-3) == 10  # 2**-10 < 1e-3 < 2**-9
    assert steps_to([1.0, 0.9, 0.8], 1e-3) is None
    noisy = [1.0, 0.2, 0.9, 0.1, 0.8, 0.05]
    assert fit_rate(noisy)[1] < 0.6
    with pytest.raises(ValueError):
        fit_rate([0.0, 0.0, 0.0])
    with pytest.raises(ValueError):
        fit_rate([1.0, 1e-9, 1e-9])


def test_simulation_is_deterministic_per_seed() -> None:
    a = simulate(32, 15, "uniform", 50, seed=4)
    b = simulate(32, 15, "uniform", 50, seed=4)
    c = simulate(32, 15, "uniform", 50, seed=5)
    assert a.distances == b.distances
    assert all(p.params.tobytes() == q.params.tobytes() for p, q in zip(a.peers, b.peers))
    assert a.distances != c.distances


@pytest.mark.parametrize("name", TOPOLOGIES)
def test_each_peer_is_in_at_most_one_exchange_per_step(name: str) -> None:
    peers = make_peers(32, 8, seed=2)
    net = InMemoryGossipNet(peers)
    rng = np.random.default_rng(9)
    for step in range(12):
        before = [p.exchanger.commits for p in peers]
        stats = gossip_step(net, name, step, rng)
        delta = [p.exchanger.commits - b for p, b in zip(peers, before)]
        assert set(delta) <= {0, 1}, f"step {step}: {delta}"
        assert sum(delta) == 2 * stats.exchanges
        assert stats.exchanges >= 10, "most peers find a partner every step"
        assert not any(p.exchanger.busy for p in peers)


@pytest.mark.parametrize("name", TOPOLOGIES)
def test_consensus_distance_never_rises_with_equal_weights(name: str) -> None:
    """Pairwise averaging with equal weights keeps the mean and shrinks the spread: the distance
    never rises (beyond float32 rounding, about 1e-7 of the start)."""
    d = simulate(32, 60, name, 200, seed=1).distances
    assert all(b <= a + 1e-7 * d[0] for a, b in itertools.pairwise(d))
    assert d[-1] < 0.5 * d[0]


def test_weighted_simulation_reaches_the_weighted_mean() -> None:
    n, dim = 32, 30
    weights = [float(w) for w in np.random.default_rng(3).integers(1, 100, n)]
    start = simulate(n, 0, "exponential", dim, seed=6, weights=weights)
    want = mass(start.peers) / sum(weights)
    res = simulate(n, 60, "exponential", dim, seed=6, weights=weights)
    assert res.distances[-1] < 1e-5 * res.distances[0]
    assert sum(p.weight for p in res.peers) == pytest.approx(sum(weights), rel=1e-12)
    for p in res.peers:
        assert np.allclose(p.params, want, atol=1e-5)
    unweighted = np.mean([p.params.astype(np.float64) for p in start.peers], axis=0)
    assert not np.allclose(want, unweighted, atol=1e-2), "weights must matter in this test"


@pytest.mark.parametrize("name", ["uniform", "exponential"])
def test_32_peer_consensus_distance_falls_geometrically(name: str) -> None:
    d = simulate(32, 60, name, 1000, seed=0).distances
    rate, r2 = fit_rate(d)
    assert rate < 0.8 and r2 > 0.97, (rate, r2)
    assert d[20] < 1e-2 * d[0]
    assert steps_to(d, 1e-3) is not None and steps_to(d, 1e-3) <= 30  # type: ignore[operator]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_32_peer_consensus_falls_faster_on_the_exponential_graph_than_on_the_ring(seed: int) -> None:
    ring = simulate(32, 60, "ring", 1000, seed=seed).distances
    expo = simulate(32, 60, "exponential", 1000, seed=seed).distances
    assert ring[0] == expo[0], "both start from the same vectors"
    ring_rate, _ = fit_rate(ring)
    expo_rate, _ = fit_rate(expo)
    assert ring_rate < 1.0, "the ring still converges, slowly"
    assert ring[-1] < 0.5 * ring[0]
    assert expo_rate < ring_rate - 0.15, (expo_rate, ring_rate)
    assert all(e < r for e, r in zip(expo[5:], ring[5:]))
    assert expo[30] < 1e-3 * ring[30]


def test_local_steps_pull_the_average_to_the_optimum() -> None:
    """With lr > 0 (decentralized SGD on quadratics f_i = |x - c_i|^2 / 2) the peers' mean
    moves to the mean target as (1 - lr)^t, while the consensus distance settles at a level
    that shrinks with the step size instead of vanishing."""
    settled = {}
    for lr in (0.3, 0.05):
        start = simulate(32, 0, "exponential", 50, seed=2, lr=lr)
        res = simulate(32, 150, "exponential", 50, seed=2, lr=lr)
        assert len(res.optimum_distances) == 151
        targets = np.mean([p.target for p in res.peers if p.target is not None], axis=0, dtype=np.float64)
        gap0 = np.linalg.norm(np.mean([p.params for p in start.peers], axis=0, dtype=np.float64) - targets)
        gap = np.linalg.norm(np.mean([p.params for p in res.peers], axis=0, dtype=np.float64) - targets)
        assert gap == pytest.approx((1 - lr) ** 150 * gap0, rel=0.05, abs=1e-6)
        assert 0 < res.distances[-1] < 0.5 * res.distances[0]
        settled[lr] = res.distances[-1]
    assert settled[0.05] < 0.5 * settled[0.3]


def test_simulate_rejects_bad_arguments() -> None:
    bad: list[dict[str, Any]] = [{"peers": 1}, {"steps": -1}, {"dim": 0}, {"lr": 2.0}, {"lr": float("nan")},
                                 {"topology": "star"}, {"dead": {40}}, {"weights": [1.0]}]
    for kwargs in bad:
        args: dict[str, Any] = {"peers": 4, "steps": 2, "topology": "ring", "dim": 3, "seed": 0}
        args.update(kwargs)
        with pytest.raises(ValueError):
            simulate(**args)


# -- the benchmark CLI -----------------------------------------------------------------------


def load_bench() -> Any:
    spec = importlib.util.spec_from_file_location("gossip_sim_bench", ROOT / "benchmarks" / "gossip_sim.py")
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_benchmark_writes_csv_and_summary(tmp_path: pathlib.Path, capsys: pytest.CaptureFixture[str]) -> None:
    bench = load_bench()
    out = tmp_path / "g.csv"
    assert bench.main(["--peers", "32", "--steps", "20", "--dim", "100", "--csv", str(out)]) == 0
    lines = out.read_text().splitlines()
    assert lines[0] == "topology,peers,step,consensus_distance"
    assert len(lines) == 1 + 3 * 21
    rows = [line.split(",") for line in lines[1:]]
    assert {r[0] for r in rows} == set(TOPOLOGIES) and {r[1] for r in rows} == {"32"}
    assert [int(r[2]) for r in rows[:21]] == list(range(21))
    printed = capsys.readouterr().out
    for name in TOPOLOGIES:
        assert name in printed
    assert "rate/step" in printed and "steps to 0.001" in printed


@pytest.mark.parametrize("argv", [["--peers", "1"], ["--steps", "0"], ["--topologies", "uniform,star"],
                                  ["--topologies", ","], ["--topologies", "ring,ring"], ["--dim", "0"],
                                  ["--lr", "-1"], ["--every", "0"], ["--csv", "/nonexistent-dir/x.csv"],
                                  ["--peers", "many"]])
def test_benchmark_bad_flags_exit_2(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    bench = load_bench()
    with pytest.raises(SystemExit) as ei:
        bench.main(argv)
    assert ei.value.code == 2
    assert "error" in capsys.readouterr().err


def test_pair_apply_is_pair_average_of_the_sent_copy_plus_the_own_progress() -> None:
    from dml.aggregation.gossip import pair_apply

    rng = np.random.default_rng(3)
    for n in (1, 7, SCRATCH_ELEMS + 5):
        sent = rng.normal(size=n).astype(np.float32)
        theirs = rng.normal(size=n).astype(np.float32)
        step = rng.normal(size=n).astype(np.float32) * 0.01
        live = sent + step
        expected = sent.copy()
        pair_average(expected, theirs, 3.0, 5.0)
        pair_apply(live, sent, theirs, 3.0, 5.0)
        np.testing.assert_allclose(live, expected + step, rtol=0, atol=1e-5)
        same = sent.copy()
        pair_apply(same, sent.copy(), theirs, 3.0, 5.0)  # nothing trained: the average, up to rounding
        np.testing.assert_allclose(same, expected, rtol=0, atol=1e-6)


def test_pair_apply_refuses_overlaps_and_bad_weights_leaving_live_untouched() -> None:
    from dml.aggregation.gossip import pair_apply

    live = np.ones(8, dtype=np.float32)
    before = live.copy()
    with pytest.raises(ValueError):
        pair_apply(live, live, np.zeros(8, dtype=np.float32), 1.0, 1.0)
    with pytest.raises(ValueError):
        pair_apply(live, np.zeros(8, dtype=np.float32), np.zeros(8, dtype=np.float32), 0.0, 0.0)
    with pytest.raises(ValueError):
        pair_apply(live, np.zeros(7, dtype=np.float32), np.zeros(8, dtype=np.float32), 1.0, 1.0)
    assert live.tobytes() == before.tobytes()
