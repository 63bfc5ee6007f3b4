"""Shard planning: cutting a training set into shards and giving shards to peers.

Pure functions. Shards are index sets over the task's training split. An assignment maps each
live peer to shard ids; every shard is held by at most one peer, and by exactly one unless the
peers' caps (``dml-peer --max-samples``) cannot hold it: such a shard is *unassigned* (nobody
trains on it) until a peer with room joins, never squeezed onto a peer past its cap.

Loads are weighted by *capacity* (measured samples/s; a peer twice as fast is given about twice
the samples). The first placement is largest-first to the least-loaded peer; for shardings whose
order means something (``contiguous``, ``classes:K``) it gives each peer a run of consecutive
shard ids instead, so data kept in order, and a label group, stays on one peer. When a peer leaves, only its shards
move (largest first, each to the least-loaded survivor with room); when one joins, unassigned
shards are placed first, then shards move to it from the most-loaded peer while that lowers the
weighted imbalance.
"""
from __future__ import annotations

import math

import numpy as np

from dml.common.sampling import MAX_LABELS, parse_sharding
from dml.common.spec import JobSpec

Assignment = dict[str, list[int]]
Capacity = dict[str, float]  # peer -> relative speed (samples/s); absent: 1
Caps = dict[str, int]  # peer -> the most samples it holds; absent or 0: no cap
UNLABELLED_SHARDINGS = ("iid", "contiguous")  # the schemes that need no labels
MAX_TRAIN_SAMPLES = 1 << 24  # the largest training set the coordinator cuts into shards


def needs_labels(sharding: str) -> bool:
    """Whether a sharding scheme cuts by label (``dirichlet:ALPHA``, ``classes:K``)."""
    return parse_sharding(sharding)[0] not in UNLABELLED_SHARDINGS


def data_problem(spec: JobSpec, train_samples: int, has_labels: bool) -> str:
    """Why a job cannot be cut into shards from a training set of ``train_samples`` samples
    (with or without labels), "" when it can: the checks made where the data is described,
    since the coordinator never loads it."""
    if train_samples < 1:
        return "the task's training set is empty"
    if train_samples > MAX_TRAIN_SAMPLES:
        return (f"the task's training set has {train_samples:,} samples; the coordinator cuts shards of at most "
                f"{MAX_TRAIN_SAMPLES:,}")
    if not 1 <= spec.num_shards <= train_samples:
        return (f"num_shards must be between 1 and {train_samples} (the training set size), "
                f"got {spec.num_shards}")
    if needs_labels(spec.sharding) and not has_labels and train_samples > MAX_LABELS:
        return (f"sharding {spec.sharding} needs the training labels, and a take sends them for at most "
                f"{MAX_LABELS:,} samples (this training set has {train_samples:,}): use --sharding iid")
    if needs_labels(spec.sharding) and not has_labels:
        return (f"sharding {spec.sharding} needs the training labels, and the task gives none: set labels= on "
                f"its dml.Task (one int per training sample), or use --sharding iid")
    return ""


def make_shards(labels: np.ndarray, num_shards: int, sharding: str, seed: int,
                min_samples: int = 1) -> list[np.ndarray]:
    """Cuts ``len(labels)`` samples into ``num_shards`` shards of at least ``min_samples`` each.
    Every sample lands in exactly one shard; the same arguments give the same shards.

    - ``iid``: shuffles and splits evenly.
    - ``contiguous``: consecutive index ranges of equal size, in the dataset's own order (for
      data already grouped per source: a user, a hospital, a file).
    - ``classes:K``: every shard holds exactly K labels (see :func:`_by_classes`): the labels
      are taken K at a time into ``ceil(C/K)`` label groups, each group's shards are
      consecutive ids, and each label's samples are split evenly over the shards holding it.
      With the first placement's runs of consecutive shards (``ordered``), each peer then sees the labels of
      one group (K) when the peer count is a multiple of the group count and ``num_shards`` a
      multiple of the peer count; otherwise a peer sees the groups its run overlaps (fewer
      peers than groups: about ``C / peers`` labels, the least that covers every label).
    - ``dirichlet:ALPHA``: each shard a class mix drawn from Dirichlet(ALPHA) (small ALPHA: few
      classes dominate), filled to equal sizes.

    Raises ValueError with a message when that cannot be done: a shard count out of range, K
    above the number of labels, a label with fewer samples than the shards that must hold it,
    or shards that cannot all reach ``min_samples``.
    """
    kind, param = parse_sharding(sharding)
    n = int(labels.size)
    if not 1 <= num_shards <= n:
        raise ValueError(f"num_shards must be between 1 and {n}, got {num_shards}")
    if min_samples < 1:
        raise ValueError(f"the minimum shard size must be at least 1, got {min_samples}")
    if num_shards * min_samples > n:
        raise ValueError(f"{n} training samples cannot fill {num_shards} shards of at least {min_samples} "
                         f"samples each (min_shard_samples); use at most {n // min_samples} shards or a smaller minimum")
    rng = np.random.default_rng(seed)
    if kind == "iid":
        shards = [np.sort(s) for s in np.array_split(rng.permutation(n), num_shards)]
    elif kind == "contiguous":
        shards = [np.asarray(s, dtype=np.int64) for s in np.array_split(np.arange(n), num_shards)]
    elif kind == "classes":
        shards = _by_classes(labels, num_shards, int(param), rng)
    else:
        shards = _by_dirichlet(labels, num_shards, param, rng)
    small = [i for i, s in enumerate(shards) if s.size < min_samples]
    if small:
        raise ValueError(f"sharding {sharding!r} leaves {len(small)} of {num_shards} shards below the minimum of "
                         f"{min_samples} samples (shard {small[0]} has {shards[small[0]].size}); "
                         "use fewer shards or a smaller min_shard_samples")
    return shards


def _by_classes(labels: np.ndarray, num_shards: int, k: int, rng: np.random.Generator) -> list[np.ndarray]:
    """``classes:K``. The C distinct labels (sorted) form ``B = ceil(C/K)`` groups, group b the
    labels ``b*K .. b*K+K-1`` (mod C: the last group wraps around when K does not divide C, so
    a few labels are in two groups). Group b owns shards ``b*S//B .. (b+1)*S//B - 1``; each
    label's samples (shuffled) are split evenly over all the shards of the groups holding it.
    Guaranteed: every shard holds exactly K labels, every sample is in one shard."""
    classes = np.unique(labels)
    c = int(classes.size)
    if k > c:
        raise ValueError(f"classes:{k} asks for {k} labels per shard, but the training set has only {c}")
    groups = -(-c // k)
    if num_shards < groups:
        raise ValueError(f"classes:{k} over {c} labels needs at least {groups} shards (one per group of {k} labels), "
                         f"got {num_shards}")
    holders: list[list[int]] = [[] for _ in range(c)]
    for b in range(groups):
        for j in range(k):
            holders[(b * k + j) % c].extend(range(b * num_shards // groups, (b + 1) * num_shards // groups))
    parts: list[list[np.ndarray]] = [[] for _ in range(num_shards)]
    for ci in range(c):
        idx = rng.permutation(np.flatnonzero(labels == classes[ci]))
        hs = sorted(holders[ci])
        if idx.size < len(hs):
            raise ValueError(f"classes:{k}: label {classes[ci]} has {idx.size} samples, fewer than the {len(hs)} "
                             "shards that must hold it; use fewer shards")
        for shard, part in zip(hs, np.array_split(idx, len(hs))):
            parts[shard].append(part)
    return [np.sort(np.concatenate(p)).astype(np.int64) for p in parts]


def _by_dirichlet(labels: np.ndarray, num_shards: int, alpha: float, rng: np.random.Generator) -> list[np.ndarray]:
    """``dirichlet:ALPHA``: shards of equal size, each filled from its own Dirichlet class mix."""
    n = int(labels.size)
    classes = np.unique(labels)
    mix = rng.dirichlet([alpha] * classes.size, size=num_shards)  # shard x class preference
    pools = {int(c): list(rng.permutation(np.flatnonzero(labels == c))) for c in classes}
    sizes = [len(s) for s in np.array_split(np.arange(n), num_shards)]
    shards: list[list[int]] = [[] for _ in range(num_shards)]
    # Fill shards in rounds, one sample at a time per shard, drawing a class from its mix among
    # the classes that still have samples. Deterministic for a seed.
    for _ in range(max(sizes)):
        for s in range(num_shards):
            if len(shards[s]) >= sizes[s]:
                continue
            live = [i for i, c in enumerate(classes) if pools[int(c)]]
            p = mix[s, live]
            p = p / p.sum() if p.sum() > 0 else np.full(len(live), 1.0 / len(live))
            c = int(classes[live[int(rng.choice(len(live), p=p))]])
            shards[s].append(int(pools[c].pop()))
    return [np.sort(np.asarray(s, dtype=np.int64)) for s in shards]


# -- placement ---------------------------------------------------------------------------------
def held(assign: Assignment, sizes: list[int], peer: str) -> int:
    """Samples a peer holds."""
    return sum(sizes[s] for s in assign.get(peer, []))


def unassigned(assign: Assignment, num_shards: int) -> list[int]:
    """Shards no peer holds (the caps left no room for them), ascending."""
    taken = {s for v in assign.values() for s in v}
    return [s for s in range(num_shards) if s not in taken]


def _weights(peers: list[str], capacity: Capacity | None) -> dict[str, float]:
    cap = capacity or {}
    return {p: cap[p] if cap.get(p, 0) > 0 and math.isfinite(cap[p]) else 1.0 for p in peers}


def _room(out: Assignment, sizes: list[int], peer: str, caps: Caps) -> float:
    cap = caps.get(peer, 0)
    return math.inf if cap <= 0 else cap - held(out, sizes, peer)


def _place(out: Assignment, shards: list[int], sizes: list[int], peers: list[str], w: dict[str, float],
           caps: Caps) -> None:
    """Gives each shard (largest first) to the least-loaded peer with room for it; a shard that
    fits nowhere stays unassigned."""
    h = {p: held(out, sizes, p) for p in peers}
    rank = {p: i for i, p in enumerate(peers)}
    for s in sorted(shards, key=lambda i: (-sizes[i], i)):
        fits = [p for p in peers if caps.get(p, 0) <= 0 or caps[p] - h[p] >= sizes[s]]
        if fits:
            p = min(fits, key=lambda q: (h[q] / w[q], rank[q]))
            out[p].append(s)
            h[p] += sizes[s]


def _targets(total: int, peers: list[str], w: dict[str, float], caps: Caps) -> dict[str, float]:
    """Each peer's share of ``total`` samples, proportional to its weight, capped (water-filling:
    what a capped peer cannot take is shared by the others in proportion)."""
    out: dict[str, float] = {}
    free, left = list(peers), float(total)
    while free:
        lam = left / sum(w[p] for p in free)
        over = [p for p in free if 0 < caps.get(p, 0) < lam * w[p]]
        if not over:
            out.update({p: lam * w[p] for p in free})
            break
        for p in over:
            out[p] = float(caps[p])
            left -= caps[p]
            free.remove(p)
    return out


def _runs(sizes: list[int], peers: list[str], w: dict[str, float], caps: Caps) -> Assignment:
    """Consecutive shard ids per peer, in peer order, each peer's run as long (in shards) as its
    capped share of the samples (:func:`_targets`) is of the whole: shard s goes to the peer
    whose share of the count holds ``s + 1/2``. Counted in shards, not samples, so that runs of
    equal shards cut at the same places as groups of equal shards do (``classes:K``'s label
    groups), whatever the groups' sizes. A run over its cap gives back its last shards, which
    are then placed greedily (or left unassigned)."""
    total, n = sum(sizes), len(sizes)
    target = _targets(total, peers, w, caps)
    out: Assignment = {p: [] for p in peers}
    bounds, acc = [], 0.0
    for p in peers:
        acc += target[p] / total * n if total else n / len(peers)
        bounds.append(acc)
    spill, i = [], 0
    for s in range(n):
        while i < len(peers) and s + 0.5 >= bounds[i]:
            i += 1
        (out[peers[i]] if i < len(peers) else spill).append(s)
    for p in peers:
        while out[p] and _room(out, sizes, p, caps) < 0:
            spill.append(out[p].pop())
    _place(out, spill, sizes, peers, w, caps)
    return out


def assign_shards(sizes: list[int], peers: list[str], capacity: Capacity | None = None,
                  caps: Caps | None = None, ordered: bool = False) -> Assignment:
    """Initial assignment of shards ``0..len(sizes)-1`` to ``peers``, loads weighted by
    ``capacity``, no peer over its cap in ``caps`` (a shard that fits nowhere is left out).

    Default: largest shards first, each to the least-loaded peer with room; without caps no
    peer's weighted load exceeds another's by more than the largest ``size / capacity``.
    ``ordered`` (for data whose order means something: ``contiguous``, ``classes:K``): each
    peer, in the order given, takes a run of consecutive shard ids, as many shards (within one)
    as its capacity's share of the samples is of the whole (a run that would pass its cap hands
    its last shards on to be placed as above). Label purity over balance: a member's round
    trains the same number of samples whatever it holds, so holding more only means it reads
    its shards in fewer passes."""
    if not peers:
        raise ValueError("cannot assign shards to no peers")
    w, lim = _weights(peers, capacity), caps or {}
    if ordered:
        out = _runs(sizes, peers, w, lim)
    else:
        out = {p: [] for p in peers}
        _place(out, list(range(len(sizes))), sizes, peers, w, lim)
    return {p: sorted(v) for p, v in out.items()}


def ordered_sharding(sharding: str) -> bool:
    """Whether a sharding's shard ids are in an order worth keeping together on a peer."""
    return parse_sharding(sharding)[0] in ("contiguous", "classes")


def remove_peers(assign: Assignment, gone: set[str], sizes: list[int], capacity: Capacity | None = None,
                 caps: Caps | None = None) -> Assignment:
    """Moves only the departed peers' shards to the survivors: largest first, each to the
    least-loaded survivor (by capacity) with room under its cap; one that fits nowhere becomes
    unassigned."""
    survivors = [p for p in assign if p not in gone]
    if not survivors:
        raise ValueError("no surviving peers to take the shards")
    out: Assignment = {p: list(assign[p]) for p in survivors}
    _place(out, [s for p in assign if p in gone for s in assign[p]], sizes, survivors, _weights(survivors, capacity),
           caps or {})
    return {p: sorted(v) for p, v in out.items()}


def add_peers(assign: Assignment, new: list[str], sizes: list[int], capacity: Capacity | None = None,
              caps: Caps | None = None) -> Assignment:
    """Adds joiners: first the unassigned shards are placed (largest first, least-loaded peer
    with room), then shards move from the most-loaded peer (by capacity) to the peer they
    balance best while the move lowers the weighted imbalance (sum of held^2 / capacity) and
    the taker has room; a donor keeps at least one shard. Shards held elsewhere stay put."""
    out: Assignment = {p: list(v) for p, v in assign.items()}
    for p in new:
        out.setdefault(p, [])
    peers = list(out)
    w, lim = _weights(peers, capacity), caps or {}
    _place(out, unassigned(out, len(sizes)), sizes, peers, w, lim)
    h = {p: held(out, sizes, p) for p in peers}
    rank = {p: i for i, p in enumerate(peers)}
    for _ in range(len(sizes) * len(peers) + 1):  # each move lowers the potential; this bounds it anyway
        donor = max(peers, key=lambda p: (h[p] / w[p], -rank[p]))
        if len(out[donor]) <= 1:
            break
        move = None
        for s in sorted(out[donor], key=lambda i: (-sizes[i], i)):
            fits = [p for p in peers if p != donor and (lim.get(p, 0) <= 0 or lim[p] - h[p] >= sizes[s])]
            if not fits:
                continue
            taker = min(fits, key=lambda p: (2 * h[p] / w[p] + sizes[s] / w[p], rank[p]))
            gain = 2 * (h[donor] / w[donor] - h[taker] / w[taker]) - sizes[s] * (1 / w[donor] + 1 / w[taker])
            if gain > 1e-9 * max(1.0, h[donor] / w[donor]):
                move = (s, taker)
                break
        if move is None:
            break
        out[donor].remove(move[0])
        out[move[1]].append(move[0])
        h[donor] -= sizes[move[0]]
        h[move[1]] += sizes[move[0]]
    _place(out, unassigned(out, len(sizes)), sizes, peers, w, lim)  # a move may have freed room on a donor
    return {p: sorted(v) for p, v in out.items()}


# -- sample allocation: which samples each member trains on in a round -------------------------
# Each shard is read in passes (its own data epochs); pass e visits the shard in the order
# shard_order(..., e, shard). A cursor (pass, position) says where the committed rounds stopped.
Range = tuple[int, int, int, int]  # (shard id, pass, start, stop) in that pass's order
Cursor = tuple[int, int]  # (pass, position); a shard not yet read is at (1, 0)


def advance(cursors: dict[int, Cursor], ranges: list[Range], sizes: list[int]) -> None:
    """Moves the cursors past ``ranges`` (in order); a finished pass starts the next one."""
    for shard, epoch, _, stop in ranges:
        cursors[shard] = (epoch + 1, 0) if stop >= sizes[shard] else (epoch, stop)


def allocate(assign: Assignment, sizes: list[int], cursors: dict[int, Cursor], budget: int) -> dict[str, list[Range]]:
    """Gives each member ``budget`` samples from its own shards, continuing where the committed
    cursors stand: always from its least-read shard (lowest pass, then lowest id), starting the
    shard's next pass when one ends, so every round is full and shards advance evenly."""
    out: dict[str, list[Range]] = {}
    for peer, shards in assign.items():
        live = [s for s in shards if sizes[s] > 0]
        cur = {s: cursors.get(s, (1, 0)) for s in live}
        left, ranges = budget, []
        while left > 0 and live:
            s = min(live, key=lambda x: (cur[x][0], x))
            epoch, pos = cur[s]
            take = min(left, sizes[s] - pos)
            ranges.append((s, epoch, pos, pos + take))
            left -= take
            cur[s] = (epoch + 1, 0) if pos + take >= sizes[s] else (epoch, pos + take)
        out[peer] = ranges
    return out


def data_epoch(cursors: dict[int, Cursor], num_shards: int) -> int:
    """The pass every shard has reached (1 until each shard was read through once)."""
    return min((cursors.get(s, (1, 0))[0] for s in range(num_shards)), default=1)
