"""A multi-worker host's split of its samples across workers and steps (peer/worksplit.py), the
coordinator's allocation of N members' samples to it, and what the trainer adds for it and for
``--precision``: every sample exactly once per pass, DDP's mean equal to the step's mean."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from dml.common.spec import InvalidSpec, JobSpec, validate
from dml.common.tasks import get_task
from dml.coordinator import ledger, planner
from dml.peer.trainer import SCALER, Trainer
from dml.peer.worksplit import loss_scales, split_steps


@settings(max_examples=300, deadline=None)
@given(n=st.integers(0, 700), batch=st.integers(1, 40), workers=st.integers(1, 9))
def test_every_sample_is_trained_once_in_order_by_one_worker(n: int, batch: int, workers: int) -> None:
    samples = np.random.default_rng(n).permutation(10_000)[:n]
    if 0 < n < workers:
        with pytest.raises(ValueError):
            split_steps(samples, batch, workers)
        return
    steps = split_steps(samples, batch, workers)
    flat = [p for step in steps for p in step]
    joined = np.concatenate(flat) if flat else np.zeros(0, dtype=samples.dtype)
    assert np.array_equal(joined, samples), "each sample once, in the allocation's order"
    for step in steps:
        assert len(step) == workers and all(p.size >= 1 for p in step), "no worker idles in a DDP step"
        sizes = [p.size for p in step]
        assert max(sizes) - min(sizes) <= 1
        assert sum(sizes) <= workers * batch + workers - 1, "a step is one global batch (a short tail merged in)"
    # As many steps as the members' one-step-per-batch would take for the same allocation.
    full = -(-n // (workers * batch)) if n else 0
    assert len(steps) in (full, full - 1)


def test_one_worker_takes_the_single_process_peers_batches() -> None:
    samples = np.arange(100)
    assert [s[0].tolist() for s in split_steps(samples, 32, 1)] == \
        [samples[i : i + 32].tolist() for i in range(0, 100, 32)]


def test_a_step_of_two_equal_parts_is_one_global_batch_cut_in_two() -> None:
    steps = split_steps(np.arange(128), 32, 2)
    assert [[p.tolist() for p in s] for s in steps] == [[list(range(0, 32)), list(range(32, 64))],
                                                       [list(range(64, 96)), list(range(96, 128))]]
    assert loss_scales(steps[0]) == [1.0, 1.0]


@settings(max_examples=200, deadline=None)
@given(sizes=st.lists(st.integers(1, 50), min_size=1, max_size=8), seed=st.integers(0, 1000))
def test_scaled_worker_losses_average_to_the_steps_mean(sizes: list[int], seed: int) -> None:
    """DDP averages the workers' gradients plainly; scaling worker w's mean loss by
    n_w x W / N makes that average the gradient of the mean over all N samples."""
    rng = np.random.default_rng(seed)
    losses = rng.normal(size=sum(sizes))
    parts = np.split(np.arange(sum(sizes)), np.cumsum(sizes)[:-1])
    scales = loss_scales(parts)
    ddp_mean = np.mean([s * losses[p].mean() for s, p in zip(scales, parts)])
    assert ddp_mean == pytest.approx(losses.mean(), rel=1e-9, abs=1e-12)


def test_bad_splits_are_refused() -> None:
    with pytest.raises(ValueError):
        split_steps(np.arange(10), 0, 2)
    with pytest.raises(ValueError):
        split_steps(np.arange(10), 4, 0)
    with pytest.raises(ValueError):
        split_steps(np.arange(10), 4, 65)


def test_a_host_is_allocated_its_workers_times_a_members_samples_and_the_ledger_holds() -> None:
    """Over several passes, a 3-worker host and a member take 3 and 1 budgets a round from their
    shards, the host's split covers exactly its allocation, and every sample of every shard is
    used once per pass in the committed rounds."""
    sizes = [37, 41, 29, 50]
    assign = {"host": [0, 1], "member": [2, 3]}
    cursors: dict[int, tuple[int, int]] = {}
    rounds = []
    for _ in range(12):
        alloc = planner.allocate(assign, sizes, cursors, 16, {"host": 3})
        assert sum(b - a for _, _, a, b in alloc["host"]) == 48 and sum(b - a for _, _, a, b in alloc["member"]) == 16
        host_samples = np.concatenate([np.arange(a, b) + 1000 * s for s, _, a, b in alloc["host"]])
        split = split_steps(host_samples, 16, 3)
        assert len(split) == 1 and np.array_equal(np.concatenate(split[0]), host_samples)
        ranges = [r for rs in alloc.values() for r in rs]
        rounds.append(ranges)
        planner.advance(cursors, ranges, sizes)
    assert ledger.violations(rounds, sizes) == []
    assert min(c[0] for c in cursors.values()) >= 2, "several passes"


def test_the_seeded_initial_parameters_are_built_again_and_the_state_forgotten() -> None:
    """A job rolled back to round 0 (no live holder, no checkpoint) starts again from the seeded
    init, which a peer that trained past it rebuilds rather than fetches."""
    t = Trainer(get_task("digits"), 7, 0.1, "cpu", fuse=False, precision="fp16")
    init = t.params()
    t.train_on(np.arange(64), 32)
    assert not np.array_equal(t.params(), init)
    assert np.array_equal(t.initial_params(), init)
    t.scaler.update(1.0)  # the scale moved
    t.reset_state()
    assert t.scaler.get_scale() == torch.amp.GradScaler("cpu").get_scale()


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_mixed_precision_keeps_fp32_parameters_and_fp16_carries_a_scaler(precision: str) -> None:
    t = Trainer(get_task("digits"), 1, 0.1, "cpu", precision=precision)
    assert not t.fused_sgd, "autocast needs ordinary steps"
    res = t.train_on(np.arange(256), 32)
    assert np.isfinite(res.loss) and t.flat.dtype == torch.float32
    assert all(p.dtype == torch.float32 for p in t.model.parameters())
    assert (SCALER in t.state_parts) == (precision == "fp16")
    if precision == "fp16":
        assert "scale" in t.capture_state()[SCALER]


def test_precision_is_validated() -> None:
    with pytest.raises(InvalidSpec, match="precision"):
        validate(JobSpec(precision="fp8"))
    with pytest.raises(InvalidSpec, match="fp16"):
        validate(JobSpec(precision="fp16", sync="grads"))
    validate(JobSpec(precision="bf16", sync="grads"))
    with pytest.raises(ValueError):
        Trainer(get_task("digits"), 1, 0.1, "cpu", precision="fp8")


@pytest.mark.parametrize("argv", [["submit", "--precision", "fp8"], ["submit", "--precision", ""]])
def test_dml_submit_refuses_an_unknown_precision_with_exit_2(argv: list[str], capsys) -> None:
    from dml.client import cli

    with pytest.raises(SystemExit) as e:
        cli.build_parser().parse_args(argv)
    assert e.value.code == 2 and "precision" in capsys.readouterr().err


def test_dml_submit_precision_reaches_the_spec() -> None:
    from dml.client import cli

    a = cli.build_parser().parse_args(["submit", "--precision", "bf16"])
    assert cli.spec_from_args(a).precision == "bf16"
    assert cli.spec_from_args(cli.build_parser().parse_args(["submit"])).precision == "fp32"


@pytest.mark.parametrize("argv", [["--workers", "0"], ["--workers", "65"], ["--gpus", "0,-1"], ["--gpus", "a"],
                                  ["--gpus", "0,1", "--workers", "2"], ["--fault", "kill-worker:0"]])
def test_dml_peer_refuses_bad_worker_flags_with_exit_2(argv: list[str], capsys) -> None:
    from dml.peer import cli

    with pytest.raises(SystemExit) as e:
        cli.build_config(["--coordinator", "127.0.0.1:1", "--device", "cpu", *argv])
    assert e.value.code == 2


def test_dml_peer_gpus_start_one_worker_per_device() -> None:
    from dml.peer import cli

    cfg, _ = cli.build_config(["--coordinator", "127.0.0.1:1", "--device", "cpu", "--gpus", "0,2"])
    assert cfg.workers == 2 and cfg.gpus == (0, 2)
    cfg, _ = cli.build_config(["--coordinator", "127.0.0.1:1", "--device", "cpu", "--workers", "3"])
    assert cfg.workers == 3 and cfg.gpus == ()
    cfg, _ = cli.build_config(["--coordinator", "127.0.0.1:1", "--device", "cpu", "--gpus", "0,0"])
    assert cfg.workers == 2 and cfg.gpus == (0, 0), "two workers may share a GPU (a one-GPU machine)"


def test_workers_reduce_over_nccl_only_each_on_a_gpu_of_its_own() -> None:
    from dml.peer.workers import _backend

    assert _backend(("cuda:0", "cuda:1")) == "nccl"
    assert _backend(("cuda:0", "cuda:0")) == "gloo", "NCCL refuses two ranks on one device"
    assert _backend(()) == "gloo"


def test_dml_peers_shows_a_multi_worker_peers_workers_and_devices() -> None:
    from dml.client.api import peer_dict
    from dml.client.cli import peers_table
    from dml.v1 import jobs_pb2

    rows = [peer_dict(jobs_pb2.PeerInfo(peer_id="gpu-host", workers=4, worker_devices=[f"cuda:{i}" for i in range(4)])),
            peer_dict(jobs_pb2.PeerInfo(peer_id="cpu-host", workers=2)),
            peer_dict(jobs_pb2.PeerInfo(peer_id="plain"))]
    assert [r["workers"] for r in rows] == [4, 2, 1]
    lines = peers_table(rows)
    assert lines[1].endswith("workers 4 (cuda:0,cuda:1,cuda:2,cuda:3)")
    assert lines[2].endswith("workers 2") and "workers" not in lines[3]


@pytest.mark.parametrize("kw,word", [({"aggregation": "gossip"}, "gossip"), ({"sync": "grads"}, "--sync grads"),
                                     ({"dataset": "d"}, "--dataset"), ({"prox_mu": 0.1}, "--prox-mu"),
                                     ({"data_plane": "torch"}, "--data-plane torch")])
def test_a_multi_worker_host_declines_what_it_does_not_run_yet_saying_why(kw: dict, word: str) -> None:
    from dml.common.spec import spec_to_pb
    from dml.peer.workers import unsupported

    assert unsupported(spec_to_pb(JobSpec())) == ""
    assert word in unsupported(spec_to_pb(JobSpec(**kw)))
