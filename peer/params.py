"""The parameters a peer holds for its job, with the trainer that holds them: ``committed``, what
every member agreed on at the start of the current round, and ``tentative``, the result of the
round this peer last finished (reported, not yet known to be committed). Each holds the training
state with the parameters (a copy of every part of ``trainer.state_parts``: the optimizer, and
whatever else holds state; :mod:`peer.trainstate`), so a round restarts from exactly the point it
started from. Thread-safe: the exchange server serves them to joiners while the round loop
changes them. Rules: docs/architecture.md."""
from __future__ import annotations

import hashlib
import logging
import pathlib
import threading
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from dml.aggregation.averaging import digest
from dml.peer.diskcopy import DiskCopy

if TYPE_CHECKING:
    from dml.peer.trainer import Trainer

log = logging.getLogger(__name__)


@dataclass
class Snapshot:
    """Parameters and training state of one round of one job."""

    job_id: str
    round: int
    params: np.ndarray | DiskCopy  # a DiskCopy only for a committed snapshot (--committed-copy disk)
    digest: str
    live: bool = False  # params is the trainer's own buffer, not a copy
    state: dict[str, Any] | None = None  # the training state (a copy, never the trainer's own)


@dataclass(frozen=True)
class Served:
    """What :meth:`ParamStore.serve` hands a joiner: a round's parameters as a state_dict file
    and, when asked for, its training state (``trainstate.to_bytes``) with its sha256."""

    round: int
    digest: str
    model: bytes | memoryview
    state: bytes | None = None
    state_sha256: str = ""


@dataclass(frozen=True)
class Start:
    """What :meth:`ParamStore.begin` found for a round's starting point."""

    ready: bool  # the committed snapshot is the starting point
    in_place: bool  # the trainer already holds it (our tentative result was promoted)
    dropped: bool  # a tentative result that is not the starting point was dropped
    promoted: bool = False  # our tentative result was promoted: the trainer's state is the starting one


class ParamStore:
    """The job's trainer and its committed and tentative snapshots. Only the round loop changes
    them; the exchange server reads them (:meth:`serve`) from its own threads."""

    def __init__(self, disk_dir: pathlib.Path | None = None) -> None:
        self._disk_dir = disk_dir  # --committed-copy disk: committed parameters in a file here (peer.diskcopy)
        self._lock = threading.Lock()
        self._trainer: Trainer | None = None
        self._job_id = ""
        self._committed: Snapshot | None = None
        self._tentative: Snapshot | None = None
        self._spare: dict[str, Any] | None = None  # a state no snapshot holds any more, to capture into

    @property
    def committed(self) -> Snapshot | None:
        """The parameters of the last round known to be committed."""
        return self._committed

    def trainer_for(self, job_id: str) -> Trainer | None:
        """The trainer if it trains ``job_id``. Read without the lock: only the caller, the
        round loop, changes it."""
        return self._trainer if self._job_id == job_id else None

    def start(self, job_id: str, trainer: Trainer, committed: Snapshot | None) -> None:
        """A new trainer for ``job_id``, starting from ``committed`` (None: nothing committed yet)."""
        with self._lock:
            self._tentative, self._spare = None, None  # the old job's: never promoted into this one
            try:
                cold = self._cold(committed) if committed is not None else None
            except BaseException:  # the copy could not be written: no trainer, nothing committed
                self._trainer, self._job_id, self._committed = None, "", None
                raise
            self._trainer, self._job_id, self._committed = trainer, job_id, cold

    def restore_into(self, trainer: Trainer) -> bool:
        """Loads the committed parameters into ``trainer`` (a round re-issued, or this peer's
        last one dropped). A copy on disk is checked against its digest first-hand after the
        read: a write the kernel accepted can still be lost (writeback failed, the page dropped,
        the file's blocks read back as they were), and the parameters a peer trains from must be
        the committed ones, bit for bit. False when they are not: the snapshot is dropped (never
        served or restored again) and the caller downloads the round from a member."""
        with self._lock:
            snap = self._committed
            if snap is None:
                raise ValueError("no committed snapshot to restore")
            trainer.set_params(snap.params)
            if not isinstance(snap.params, DiskCopy):
                return True
            got = trainer.round_digest(trainer.params_view()[0], snap.state, like=snap.digest)
            if got == snap.digest:
                return True
            log.error("job %s round %d: the committed copy read back from disk has digest %s, not %s; dropping "
                      "it and downloading the round from a member", snap.job_id, snap.round, got, snap.digest)
            self._committed = None
            return False

    def spare_state(self) -> dict[str, Any] | None:
        """A training state no snapshot holds any more (taken: the caller captures into it, so
        rounds allocate no new state), or None."""
        with self._lock:
            spare, self._spare = self._spare, None
            return spare

    def clear(self) -> None:
        """Forgets the trainer and both snapshots (the peer was evicted: they may be stale)."""
        with self._lock:
            self._trainer, self._job_id, self._committed, self._tentative = None, "", None, None
            self._spare = None

    def set_tentative(self, snap: Snapshot) -> None:
        """The result of the round this peer just finished."""
        with self._lock:
            self._tentative = snap

    def begin(self, start: int, want: str) -> Start:
        """Settles the starting point of a round that starts from round ``start``'s parameters
        (digest ``want``, "" when the plan names none). A tentative result that is that round
        proves it committed and is promoted; any other tentative result is dropped."""

        def good(snap: Snapshot | None) -> bool:
            return snap is not None and snap.round == start and (not want or snap.digest == want)

        in_place = dropped = promoted = False
        with self._lock:
            tent = self._tentative
            if good(tent):  # our last round committed
                assert tent is not None
                old = self._committed
                self._committed = self._promote(tent)
                if old is not None and old.state is not None and old.state is not tent.state:
                    self._spare = old.state
                self._tentative, in_place, promoted = None, tent.live, True
            else:  # it did not commit (or not with our parameters), or it is older than needed
                dropped = tent is not None
                if tent is not None and tent.state is not None:
                    self._spare = tent.state
                self._tentative = None
            return Start(ready=good(self._committed), in_place=in_place, dropped=dropped, promoted=promoted)

    def _promote(self, tent: Snapshot) -> Snapshot:
        """The committed snapshot for a tentative one: a copy if it is the live buffer, made into
        the old committed array (or file) when it fits (no new allocation). Called under the lock."""
        if not tent.live:
            return self._cold(tent)
        old = self._committed
        if self._disk_dir is not None:
            return Snapshot(tent.job_id, tent.round, self._on_disk(tent.params), tent.digest, state=tent.state)
        if old is not None and isinstance(old.params, np.ndarray) and old.params.shape == tent.params.shape \
                and not np.shares_memory(old.params, tent.params):
            np.copyto(old.params, tent.params)
            params = old.params
        else:
            params = tent.params.copy()
        return Snapshot(tent.job_id, tent.round, params, tent.digest, state=tent.state)

    def _on_disk(self, params: np.ndarray | DiskCopy) -> DiskCopy:
        """``params`` in a file: the old committed file rewritten when it fits, else a new one.
        Called under the lock, with ``_disk_dir`` set."""
        if isinstance(params, DiskCopy):
            return params
        old = self._committed
        assert self._disk_dir is not None
        if old is not None and isinstance(old.params, DiskCopy) and old.params.size == params.size:
            try:
                old.params.write(params)
            except BaseException:
                self._committed = None  # half overwritten: never serve or restore from it
                raise
            return old.params
        return DiskCopy.of(self._disk_dir, params)

    def _cold(self, snap: Snapshot) -> Snapshot:
        """A committed snapshot as this store keeps it: with ``--committed-copy disk`` its
        parameters move to a file (the array handed in is then no longer referenced here)."""
        if self._disk_dir is None or isinstance(snap.params, DiskCopy):
            return snap
        if snap.live:
            raise ValueError("a committed snapshot must not be the live buffer")
        return Snapshot(snap.job_id, snap.round, self._on_disk(snap.params), snap.digest, state=snap.state)

    def adopt(self, job_id: str, rnd: int, params: np.ndarray, want: str,
              state: dict[str, Any] | None = None, got: str | None = None) -> bool:
        """Makes downloaded ``params`` (and training ``state``) round ``rnd``'s committed snapshot
        if their digest (``got``, computed by the caller when the digest covers the state; by
        default the parameters') is ``want``."""
        if (got if got is not None else digest(params, like=want)) != want:
            return False
        with self._lock:
            self._committed = self._cold(Snapshot(job_id, rnd, params, want, state=state))
        return True

    def keep_own(self, job_id: str, rnd: int) -> None:
        """Commits the trainer's own parameters as round ``rnd``'s (a gossip job's closing ring
        round starts from them), unless that round is held already or a tentative result is."""
        with self._lock:
            trainer = self._trainer
            held = self._committed is not None and self._committed.job_id == job_id and self._committed.round == rnd
            if trainer is None or held or self._tentative is not None:
                return
            params = trainer.params()
            state = trainer.capture_state()
            self._committed = self._cold(Snapshot(job_id, rnd, params, trainer.round_digest(params, state), state=state))

    def serve(self, job_id: str, rnd: int, training_state: bool = False) -> Served | None:
        """Round ``rnd`` of ``job_id`` (0: the latest held) as a state_dict file and, with
        ``training_state``, its training state, or None (also when the state is asked for and the
        snapshot holds none). Serialised under the lock: the tentative snapshot is the live
        buffer, which the next round only touches after :meth:`begin` (which takes the lock) has
        moved it aside."""
        with self._lock:
            trainer = self._trainer if self._job_id == job_id else None
            cands = [s for s in (self._tentative, self._committed) if s is not None and s.job_id == job_id]
            if trainer is None:
                return None
            for snap in cands:
                if rnd in (0, snap.round):
                    model = trainer.state_dict_bytes(np.asarray(snap.params))  # a committed file: read whole
                    if not training_state:
                        return Served(snap.round, snap.digest, model)
                    if snap.state is None:
                        return None
                    state = trainer.state_bytes(snap.state, job_id=job_id, round=snap.round)
                    return Served(snap.round, snap.digest, model, state, hashlib.sha256(state).hexdigest())
        return None
