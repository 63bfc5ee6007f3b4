"""Who is at fault when members cannot reach each other: pure rules, no I/O.

A member that cannot reach a ring neighbour reports it (``ReportFailure`` of kind UNREACHABLE).
One report does not say which side is broken: the suspect's address may be dead to everyone,
or only the link between the two may be (a one-way fault: B cannot reach X, while X and
everyone else can). So a job keeps every broken link its members reported (reporter, suspect
and the direction the data flows) and decides from all of them:

- the same peer named by two distinct reporters: nobody can reach it, hold *it* out; the
  coordinator counts as the second when its own connect to the suspect's address is refused
  (nothing listens there: the peer was killed or its address is wrong), so a dead peer costs one
  re-issued round, not two;
- the same reporter failing with two distinct peers: it cannot reach anyone, hold *the reporter*
  out;
- otherwise re-form the ring in an order that avoids every broken link (:func:`ring_order`),
  evicting nobody: a one-way fault costs one re-issued round;
- when no such order exists (two members, or links broken all around), hold the suspect out.

Gossip jobs have no ring to re-form: their members route around partners they cannot reach
themselves (``peer.gossip_step``), and their closing ring round is judged as any. A dead
address therefore costs exactly one hold-out (one re-issue when the coordinator's connect is
refused, two when it times out: the second member to try it confirms), and a one-way fault none. Heartbeat leases are not judged here.
"""
from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from dml.coordinator.records import BrokenLink

Edge = tuple[str, str]  # (sender, receiver): data flows from the first to the second
SEARCH_BUDGET = 20_000  # partial orders tried by ring_order before it gives up


def ring_order(members: Sequence[str], bad: Iterable[Edge], budget: int = SEARCH_BUDGET) -> list[str] | None:
    """A ring of all ``members`` (each sends to the next, the last to the first) using no edge of
    ``bad``, or None if there is none (or none found within ``budget`` steps).

    The order is the input's when it is already good; otherwise the first good one in the
    lexicographic order of the members' input positions, starting from the first member (a ring
    has no start, so fixing it loses nothing): as close to registration order as the broken links
    allow, and the same for the same input. A ring of one member has no edge."""
    order = list(members)
    n = len(order)
    avoid = {(a, b) for a, b in bad if a != b}
    if n <= 1:
        return order
    if all((order[i], order[(i + 1) % n]) not in avoid for i in range(n)):
        return order
    path, used = [order[0]], {order[0]}
    steps = 0

    def extend() -> bool:
        nonlocal steps
        steps += 1
        if steps > budget:
            return False
        if len(path) == n:
            return (path[-1], path[0]) not in avoid
        last = path[-1]
        for cand in order:
            if cand in used or (last, cand) in avoid:
                continue
            path.append(cand)
            used.add(cand)
            if extend():
                return True
            path.pop()
            used.discard(cand)
            if steps > budget:
                return False
        return False

    return list(path) if extend() else None


def link_of(members: Sequence[str], reporter: str, suspect: str) -> Edge:
    """The directed link a report blames, by the ring ``members`` (in order) the round ran in:
    the reporter's successor is blamed for the reporter's sending (reporter -> suspect), its
    predecessor for its receiving (suspect -> reporter). In a ring of two the successor is also
    the predecessor: sending is taken."""
    n = len(members)
    if reporter in members and n > 1:
        i = list(members).index(reporter)
        if members[(i + 1) % n] != suspect and members[(i - 1) % n] == suspect:
            return suspect, reporter
    return reporter, suspect


@dataclass(frozen=True)
class Verdict:
    """What to do about a job's broken links: hold ``hold_out`` out (because of ``witnesses``'
    reports, for ``reason``), or, when no one is held out, run the ring in ``ring`` order."""

    hold_out: str = ""
    witnesses: tuple[str, ...] = ()
    reason: str = ""
    ring: tuple[str, ...] = ()


def judge(members: Sequence[str], links: Sequence[BrokenLink], reporter: str, suspect: str,
          refused: str = "") -> Verdict:
    """Decides after ``reporter``'s report naming ``suspect`` (already in ``links``, which hold
    every broken link reported among ``members``). ``refused``: the coordinator's own finding
    that nothing listens at the suspect's address (a second witness), "" when it has none. See
    the module's rules."""
    if refused:
        return Verdict(suspect, (reporter,), f"{reporter} could not reach it, and {refused}")
    live = set(members)
    links = [lk for lk in links if lk.reporter in live and lk.suspect in live]
    namers = sorted({lk.reporter for lk in links if lk.suspect == suspect})
    if len(namers) >= 2:
        return Verdict(suspect, tuple(namers), f"unreachable: {', '.join(namers)} could not reach it")
    named = sorted({lk.suspect for lk in links if lk.reporter == reporter})
    if len(named) >= 2:
        return Verdict(reporter, (reporter,),
                       f"it could not reach {', '.join(named[:-1])} nor {named[-1]}, which others reach")
    order = ring_order(members, [(lk.sender, lk.receiver) for lk in links])
    if order is not None:
        return Verdict(ring=tuple(order))
    return Verdict(suspect, (reporter,),
                   f"unreachable from {reporter}, and no ring of the {len(members)} members avoids the broken links")
