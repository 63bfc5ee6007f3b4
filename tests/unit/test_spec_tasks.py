"""Job specs (defaults, validation), the built-in tasks and the flat-buffer Trainer (torch, CPU)."""
from __future__ import annotations

import dataclasses
import io

import numpy as np
import pytest
import torch

from dml.common.spec import AGGREGATIONS, InvalidSpec, JobSpec, validate, with_defaults
from dml.common.tasks import builtin_data, builtin_params, get_task, parse_size, synthetic_layers, task_names
from dml.peer.trainer import Trainer

# -- the spec ---------------------------------------------------------------------------------


def test_default_spec_is_valid() -> None:
    validate(JobSpec())
    validate(JobSpec(task="synthetic:500k", sharding="dirichlet:0.5", num_shards=8, min_peers=8))


@pytest.mark.parametrize(
    "changes,field",
    [
        (dict(rounds=0), "rounds"),
        (dict(rounds=-3), "rounds"),
        (dict(rounds=1_000_001), "rounds"),
        (dict(local_steps=0), "local_steps"),
        (dict(batch_size=-1), "batch_size"),  # 0 is the task's own batch size
        (dict(sync="both"), "sync"),
        (dict(sync="grads", codec="int8"), "sync grads"),
        (dict(optimizer_state="global"), "optimizer_state"),
        (dict(outer_optimizer="adam"), "outer_optimizer"),
        (dict(prox_mu=-1.0), "prox_mu"),
        (dict(task="mytask.py"), "no task code"),
        (dict(learning_rate=-0.1), "learning_rate"),
        (dict(min_peers=0), "min_peers"),
        (dict(task="imagenet"), "task"),
        (dict(task="synthetic:1"), "synthetic"),
        (dict(sharding="foo"), "sharding"),
        (dict(sharding="dirichlet:0"), "sharding"),
        (dict(aggregation="allreduce"), "aggregation"),
        (dict(aggregation="gossip", gossip_topology="star"), "topology"),
        (dict(aggregation="gossip", gossip_timeout_ms=50), "gossip_timeout_ms"),
        (dict(num_shards=1439), "num_shards"),
        (dict(num_shards=0), "num_shards"),
        (dict(min_peers=5, num_shards=4), "min_peers"),
        (dict(checkpoint_every_rounds=0), "checkpoint_every_rounds"),
        (dict(codec="fp8"), "codec"),
        (dict(data_plane="udp"), "data plane"),
        (dict(eval_every_rounds=0), "eval_every_rounds"),
    ],
)
def test_validate_rejects_naming_the_field(changes: dict[str, object], field: str) -> None:
    bad = dataclasses.replace(JobSpec(), **changes)  # type: ignore[arg-type]
    with pytest.raises(InvalidSpec, match=field):
        validate(bad)


def test_invalid_spec_is_a_value_error() -> None:
    assert issubclass(InvalidSpec, ValueError)


def test_num_shards_may_equal_the_training_set_size() -> None:
    validate(JobSpec(num_shards=1438))
    validate(JobSpec(num_shards=1, min_peers=1))


def test_with_defaults_fills_zeros_and_keeps_set_values() -> None:
    d = JobSpec()
    unset = JobSpec(task="", rounds=7, local_steps=0, batch_size=0, learning_rate=0.0, min_peers=0,
                    sharding="", aggregation="", seed=0, num_shards=0, checkpoint_every_rounds=0)
    filled = with_defaults(unset)
    assert filled == dataclasses.replace(d, rounds=7)
    validate(filled)
    custom = JobSpec(task="synthetic:500k", rounds=3, local_steps=2, batch_size=8, learning_rate=0.5, min_peers=2,
                     sharding="dirichlet:1", aggregation="ring", seed=4, num_shards=5, checkpoint_every_rounds=3)
    assert with_defaults(custom) == custom
    # rounds is never defaulted: a zero there is the user's error to see.
    assert with_defaults(JobSpec(rounds=0)).rounds == 0
    # batch_size 0 is the task's own: fixed on the job when the first peer takes it.
    assert d.batch_size == 0 and with_defaults(JobSpec(batch_size=0)).batch_size == 0
    assert AGGREGATIONS == ("ring", "gossip")
    unset_gossip = with_defaults(JobSpec(aggregation="gossip", gossip_topology="", gossip_timeout_ms=0))
    assert (unset_gossip.gossip_topology, unset_gossip.gossip_timeout_ms) == (d.gossip_topology, d.gossip_timeout_ms)


def test_spec_dict_round_trip_ignores_unknown_keys() -> None:
    s = JobSpec(task="synthetic:1M", rounds=9, seed=3)
    assert JobSpec.from_dict({**s.to_dict(), "future_field": 1}) == s


# -- tasks ------------------------------------------------------------------------------------


def test_digits_shapes_and_split() -> None:
    data = builtin_data("digits")
    assert data.x_train.shape == (1438, 64) and data.x_test.shape == (359, 64)
    assert data.y_train.shape == (1438,) and data.y_test.shape == (359,)
    assert data.x_train.dtype == np.float32 and data.y_train.dtype == np.int64
    assert set(np.unique(data.y_train)) == set(range(10)) == set(np.unique(data.y_test))
    assert 0.0 <= data.x_train.min() and data.x_train.max() <= 1.0
    # Stratified: every class is in the test split in about its share.
    counts = np.bincount(data.y_test, minlength=10)
    assert counts.min() >= 34 and counts.max() <= 38
    assert builtin_data("digits") is data, "loaded once"


@pytest.mark.parametrize("name,want", [("synthetic:10M", 10_000_000), ("synthetic:500k", 500_000),
                                       ("synthetic:50000000", 50_000_000), ("synthetic:3k", 3_000)])
def test_synthetic_size_is_about_what_was_asked(name: str, want: int) -> None:
    """The brief: synthetic:10M has about 10M parameters (within 1 percent)."""
    # Within 1 percent, or half a hidden unit (267 parameters) for tiny models.
    assert abs(builtin_params(name) - want) <= max(0.01 * want, 267 / 2)
    assert synthetic_layers(name)[0] == 256 and synthetic_layers(name)[-1] == 10


def test_num_params_matches_the_built_model() -> None:
    for name in ("digits", "synthetic:500k"):
        task = get_task(name)
        assert sum(p.numel() for p in task.model().parameters()) == builtin_params(name)


def test_synthetic_data_shapes() -> None:
    data = builtin_data("synthetic:10k")
    assert data.x_train.shape == (8192, 256) and data.x_test.shape == (2048, 256)
    assert set(np.unique(data.y_train)) <= set(range(10))


def test_synthetic_labels_are_the_teachers_whole_product_bit_for_bit() -> None:
    # The data is made with the teacher's products in row blocks (a whole-array GEMM kept a
    # BLAS buffer the size of the data resident in every peer); the labels must stay the ones
    # one product gives, so every figure measured on synthetic tasks still holds.
    import hashlib

    d = builtin_data("synthetic:10M")
    rng = np.random.default_rng(1234)
    teacher = rng.standard_normal((256, 10)).astype(np.float32)
    x = rng.standard_normal((10240, 256)).astype(np.float32)
    y = (x @ teacher + 0.5 * rng.standard_normal((10240, 10))).argmax(1)
    assert np.array_equal(np.concatenate([d.x_train, d.x_test]), x)
    assert np.array_equal(np.concatenate([d.y_train, d.y_test]), y)
    assert hashlib.sha256(y.astype(np.int64).tobytes()).hexdigest()[:16] == SYNTHETIC_LABELS_SHA256_16


SYNTHETIC_LABELS_SHA256_16 = "2ca0796a3f2ebff8"  # of the labels before the change


@pytest.mark.parametrize("name", ["mnist", "", "synthetic:", "synthetic:abc", "synthetic:2k", "synthetic:3000M"])
def test_unknown_or_out_of_range_task_is_a_value_error(name: str) -> None:
    with pytest.raises(ValueError):
        get_task(name)


def test_task_names() -> None:
    assert "digits" in task_names()


@pytest.mark.parametrize("text,want", [("1234", 1234), ("500k", 500_000), ("500K", 500_000), ("10M", 10_000_000),
                                       ("10m", 10_000_000), ("1.5M", 1_500_000), (" 7k ", 7_000), ("0", 0)])
def test_parse_size(text: str, want: int) -> None:
    assert parse_size(text) == want


@pytest.mark.parametrize("text", ["", "k", "10G", "-5", "1e6", "10 M", "ten"])
def test_parse_size_rejects(text: str) -> None:
    with pytest.raises(ValueError, match="size"):
        parse_size(text)


@pytest.mark.parametrize("text,want", [("8.2M", 8_200_000), ("1.005k", 1_005)])
def test_parse_size_decimal_suffix_is_exact(text: str, want: int) -> None:
    assert parse_size(text) == want


# -- the trainer ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def digits_trainer() -> Trainer:
    return Trainer(get_task("digits"), seed=0, lr=0.1)


def test_parameters_are_views_of_the_flat_buffer(digits_trainer: Trainer) -> None:
    t = digits_trainer
    assert t.numel == builtin_params("digits")
    assert t.flat.shape == (t.numel + 1,) and t.flat.dtype == torch.float32
    base = t.flat.data_ptr()
    offset = 0
    for p in t.model.parameters():
        assert p.data_ptr() == base + 4 * offset, "parameters are laid out back to back in the flat buffer"
        offset += p.numel()
    assert offset == t.numel
    # Writing the buffer writes the model, and the other way round.
    first = next(t.model.parameters())
    old = float(t.flat[0])
    t.flat[0] = 123.0
    assert float(first.detach().reshape(-1)[0]) == 123.0
    with torch.no_grad():
        first.reshape(-1)[0] = old
    assert float(t.flat[0]) == old
    buf = t.host_buffer()
    assert buf.dtype == np.float32 and buf.size == t.numel + 1
    assert np.shares_memory(buf, t.flat.numpy())


def test_training_updates_the_flat_buffer_in_place() -> None:
    t = Trainer(get_task("digits"), seed=1, lr=0.1)
    before = t.flat.clone()
    ptr = t.flat.data_ptr()
    res = t.train(np.arange(200), steps=3, batch_size=16, rng=np.random.default_rng(0))
    assert res.samples == 48 and np.isfinite(res.loss)
    assert t.flat.data_ptr() == ptr
    assert not torch.equal(t.flat[: t.numel], before[: t.numel]), "training must change trainer.flat"
    assert float(t.flat[-1]) == float(before[-1]), "the weight slot is not a parameter"
    assert all(p.data_ptr() - ptr < 4 * t.numel for p in t.model.parameters()), "still views after steps"


def test_train_draws_only_from_the_given_indices() -> None:
    """Samples outside the shard must not influence training: poison them and compare."""
    a = Trainer(get_task("digits"), seed=2, lr=0.1)
    b = Trainer(get_task("digits"), seed=2, lr=0.1)
    x, y = b.train_data.arrays
    x = x.copy()
    x[100:] = 1e6
    b.train_data._arrays = (x, y)
    shard = np.arange(0, 100)
    a.train(shard, steps=5, batch_size=8, rng=np.random.default_rng(3))
    b.train(shard, steps=5, batch_size=8, rng=np.random.default_rng(3))
    assert torch.equal(a.flat, b.flat)


def test_training_is_deterministic_for_seeds() -> None:
    runs = []
    for _ in range(2):
        t = Trainer(get_task("digits"), seed=5, lr=0.1)
        t.train(np.arange(300), steps=4, batch_size=10, rng=np.random.default_rng(11))
        runs.append(t.params())
    assert runs[0].tobytes() == runs[1].tobytes()


def test_train_rejects_an_empty_shard(digits_trainer: Trainer) -> None:
    with pytest.raises(ValueError):
        digits_trainer.train(np.array([], dtype=np.int64), steps=1, batch_size=4, rng=np.random.default_rng(0))


def test_set_params_and_params_round_trip(digits_trainer: Trainer) -> None:
    t = digits_trainer
    saved = t.params()
    try:
        new = np.random.default_rng(0).standard_normal(t.numel).astype(np.float32)
        t.set_params(new)
        got = t.params()
        assert got.tobytes() == new.tobytes()
        assert got.base is None or not np.shares_memory(got, t.flat.numpy()), "params() is a copy"
        got[0] += 1
        assert t.params()[0] == new[0]
        # The model itself sees the new values.
        first = next(t.model.parameters())
        assert np.array_equal(first.detach().reshape(-1).numpy(), new[: first.numel()])
        with pytest.raises(ValueError):
            t.set_params(np.zeros(t.numel + 1, np.float32))
        t.set_params(new.astype(np.float64))  # converted to float32
        assert t.params().tobytes() == new.tobytes()
    finally:
        t.set_params(saved)


def test_load_host_buffer_copies_a_foreign_buffer(digits_trainer: Trainer) -> None:
    t = digits_trainer
    saved = t.params()
    try:
        foreign = np.arange(t.numel + 1, dtype=np.float32)
        t.load_host_buffer(foreign)
        assert np.array_equal(t.params(), foreign[:-1])
        t.load_host_buffer(t.host_buffer())  # the live view: a no-op
        assert np.array_equal(t.params(), foreign[:-1])
    finally:
        t.set_params(saved)


def test_state_dict_bytes_of_given_params_load_into_a_fresh_model(digits_trainer: Trainer) -> None:
    t = digits_trainer
    live = t.params()
    other = (live * 2 + 1).astype(np.float32)
    blob = t.state_dict_bytes(other)
    assert t.params().tobytes() == live.tobytes(), "serialising other params leaves the live ones"
    sd = torch.load(io.BytesIO(blob), weights_only=True)
    fresh = get_task("digits").model()
    fresh.load_state_dict(sd, strict=True)
    off = 0
    for (name, p), q in zip(fresh.named_parameters(), t.model.parameters()):
        assert p.shape == q.shape, name
        want = torch.from_numpy(other[off : off + p.numel()]).reshape(p.shape)
        assert torch.equal(p.detach(), want), name
        off += p.numel()
    assert off == t.numel
    # Without params, the live ones.
    sd_live = torch.load(io.BytesIO(t.state_dict_bytes()), weights_only=True)
    for k, v in t.model.state_dict().items():
        assert torch.equal(sd_live[k], v), k
    # The same model fed the same input gives the same output as the trainer with those params.
    x = torch.from_numpy(builtin_data('digits').x_test[:5])
    saved = t.params()
    try:
        t.set_params(other)
        with torch.no_grad():
            assert torch.equal(fresh(x), t.model(x))
    finally:
        t.set_params(saved)


def test_a_few_steps_reduce_the_loss_on_digits() -> None:
    t = Trainer(get_task("digits"), seed=0, lr=0.1)
    acc0, loss0 = t.evaluate()
    rng = np.random.default_rng(0)
    idx = np.arange(builtin_data('digits').y_train.size)
    first = t.train(idx, steps=20, batch_size=32, rng=rng)
    for _ in range(4):
        last = t.train(idx, steps=20, batch_size=32, rng=rng)
    acc1, loss1 = t.evaluate()
    assert loss1 < 0.7 * loss0, (loss0, loss1)
    assert last.loss < first.loss
    assert acc1 > acc0 and acc1 > 0.6, (acc0, acc1)


def test_digits_loads_without_importing_scikit_learn() -> None:
    """Start-up cost matters on every restart: the bundled CSV is read directly."""
    import subprocess
    import sys

    code = ("import sys; from dml.common.tasks import builtin_data; d = builtin_data('digits'); "
            "print(int('sklearn' in sys.modules), d.x_train.shape[0] + d.x_test.shape[0])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.stdout.split() == ["0", "1797"], out.stderr


def test_stratified_split_keeps_class_proportions() -> None:
    from dml.common.tasks import stratified_split

    y = np.repeat(np.arange(4), [50, 30, 10, 10])
    tr, te = stratified_split(y, 0.2, seed=0)
    assert sorted(np.concatenate([tr, te]).tolist()) == list(range(100))
    assert np.bincount(y[te]).tolist() == [10, 6, 2, 2]


def test_spec_codecs_are_the_wire_codecs() -> None:
    from dml.aggregation.codecs import CODEC_NAMES
    from dml.common.spec import CODECS, DATA_PLANES
    from dml.peer.link import DATA_PLANES as LINK_PLANES
    from dml.peer.torchplane import PLANE

    assert CODECS == CODEC_NAMES
    assert set(DATA_PLANES) == set(LINK_PLANES) | {PLANE}


def test_spec_topologies_are_the_gossip_topologies() -> None:
    from dml.aggregation.topology import TOPOLOGY_NAMES as POLICIES
    from dml.common.spec import TOPOLOGY_NAMES

    assert TOPOLOGY_NAMES == POLICIES


def test_unset_codec_plane_and_eval_every_take_defaults() -> None:
    got = with_defaults(dataclasses.replace(JobSpec(), codec="", data_plane="", eval_every_rounds=0))
    assert (got.codec, got.data_plane, got.eval_every_rounds) == ("fp32", "auto", 1)


def test_sgd_fused_into_backward_matches_optimizer_steps() -> None:
    """The built-in MLPs apply SGD inside backward (no model-sized gradient); that must be the
    same plain SGD step the optimizer takes, and must leave no gradients behind."""
    import numpy as np

    from dml.common.tasks import get_task
    from dml.peer.trainer import Trainer

    fused = Trainer(get_task("digits"), seed=3, lr=0.1)
    plain = Trainer(get_task("digits"), seed=3, lr=0.1)
    assert fused.fused_sgd
    for m in plain.model.modules():  # back to nn.Linear's own forward: the optimizer steps
        m.__dict__.pop("forward", None)
    assert np.array_equal(fused.params(), plain.params())
    idx = np.arange(320)
    r1, r2 = fused.train_on(idx, 32), plain.train_on(idx, 32)
    assert abs(r1.loss - r2.loss) < 1e-5
    assert np.allclose(fused.params(), plain.params(), rtol=1e-5, atol=1e-6)
    assert not np.array_equal(fused.params(), Trainer(get_task("digits"), seed=3, lr=0.1).params())
    assert all(p.grad is None for p in fused.model.parameters())


def test_a_digest_or_name_with_a_trailing_newline_is_refused_everywhere(tmp_path) -> None:
    """``$`` also matches before a final newline: every anchored check uses fullmatch, so a
    digest ``<64 hex>\\n`` names no file and a task or sharding name with a newline is refused."""
    import dataclasses

    from dml.common import sampling
    from dml.common.spec import JobSpec, validate
    from dml.coordinator.codestore import CodeStore

    digest = "a" * 64
    with pytest.raises(ValueError):
        validate(dataclasses.replace(JobSpec(), task="t.py", task_digest=digest + "\n"))
    with pytest.raises(ValueError, match="malformed"):
        CodeStore(tmp_path).path(digest + "\n")
    assert CodeStore(tmp_path).path(digest).name == digest
    assert sampling.parse_sharding("classes:2") == ("classes", 2.0)
    with pytest.raises(ValueError):
        sampling.parse_sharding("classes:2\n")
