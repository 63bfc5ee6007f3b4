"""The job specification as a plain dataclass, its defaults and its validation. Importing it loads
no numpy (the job client uses it); validation imports the task registry when it runs."""
from __future__ import annotations

import re
from dataclasses import asdict, dataclass, fields, replace
from typing import Any

from dml.v1 import types_pb2

AGGREGATIONS = ("ring", "gossip")
CODECS = ("fp32", "bf16", "fp16", "int8")  # aggregation.codecs.CODEC_NAMES; checked by a test
DATA_PLANES = ("auto", "shm", "tcp", "grpc", "torch")  # peer.link.DATA_PLANES, and peer.torchplane's
# aggregation.topology.TOPOLOGY_NAMES; checked by a test. Named here so that the job client, which
# needs the names for its flags, loads no numpy.
TOPOLOGY_NAMES = ("uniform", "ring", "exponential")
SYNCS = ("params", "grads")
OPTIMIZER_STATES = ("local", "average")
OUTER_OPTIMIZERS = ("none", "sgd", "nesterov")
MAX_PROX_MU = 1e6
# Validation bounds (the CLI's range checks name the same ones).
MAX_ROUNDS = 1_000_000
MAX_SAMPLES_PER_ROUND = 10**8  # local_steps x batch_size
MAX_LEARNING_RATE = 100.0
MIN_GOSSIP_TIMEOUT_MS = 100
MAX_GOSSIP_TIMEOUT_MS = 600_000
MAX_PEER_GRACE_S = 30 * 24 * 3600
MAX_MAX_PEERS = 100_000
DEFAULT_POOL = "default"  # the pool of a peer started without --pool
PRECISIONS = ("fp32", "bf16", "fp16")  # --precision: autocast's dtype (parameters and the exchange stay fp32)
PLACEMENTS = ("shared", "local")  # where a job's data is: one training set cut into shards, or each peer's own
_POOL = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")


class InvalidSpec(ValueError):
    """A job spec a user got wrong; the message says what and how to fix it."""


@dataclass(frozen=True)
class JobSpec:
    """What a job trains and how. Defaults train ``digits`` to its best accuracy in about a minute."""

    task: str = "digits"
    rounds: int = 200
    local_steps: int = 10
    batch_size: int = 0  # 0: the task's own (else 32), fixed on the job when the first peer takes it
    learning_rate: float = 0.0  # 0: the task's own (the optimizer it builds); else every param group's
    min_peers: int = 1
    sharding: str = "iid"
    aggregation: str = "ring"
    seed: int = 0
    num_shards: int = 24
    checkpoint_every_rounds: int = 10
    peer_grace_s: int = 300
    codec: str = "fp32"
    data_plane: str = "auto"
    eval_every_rounds: int = 1
    gossip_topology: str = "uniform"
    gossip_timeout_ms: int = 10_000
    task_digest: str = ""  # sha256 of the task code sent with the job; "" for built-in and module tasks
    sync: str = "params"
    optimizer_state: str = "local"
    outer_optimizer: str = "none"
    outer_lr: float = 0.7
    outer_momentum: float = 0.9
    prox_mu: float = 0.0
    min_shard_samples: int = 1
    dataset: str = ""  # a dataset of the coordinator's store (dml data put); "" for none
    pool: str = ""  # run only on peers of this pool (dml-peer --pool); "" for the default pool
    max_peers: int = 0  # the most members at once; 0 for no limit (beyond num_shards)
    placement: str = "shared"  # "shared": one training set cut into shards; "local": each peer's own (federated)
    local_data: str = ""  # placement "local": the dataset name peers offer (dml-peer --data NAME=PATH)
    precision: str = "fp32"  # autocast: fp32 (off), bf16, fp16 (with a GradScaler); parameters stay fp32

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly form."""
        return asdict(self)

    @staticmethod
    def from_dict(d: dict[str, Any]) -> JobSpec:
        """Inverse of :meth:`to_dict` (unknown keys are ignored)."""
        fields = JobSpec.__dataclass_fields__
        return JobSpec(**{k: v for k, v in d.items() if k in fields})


# Fields whose zero is a real value, not proto3's "unset".
_ZERO_IS_A_VALUE = frozenset({"rounds", "seed", "learning_rate", "prox_mu", "batch_size", "outer_momentum"})


def with_defaults(spec: JobSpec) -> JobSpec:
    """Fills zero / empty fields (proto3's 'unset') with the defaults. A ``local`` job's
    ``num_shards`` is 0 (unset, or the dataclass's default, which a caller building a JobSpec
    never chose): it has one shard per peer, that peer's own data, and no count to cut; any
    other count is refused by :func:`validate`."""
    d = JobSpec()
    local = spec.placement == "local"
    keep = _ZERO_IS_A_VALUE | ({"num_shards"} if local else set())
    out = replace(spec, **{f.name: getattr(spec, f.name) or getattr(d, f.name)
                           for f in fields(JobSpec) if f.name not in keep})
    return replace(out, num_shards=0) if local and out.num_shards == d.num_shards else out


def spec_to_pb(s: JobSpec) -> types_pb2.JobSpec:
    """Domain spec to proto (the two carry the same field names)."""
    return types_pb2.JobSpec(**{f.name: getattr(s, f.name) for f in fields(JobSpec)})


def spec_from_pb(p: types_pb2.JobSpec) -> JobSpec:
    """Proto spec to domain (zeros mean 'default', filled in by :func:`with_defaults`)."""
    return JobSpec(**{f.name: getattr(p, f.name) for f in fields(JobSpec)})


def pool_error(name: str) -> str:
    """Why ``name`` cannot name a peer pool ("" when it can): 1-64 letters, digits, ``.``, ``_``
    and ``-``, starting with a letter or digit."""
    if _POOL.fullmatch(name):
        return ""
    return (f"pool name {name[:80]!r} is not allowed: 1-64 letters, digits, '.', '_' or '-', "
            "starting with a letter or digit")


def validate(spec: JobSpec) -> None:
    """Raises InvalidSpec naming the first bad field."""
    if not 1 <= spec.rounds <= MAX_ROUNDS:
        raise InvalidSpec(f"rounds must be between 1 and {MAX_ROUNDS}, got {spec.rounds}")
    if spec.local_steps < 1:
        raise InvalidSpec(f"local_steps must be at least 1, got {spec.local_steps}")
    if spec.batch_size < 0:
        raise InvalidSpec(f"batch_size must be at least 1 (or 0: the task's own), got {spec.batch_size}")
    if spec.local_steps * spec.batch_size > MAX_SAMPLES_PER_ROUND:
        raise InvalidSpec("local_steps x batch_size must be at most 100M samples per round")
    if not 0 <= spec.learning_rate < MAX_LEARNING_RATE:
        raise InvalidSpec(f"learning_rate must be in (0, {MAX_LEARNING_RATE:g}) (or 0: the task's own), got {spec.learning_rate}")
    if spec.min_peers < 1:
        raise InvalidSpec(f"min_peers must be at least 1, got {spec.min_peers}")
    if spec.aggregation not in AGGREGATIONS:
        raise InvalidSpec(f"unknown aggregation {spec.aggregation!r}: choose one of {', '.join(AGGREGATIONS)}")
    if spec.codec not in CODECS:
        raise InvalidSpec(f"unknown codec {spec.codec!r}: choose one of {', '.join(CODECS)}")
    if spec.data_plane not in DATA_PLANES:
        raise InvalidSpec(f"unknown data plane {spec.data_plane!r}: choose one of {', '.join(DATA_PLANES)}")
    if spec.gossip_topology not in TOPOLOGY_NAMES:
        raise InvalidSpec(f"unknown gossip topology {spec.gossip_topology!r}: choose one of {', '.join(TOPOLOGY_NAMES)}")
    if not MIN_GOSSIP_TIMEOUT_MS <= spec.gossip_timeout_ms <= MAX_GOSSIP_TIMEOUT_MS:
        raise InvalidSpec(f"gossip_timeout_ms must be between {MIN_GOSSIP_TIMEOUT_MS} and {MAX_GOSSIP_TIMEOUT_MS}, got {spec.gossip_timeout_ms}")
    if spec.eval_every_rounds < 1:
        raise InvalidSpec("eval_every_rounds must be at least 1")
    if spec.checkpoint_every_rounds < 1:
        raise InvalidSpec("checkpoint_every_rounds must be at least 1")
    if not 1 <= spec.peer_grace_s <= MAX_PEER_GRACE_S:
        raise InvalidSpec(f"peer_grace_s must be between 1 s and 30 days, got {spec.peer_grace_s}")
    if spec.pool and (err := pool_error(spec.pool)):
        raise InvalidSpec(err)
    if not 0 <= spec.max_peers <= MAX_MAX_PEERS:
        raise InvalidSpec(f"max_peers must be between 0 (no limit) and {MAX_MAX_PEERS}, got {spec.max_peers}")
    if spec.max_peers and spec.min_peers > spec.max_peers:
        raise InvalidSpec(f"min_peers ({spec.min_peers}) cannot exceed max_peers ({spec.max_peers})")
    _validate_training(spec)
    _validate_placement(spec)
    if spec.dataset:
        from dml.common.datasets import name_error

        if err := name_error(spec.dataset):
            raise InvalidSpec(err)
    from dml.common.sampling import parse_sharding  # numpy: imported by the coordinator, not the client
    from dml.common.tasks import builtin_data, is_builtin

    try:
        parse_sharding(spec.sharding)
        _validate_task_ref(spec)
        n = builtin_data(spec.task).y_train.size if is_builtin(spec.task) else None
    except ValueError as e:
        raise InvalidSpec(str(e)) from None
    if spec.placement == "local":
        return  # no shards to cut: each member's own data is its shard
    if n is not None and not 1 <= spec.num_shards <= n:
        raise InvalidSpec(f"num_shards must be between 1 and {n} (the training set size), got {spec.num_shards}")
    if spec.min_peers > spec.num_shards:
        raise InvalidSpec(f"min_peers ({spec.min_peers}) cannot exceed num_shards ({spec.num_shards})")


def _validate_placement(spec: JobSpec) -> None:
    """``placement`` and ``local_data``: a ``local`` job names the dataset its peers offer and
    refuses what cuts a common training set (docs/architecture.md, "Peer-local data")."""
    if spec.placement not in PLACEMENTS:
        raise InvalidSpec(f"unknown placement {spec.placement!r}: choose one of {', '.join(PLACEMENTS)}")
    if spec.placement != "local":
        if spec.local_data:
            raise InvalidSpec("local_data names the peers' own dataset of a --placement local job; this job's "
                              f"placement is {spec.placement!r}")
        return
    from dml.common.datasets import name_error

    if not spec.local_data:
        raise InvalidSpec("a --placement local job must name the dataset its peers offer (--local-data NAME, "
                          "served by dml-peer --data NAME=PATH)")
    if err := name_error(spec.local_data):
        raise InvalidSpec(f"local_data: {err}")
    for bad, what in ((spec.sharding != "iid", f"--sharding {spec.sharding}"),
                      (spec.num_shards != 0, f"--num-shards {spec.num_shards}"),
                      (spec.min_shard_samples != 1, f"--min-shard-samples {spec.min_shard_samples}"),
                      (bool(spec.dataset), f"--dataset {spec.dataset}")):
        if bad:
            raise InvalidSpec(f"{what} cuts or names a shared training set; a --placement local job trains each "
                              "peer on its own data (one shard per peer), so it takes no sharding flags")
    if spec.aggregation != "ring":
        raise InvalidSpec("a --placement local job runs on the ring (--aggregation ring): gossip's ledger is "
                          "at-least-once, and a peer's data must be counted exactly once per pass")


_MODULE_REF = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*:[A-Za-z_][A-Za-z0-9_]*$")
_DIGEST = re.compile(r"^[0-9a-f]{64}$")


def task_kind(task: str, task_digest: str = "") -> str:
    """What a ``--task`` names: ``builtin``, ``module`` (``package.module:NAME``) or ``code`` (a
    file or package whose code is sent with the job: ``mytask.py`` or ``mypkg/``, with
    ``task_digest`` the sha256 of its bundle)."""
    from dml.common.tasks import is_builtin

    if is_builtin(task):
        return "builtin"
    if not task_digest and _MODULE_REF.fullmatch(task):
        return "module"
    return "code"


def _validate_task_ref(spec: JobSpec) -> None:
    kind = task_kind(spec.task, spec.task_digest)
    if kind == "builtin":
        from dml.common.tasks import get_task

        get_task(spec.task)  # a synthetic size out of range raises here
        if spec.task_digest:
            raise ValueError(f"task {spec.task!r} is a built-in task, but the job names task code {spec.task_digest[:12]}")
    if kind == "code":
        if not _DIGEST.fullmatch(spec.task_digest):
            raise ValueError(f"unknown task {spec.task!r}: not a built-in task (digits, digits-cnn, synthetic:SIZE) "
                             "or package.module:NAME, and no task code came with the job (a task file's task_digest "
                             "is the sha256 of its bundle)")
        from dml.common.taskcode import parse_ref

        parse_ref(spec.task)  # BundleError (a ValueError) names what is wrong


def _validate_training(spec: JobSpec) -> None:
    if spec.sync not in SYNCS:
        raise InvalidSpec(f"unknown sync {spec.sync!r}: choose one of {', '.join(SYNCS)}")
    if spec.optimizer_state not in OPTIMIZER_STATES:
        raise InvalidSpec(f"unknown optimizer_state {spec.optimizer_state!r}: choose one of {', '.join(OPTIMIZER_STATES)}")
    if spec.outer_optimizer not in OUTER_OPTIMIZERS:
        raise InvalidSpec(f"unknown outer_optimizer {spec.outer_optimizer!r}: choose one of {', '.join(OUTER_OPTIMIZERS)}")
    if not 0 < spec.outer_lr <= MAX_LEARNING_RATE:
        raise InvalidSpec(f"outer_lr must be in (0, {MAX_LEARNING_RATE:g}], got {spec.outer_lr}")
    if not 0 <= spec.outer_momentum < 1:
        raise InvalidSpec(f"outer_momentum must be in [0, 1), got {spec.outer_momentum}")
    if not 0 <= spec.prox_mu <= MAX_PROX_MU:
        raise InvalidSpec(f"prox_mu must be in [0, {MAX_PROX_MU:g}], got {spec.prox_mu}")
    if spec.min_shard_samples < 1:
        raise InvalidSpec(f"min_shard_samples must be at least 1, got {spec.min_shard_samples}")
    if spec.precision not in PRECISIONS:
        raise InvalidSpec(f"unknown precision {spec.precision!r}: choose one of {', '.join(PRECISIONS)}")
    if spec.sync == "grads":
        for bad, why in ((spec.aggregation != "ring", "needs the ring (--aggregation ring)"),
                         (spec.outer_optimizer != "none", "has no outer optimizer (it applies to --sync params)"),
                         (spec.prox_mu > 0, "has no proximal term (every step already starts from the same parameters)"),
                         (spec.optimizer_state != "local", "keeps the optimizer state identical on every member already"),
                         (spec.codec != "fp32", "all-reduces gradients in fp32"),
                         (spec.precision == "fp16", "takes no --precision fp16: each member's loss scale would "
                          "scale the gradients it all-reduces differently (use bf16)")):
            if bad:
                raise InvalidSpec(f"--sync grads {why}")
    if spec.data_plane == "torch":
        for bad, why in ((spec.codec != "fp32", f"all-reduces in fp32 (torch.distributed sums; --codec {spec.codec} "
                                                "is not implemented on it)"),
                         (spec.aggregation != "ring", "carries ring rounds (--aggregation ring)")):
            if bad:
                raise InvalidSpec(f"--data-plane torch {why}")
    if spec.aggregation == "gossip" and (spec.outer_optimizer != "none" or spec.optimizer_state != "local"):
        raise InvalidSpec("gossip jobs have no outer optimizer and keep optimizer state local")
    if spec.optimizer_state == "average" and spec.codec != "fp32":
        raise InvalidSpec("--optimizer-state average averages the optimizer state with the parameters in fp32 "
                          "(--codec fp32)")
