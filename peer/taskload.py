"""Which :class:`dml.Task` a job runs on this peer: a built-in task, ``package.module:NAME``
imported from this peer's own environment, or task code sent with the job.

Task code (``JobSpec.task`` ``mytask.py`` or ``mypkg/``, ``JobSpec.task_digest`` its bundle's
sha256) runs only on a peer started with ``--allow-job-code``; any other peer declines the job
(:class:`Declined`). The bundle is fetched from the coordinator by digest, verified, cached
(:class:`CodeCache`), extracted with every bound checked again (the bytes are treated as
hostile) and imported under its own module name; a later job whose bundle has the same module
name gets a fresh module of its own. Failures of the user's code are :class:`TaskError`s that
carry the first lines of its traceback, the user's frames only.
"""
from __future__ import annotations

import importlib.util
import logging
import os
import pathlib
import shutil
import sys
import tempfile
import threading
import types
import uuid
from collections.abc import Callable
from typing import TYPE_CHECKING

from dml.common import taskcode
from dml.common.spec import task_kind
from dml.common.task import Context, Task
from dml.common.tasks import get_task, is_builtin
from dml.peer import datausage, outer
from dml.peer.client import DatasetMissing, TaskCodeMissing
from dml.peer.datacache import Counters, DatasetError, StoreSource, manifest_of
from dml.peer.trainer import TaskError, Trainer, user_frames

if TYPE_CHECKING:
    from dml.v1 import types_pb2

    from dml.peer.runner import Peer

log = logging.getLogger(__name__)

ALLOW_HINT = "this peer does not run job code; start it with --allow-job-code (env DML_ALLOW_JOB_CODE=1)"


class Declined(Exception):
    """This peer will not run the job (for instance job code it is not allowed to run); the
    message says why, and the coordinator shows it in the job's status."""


def resolve(name: str) -> Task:
    """The task ``name`` refers to, built-in or ``package.module:NAME`` from this peer's
    environment. Raises :class:`TaskError` with a message when it cannot be found or is not a
    ``dml.Task``."""
    if is_builtin(name):
        try:
            return get_task(name)
        except ValueError as e:
            raise TaskError(str(e)) from None
    module, sep, attr = name.partition(":")
    if not sep or not module or not attr:
        raise TaskError(f"task {name!r} is neither a built-in task nor package.module:NAME")
    try:
        mod = importlib.import_module(module)
    except Exception as e:  # noqa: BLE001 - the user's module may raise anything
        raise TaskError(f"importing {module} raised {type(e).__name__}: {e}{user_frames(e)}") from e
    return _task_of(mod, attr, module)


def _task_of(mod: types.ModuleType, attr: str, what: str) -> Task:
    task = getattr(mod, attr, None)
    if not isinstance(task, Task):
        raise TaskError(f"{what} has no dml.Task named {attr!r}"
                        + (f" (found a {type(task).__name__})" if task is not None else ""))
    return task


def load_task(peer: Peer, job_id: str, spec: types_pb2.JobSpec) -> Task:
    """The Task of job ``job_id`` on this peer. Raises :class:`Declined` for task code on a peer
    without ``--allow-job-code``, :class:`TaskError` when the task cannot be found, fetched or
    imported (the message says why, with the user's traceback lines)."""
    if task_kind(spec.task, spec.task_digest) != "code":
        return resolve(spec.task)
    if not peer.config.allow_job_code:
        raise Declined(ALLOW_HINT)
    try:
        ref = taskcode.parse_ref(spec.task)
    except taskcode.BundleError as e:
        raise TaskError(str(e)) from None
    digest = spec.task_digest
    try:
        return peer.code_cache.task(ref, digest, lambda: peer.client.fetch_task_code(peer.peer_id, job_id, digest))
    except TaskCodeMissing as e:
        raise TaskError(f"cannot fetch the task code of {ref}: {e}") from None


def dataset_source(peer: Peer, job_id: str, name: str) -> StoreSource:
    """Dataset ``name`` of the coordinator's store as job ``job_id`` reads it on this peer: its
    manifest fetched and checked, its folder in the peer's cache (``--cache-dir``) opened (the
    chunks a previous run left hashed again), nothing else fetched yet: the task's reads fetch
    what they touch. Raises :class:`Declined` when it cannot be had (unknown, or a manifest that
    fails its checks)."""
    cache = peer.data_cache
    counters = Counters()
    try:
        manifest = manifest_of(peer.client.fetch_manifest(name))
        ds = cache.open(manifest, peer.client.fetch_chunk, counters)
    except (DatasetError, DatasetMissing) as e:
        raise Declined(f"cannot fetch dataset {name}: {e}") from None
    held = ds.present_count()
    total = sum(len(f.chunks) for f in manifest.files)
    log.info("peer %s job %s: dataset %s (%s) at %s: %d of its %d chunks cached here%s; the rest is fetched as "
             "the task reads it", peer.peer_id, job_id, name, manifest.digest[:12], ds.root, held, total,
             f" ({counters.damaged} damaged, forgotten)" if counters.damaged else "")
    return StoreSource(ds, counters)


def local_dir(peer: Peer, name: str) -> pathlib.Path:
    """The PATH of this peer's ``--data NAME=PATH`` for a ``--placement local`` job (its tasks'
    ``ctx.data_dir``); :class:`Declined` when it offers no dataset by that name or its PATH is gone."""
    path = dict(peer.config.local_data).get(name)
    if path is None:
        raise Declined(f"this peer offers no local dataset {name!r} (dml-peer --data {name}=PATH)")
    if not path.exists():
        raise Declined(f"local dataset {name}: {path} is gone")
    return path


def make_trainer(peer: Peer, job_id: str, spec: types_pb2.JobSpec) -> Trainer:
    """The trainer of job ``job_id`` on this peer: its task, seeded by the job, at the job's
    learning rate, on the peer's device, its data read under the peer's ``--data-dir`` (or, for
    a job on a dataset of the coordinator's store, through :func:`dataset_source`; for a
    ``--placement local`` job, at the PATH of this peer's ``--data NAME=PATH``), with the
    job's proximal term and its outer optimizer (whose state is then one of the trainer's
    ``state_parts``), and the job's data usage (:mod:`dml.peer.datausage`: the source's counters,
    its cached shards). The one place a peer builds a job's trainer. With ``--sync grads`` or a
    proximal term it keeps real gradients (no update fused into backward): the ring averages
    them each step, or the term is added to them. Raises what :func:`load_task` raises."""
    local = local_dir(peer, spec.local_data) if spec.placement == "local" else None  # declined before any load
    task = load_task(peer, job_id, spec)
    source = dataset_source(peer, job_id, spec.dataset) if spec.dataset else None
    usage = datausage.JobUsage(datausage.STORE if source is not None else datausage.LOCAL, spec.num_shards,
                               counters=source.counters if source is not None else Counters(), store=source,
                               job_id=job_id)
    if local is not None:
        data_dir = local
    elif source is not None:
        data_dir = source.root
    else:
        data_dir = peer.config.data_dir if peer.config.data_dir is not None else pathlib.Path.cwd()
    ctx = Context(data_dir=data_dir, seed=spec.seed, job_id=job_id, peer_id=peer.peer_id, source=source)
    try:
        trainer = Trainer(task, spec.seed, spec.learning_rate, peer.config.device, ctx=ctx,
                          fuse=spec.sync != "grads" and spec.prox_mu == 0, prox_mu=spec.prox_mu,
                          precision=spec.precision or "fp32")
    except TaskError as e:
        if source is not None:
            source.close()
        if isinstance(e.__cause__, (DatasetError, DatasetMissing)):  # the store's bytes, not the task's fault
            raise Declined(f"cannot fetch dataset {spec.dataset}: {e.__cause__}") from None
        raise
    trainer.average_state = spec.optimizer_state == "average"
    usage.rows = trainer.train_data.size
    if datausage.load_shards(usage):  # a previous run of this peer on the same cache was given these
        log.info("peer %s job %s: cached shards of an earlier run: %s", peer.peer_id, job_id,
                 datausage.cached_shards(usage))
    datausage.attach(trainer, usage)  # its reports carry it (peer.datausage)
    if spec.outer_optimizer not in ("", "none"):
        trainer.state_parts[outer.PART] = outer.OuterOptimizer(spec.outer_optimizer, spec.outer_lr,
                                                               spec.outer_momentum, trainer.numel)
    return trainer


# -- task code ---------------------------------------------------------------------------------
# Modules imported from bundles, by import name: (digest, module). Guarded by _IMPORT_LOCK, as is
# every change of sys.modules made here.
_IMPORTED: dict[str, tuple[str, types.ModuleType]] = {}
_IMPORT_LOCK = threading.Lock()


class CodeCache:
    """Task code bundles this peer fetched, by digest: ``<digest>.zip`` and its extracted
    folder ``<digest>/`` under ``folder`` (None: a temp dir made at first use and removed by
    :meth:`close`). Written atomically, so peers may share a folder."""

    def __init__(self, folder: pathlib.Path | None = None) -> None:
        self._folder = folder
        self._tmp: str | None = None
        self._lock = threading.Lock()

    @property
    def folder(self) -> pathlib.Path:
        """Where bundles are kept (made on first use)."""
        with self._lock:
            if self._folder is None:
                self._tmp = tempfile.mkdtemp(prefix="dml-code-")
                self._folder = pathlib.Path(self._tmp)
            self._folder.mkdir(parents=True, exist_ok=True)
            return self._folder

    def bundle(self, digest: str, fetch: Callable[[], bytes]) -> bytes:
        """The bundle of ``digest``: from the cache if it is there and intact, else ``fetch()``-ed
        and kept. TaskError when the fetched bytes are not that digest's."""
        path = self.folder / f"{digest}.zip"
        try:
            data = path.read_bytes()
            if taskcode.digest_of(data) == digest:
                return data
            log.warning("cached task code %s does not match its digest; fetching it again", path)
        except FileNotFoundError:
            pass
        data = fetch()
        got = taskcode.digest_of(data)
        if got != digest:
            raise TaskError(f"the task code the coordinator sent has sha256 {got}, not the job's {digest}")
        tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}")
        try:
            tmp.write_bytes(data)
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)
        return data

    def unpacked(self, ref: taskcode.CodeRef, digest: str, data: bytes) -> pathlib.Path:
        """The folder holding bundle ``digest`` extracted (each bound checked): made once."""
        dest = self.folder / digest
        if dest.is_dir():
            return dest
        tmp = self.folder / f".{digest}.{uuid.uuid4().hex}"
        try:
            taskcode.extract(data, tmp, ref)
        except taskcode.BundleError as e:
            shutil.rmtree(tmp, ignore_errors=True)
            raise TaskError(f"task code {digest[:12]} is refused: {e}") from None
        try:
            os.rename(tmp, dest)
        except OSError:
            shutil.rmtree(tmp, ignore_errors=True)
            if not dest.is_dir():  # not another peer's extraction that got there first
                raise
        return dest

    def task(self, ref: taskcode.CodeRef, digest: str, fetch: Callable[[], bytes]) -> Task:
        """The Task named ``ref`` in bundle ``digest`` (fetched with ``fetch`` unless cached),
        imported under its own module name. TaskError says what failed."""
        root = self.unpacked(ref, digest, self.bundle(digest, fetch))
        return _task_of(import_bundle(ref, digest, root), ref.attr, str(ref).partition(":")[0])

    def close(self) -> None:
        """Removes the temp folder, if this cache made one."""
        if self._tmp is not None:
            shutil.rmtree(self._tmp, ignore_errors=True)


def bundled_task(task: str, digest: str, root: pathlib.Path) -> Task:
    """The Task ``task`` (a task-code reference) names in bundle ``digest``, already fetched,
    verified and extracted at ``root`` by this peer (a multi-worker host's workers import that
    copy: peer/worker.py). TaskError when it cannot be imported or is no ``dml.Task``."""
    try:
        ref = taskcode.parse_ref(task)
    except taskcode.BundleError as e:
        raise TaskError(str(e)) from None
    return _task_of(import_bundle(ref, digest, root), ref.attr, str(ref).partition(":")[0])


def import_bundle(ref: taskcode.CodeRef, digest: str, root: pathlib.Path) -> types.ModuleType:
    """The module ``ref`` names in the bundle extracted at ``root``, imported under its own
    name. The same bundle is imported once per process; another bundle of the same name replaces
    the first one's modules in ``sys.modules`` (objects made from them keep working). A name
    that belongs to a module of this peer's own is refused (TaskError)."""
    name = ref.module
    with _IMPORT_LOCK:
        prev = _IMPORTED.get(name)
        if prev is not None and prev[0] == digest and sys.modules.get(name) is prev[1]:
            return prev[1]
        if prev is None and _taken(name):
            raise TaskError(f"task module {name!r} has the name of a module this peer already has: rename the task")
        _drop(name)
        location = root / ref.entry
        search = [str(root / name)] if ref.package else None
        spec = importlib.util.spec_from_file_location(name, location, submodule_search_locations=search)
        if spec is None or spec.loader is None:
            raise TaskError(f"cannot import {ref}: no loader for {location.name}")
        mod = importlib.util.module_from_spec(spec)
        sys.modules[name] = mod
        try:
            spec.loader.exec_module(mod)
        except (Exception, SystemExit) as e:  # noqa: BLE001 - the user's module may raise anything
            _drop(name)
            _IMPORTED.pop(name, None)
            raise TaskError(f"importing {str(ref).partition(':')[0]} raised {type(e).__name__}: {e}"
                            f"{user_frames(e, root)}") from e
        _IMPORTED[name] = (digest, mod)
        log.info("imported task code %s as module %s", digest[:12], name)
        return mod


def _taken(name: str) -> bool:
    """Whether ``name`` is a module this process has, or could import from its own environment.
    A file in the working directory does not count: ``python -m`` (as ``dml local`` starts peers)
    puts it first on sys.path, and it is often the very task file the job sent."""
    if name in sys.modules:
        return True
    try:
        spec = importlib.util.find_spec(name)
    except (ImportError, ValueError):
        return False
    if spec is None:
        return False
    if spec.submodule_search_locations:  # a package: where its folder is
        folder = next(iter(spec.submodule_search_locations), "")
        home = pathlib.Path(folder).resolve().parent if folder else None
    else:
        home = pathlib.Path(spec.origin).resolve().parent if spec.has_location and spec.origin else None
    return home != pathlib.Path.cwd().resolve()


def _drop(name: str) -> None:
    """Removes module ``name`` and its submodules from ``sys.modules``."""
    for key in [k for k in sys.modules if k == name or k.startswith(name + ".")]:
        del sys.modules[key]
    importlib.invalidate_caches()
