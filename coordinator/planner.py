"""Shard planning: cutting a training set into shards and giving shards to peers.

Pure functions. Shards are index sets over the task's training split. An assignment maps each
live peer to shard ids; every shard is held by at most one peer, and by exactly one unless the
peers' caps (``dml-peer --max-samples``) cannot hold it: such a shard is *unassigned* (nobody
trains on it) until a peer with room joins, never squeezed onto a peer past its cap.

Loads are weighted by *capacity* (measured samples/s; a peer twice as fast is given about twice
the samples) and bounded by each peer's limits: its sample cap, and its free cache space with the
shards' byte sizes (a shard a peer already caches costs it none, and goes to it when that keeps
the balance within one shard). The placement rules are in :mod:`dml.coordinator.placement`. The
first placement is largest-first to the peer most below its share; for shardings whose
order means something (``contiguous``, ``classes:K``) it gives each peer a run of consecutive
shard ids instead, so data kept in order, and a label group, stays on one peer. When a peer leaves,
only its shards move (largest first, each to the survivor with the most room relative to its
capacity, preferring one that caches it); when one joins, unassigned shards are placed first,
then the joiner takes shards from the most-loaded peers while that lowers the weighted imbalance,
and nothing else moves.
"""
from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from dml.common.sampling import MAX_LABELS, parse_sharding
from dml.common.spec import JobSpec
from dml.coordinator import placement
from dml.coordinator.placement import Assignment, CacheFree, Cached, Capacity, Caps

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


MAX_LABEL_COUNTS = 4096  # a --placement local take's label-count vector: at most this many labels
MAX_LOCAL_SAMPLES = (1 << 32) - 1  # a peer's own shard: positions travel as uint32 (SampleRange); no indices are cut


def local_data_problem(train_samples: int, label_counts: list[int]) -> str:
    """Why a peer's own data cannot be a shard of a ``--placement local`` job ("" when it can):
    at least one and at most MAX_LOCAL_SAMPLES samples, and label counts (when given: samples
    per label, index = label) bounded in length, none negative, summing to the sample count."""
    if train_samples < 1:
        return "its training set is empty"
    if train_samples > MAX_LOCAL_SAMPLES:
        return f"{train_samples:,} training samples; a peer's own shard holds at most {MAX_LOCAL_SAMPLES:,}"
    if len(label_counts) > MAX_LABEL_COUNTS:
        return f"{len(label_counts)} label counts; at most {MAX_LABEL_COUNTS} labels are counted"
    if label_counts and (min(label_counts) < 0 or sum(label_counts) != train_samples):
        return f"label counts summing to {sum(label_counts)} for {train_samples} training samples"
    return ""


def local_assignment(members: list[str], own: dict[str, int]) -> Assignment:
    """A ``--placement local`` job's placement: each member holds exactly its own data's shard
    (``own``: peer -> shard), and no other; nothing is ever moved between members."""
    return {m: [own[m]] for m in members}


# -- placement (see placement.py) -------------------------------------------------------------
def held(assign: Assignment, sizes: list[int], peer: str) -> int:
    """Samples a peer holds."""
    return sum(sizes[s] for s in assign.get(peer, []))


def unassigned(assign: Assignment, num_shards: int) -> list[int]:
    """Shards no peer holds (the caps left no room for them), ascending."""
    return placement.unassigned(assign, num_shards)


def _runs(sizes: list[int], peers: list[str], w: dict[str, float], caps: Caps, limits: dict) -> Assignment:
    """Consecutive shard ids per peer, in peer order, each peer's run as long (in shards) as its
    capped share of the samples (:func:`placement.targets`) is of the whole: shard s goes to the
    peer whose share of the count holds ``s + 1/2``. Counted in shards, not samples, so that runs of
    equal shards cut at the same places as groups of equal shards do (``classes:K``'s label
    groups), whatever the groups' sizes. A run over a limit (its cap, its free cache) gives back
    its last shards, which are then placed as :func:`placement.place` places them (or left
    unassigned). The caches do not reorder the runs: label purity first."""
    total, n = sum(sizes), len(sizes)
    target = placement.targets(total, peers, w, caps)
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
    board = placement.Board({p: [] for p in peers}, sizes, w, caps, **limits)
    for p in peers:
        run, k = out[p], 0
        while k < len(run) and board.fits(p, run[k]):
            board.give(p, run[k])
            k += 1
        spill.extend(run[k:])
    board.place(spill, peers)
    return board.out


def assign_shards(sizes: list[int], peers: list[str], capacity: Capacity | None = None,
                  caps: Caps | None = None, ordered: bool = False, cached: Cached | None = None,
                  shard_bytes: list[int] | None = None, cache_free: CacheFree | None = None) -> Assignment:
    """Initial assignment of shards ``0..len(sizes)-1`` to ``peers``, loads weighted by
    ``capacity``, no peer over its cap in ``caps`` nor its free cache in ``cache_free`` (bytes,
    with ``shard_bytes``; a shard it already caches in ``cached`` costs none); a shard that
    fits nowhere is left out.

    Default (:func:`placement.place`): largest shards first, each to a peer that caches it when
    that keeps it within one shard of its share, else to the peer with room most below its
    share; without caps or caches no peer's weighted load exceeds another's by more than the
    largest ``size / capacity``.
    ``ordered`` (for data whose order means something: ``contiguous``, ``classes:K``): each
    peer, in the order given, takes a run of consecutive shard ids, as many shards (within one)
    as its capacity's share of the samples is of the whole (a run that would pass its limits hands
    its last shards on to be placed as above). Label purity over balance: a member's round
    trains the same number of samples whatever it holds, so holding more only means it reads
    its shards in fewer passes."""
    if not peers:
        raise ValueError("cannot assign shards to no peers")
    limits = dict(cached=cached, shard_bytes=shard_bytes, cache_free=cache_free)
    if not ordered:
        return placement.place(sizes, peers, capacity, caps, **limits)
    out = _runs(sizes, peers, placement.weights(peers, capacity), caps or {}, limits)
    return {p: sorted(v) for p, v in out.items()}


def ordered_sharding(sharding: str) -> bool:
    """Whether a sharding's shard ids are in an order worth keeping together on a peer."""
    return parse_sharding(sharding)[0] in ("contiguous", "classes")


def remove_peers(assign: Assignment, gone: set[str], sizes: list[int], capacity: Capacity | None = None,
                 caps: Caps | None = None, cached: Cached | None = None, shard_bytes: list[int] | None = None,
                 cache_free: CacheFree | None = None) -> Assignment:
    """Moves only the departed peers' shards to the survivors (:func:`placement.leave`): largest
    first, each to a survivor that caches it (within one shard of its share), else to the one
    with room most below its share (by capacity); one that fits nowhere becomes unassigned."""
    return placement.leave(assign, gone, sizes, capacity, caps, cached, shard_bytes, cache_free)


def add_peers(assign: Assignment, new: list[str], sizes: list[int], capacity: Capacity | None = None,
              caps: Caps | None = None, cached: Cached | None = None, shard_bytes: list[int] | None = None,
              cache_free: CacheFree | None = None) -> Assignment:
    """Adds joiners (:func:`placement.join`): first the unassigned shards are placed, then the
    joiners take shards from the most-loaded peers (by capacity), preferring shards they cache,
    while a move lowers the weighted imbalance (sum of held^2 / capacity) and the joiner has
    room; a donor keeps at least one shard. No shard moves between the peers already there."""
    return placement.join(assign, new, sizes, capacity, caps, cached, shard_bytes, cache_free)


# -- sample allocation: which samples each member trains on in a round -------------------------
# Each shard is read in passes (its own data epochs); pass e visits the shard in the order
# shard_order(..., e, shard). A cursor (pass, position) says where the committed rounds stopped.
Range = tuple[int, int, int, int]  # (shard id, pass, start, stop) in that pass's order
Cursor = tuple[int, int]  # (pass, position); a shard not yet read is at (1, 0)


def advance(cursors: dict[int, Cursor], ranges: list[Range], sizes: list[int]) -> None:
    """Moves the cursors past ``ranges`` (in order); a finished pass starts the next one."""
    for shard, epoch, _, stop in ranges:
        cursors[shard] = (epoch + 1, 0) if stop >= sizes[shard] else (epoch, stop)


def allocate(assign: Assignment, sizes: list[int], cursors: dict[int, Cursor], budget: int,
             workers: Mapping[str, int] | None = None) -> dict[str, list[Range]]:
    """Gives each member ``budget`` samples (times its ``workers``, a multi-worker host's count,
    1 when not listed) from its own shards, continuing where the committed cursors stand: always
    from its least-read shard (lowest pass, then lowest id), starting the shard's next pass when
    one ends, so every round is full and shards advance evenly."""
    out: dict[str, list[Range]] = {}
    for peer, shards in assign.items():
        live = [s for s in shards if sizes[s] > 0]
        cur = {s: cursors.get(s, (1, 0)) for s in live}
        left, ranges = budget * (workers or {}).get(peer, 1), []
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
