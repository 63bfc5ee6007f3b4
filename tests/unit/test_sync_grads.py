"""``--sync grads`` without sockets: several all-reduces over one ring link, the trainer's flat
gradient buffer, and N members over an in-memory ring ending where one process with the
N-times batch ends (SGD with momentum, Adam), bit-identical to each other."""
from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np
import pytest
import torch

from dml.aggregation.allreduce import ring_allreduce
from dml.aggregation.ring import ALL_GATHER
from dml.aggregation.guard import GRAD_FLOOR, GradientGuards, Poisoned
from dml.aggregation.transport import ExchangeError, Header
from dml.common.tasks import get_task
from dml.peer.trainer import Trainer
from tests.unit.ringkit import assert_bit_identical, differences, reference_trainer, run_members, synced_member


def _momentum(params: Any) -> torch.optim.Optimizer:
    return torch.optim.SGD(params, lr=0.05, momentum=0.9)


TASKS = {
    "mlp-sgd-momentum": dataclasses.replace(get_task("digits"), optimizer=_momentum),
    "cnn-adam": get_task("digits-cnn"),
}


def test_one_link_carries_consecutive_all_reduces_each_exact():
    world, n, k = 3, 1001, 4
    rng = np.random.default_rng(0)
    rounds = [[rng.integers(-50, 50, n).astype(np.float32) for _ in range(world)] for _ in range(k)]
    want = [np.sum(np.stack(bufs).astype(np.float64), axis=0) for bufs in rounds]

    def body(rank: int, link: Any) -> None:
        for c in range(k):
            ring_allreduce(rounds[c][rank], rank, world, link, 10.0, 97, collective=c, final=c == k - 1)

    _, errors = run_members(world, body)
    assert errors == [None] * world
    for c in range(k):
        assert_bit_identical(rounds[c])
        assert np.array_equal(rounds[c][0].astype(np.float64), want[c])


class _Renumbered:
    """A link whose frames claim another collective than the one they belong to."""

    def __init__(self, inner: Any, shift: int) -> None:
        self.inner, self.shift = inner, shift

    def send(self, header: Header, payload: np.ndarray) -> int:
        return self.inner.send(dataclasses.replace(header, collective=header.collective + self.shift), payload)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


def test_a_frame_of_another_collective_is_refused_naming_both():
    bufs = [np.ones(64, np.float32) for _ in range(2)]
    _, errors = run_members(2, lambda r, link: ring_allreduce(bufs[r], r, 2, link, 1.0, 16, collective=3),
                            link_wrap=lambda r, link: _Renumbered(link, 1) if r == 0 else link)
    assert isinstance(errors[1], ExchangeError)
    assert "got collective 4" in str(errors[1]) and "expected collective 3" in str(errors[1])


def test_a_non_final_all_reduce_leaves_the_link_open_and_its_frames_sent():
    class Recording:
        def __init__(self, inner: Any) -> None:
            self.inner, self.closed, self.waited = inner, 0, 0

        def close(self, timeout: float) -> None:
            self.closed += 1
            self.inner.close(timeout)

        def wait_sent(self, seq: int, timeout: float) -> None:
            self.waited = seq
            self.inner.wait_sent(seq, timeout)

        def __getattr__(self, name: str) -> Any:
            return getattr(self.inner, name)

    links: dict[int, Recording] = {}

    def wrap(rank: int, link: Any) -> Recording:
        links[rank] = Recording(link)
        return links[rank]

    bufs = [np.ones(40, np.float32) for _ in range(3)]
    _, errors = run_members(3, lambda r, link: ring_allreduce(bufs[r], r, 3, link, 5.0, 8, final=False), link_wrap=wrap)
    assert errors == [None] * 3
    assert [links[r].closed for r in range(3)] == [0, 0, 0]
    assert all(links[r].waited == links[r].sent_upto() > 0 for r in range(3))


class _Corrupting:
    """A link that adds 1 to the first element of the first all-gather frame of one collective
    it receives (the member forwards it as received): members end that collective with
    different averaged gradients."""

    def __init__(self, inner: Any, collective: int) -> None:
        self.inner, self.collective, self.header, self.done = inner, collective, None, False

    def recv_header(self, timeout: float) -> Header:
        self.header = self.inner.recv_header(timeout)
        return self.header

    def recv_payload(self, out: np.ndarray, timeout: float) -> None:
        self.inner.recv_payload(out, timeout)
        h = self.header
        if not self.done and h.collective == self.collective and h.phase == ALL_GATHER:
            out.view(np.float32)[0] += np.float32(1.0)
            self.done = True

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


def test_members_that_part_are_told_apart_by_the_step_and_the_cause():
    """What a failing bit-identity check of ``--sync grads`` members says: which elements differ
    and by how many ulps, and the first step at which the members parted, and why."""
    world, bs, steps = 3, 8, 4
    samples = _split(world, [32, 32, 32])
    trainers, errors = run_members(world, lambda r, link: synced_member(TASKS["mlp-sgd-momentum"], r, world, link,
                                                                        samples[r], bs, steps),
                                   link_wrap=lambda r, link: _Corrupting(link, 2) if r == 1 else link)
    assert errors == [None] * world
    with pytest.raises(AssertionError) as e:
        assert_bit_identical([t.host_buffer() for t in trainers], [t.sync_trace for t in trainers])
    msg = str(e.value)
    assert msg.startswith("rank 1 differs from rank 0: ") and " elements differ, indices " in msg, msg
    assert msg.endswith("members started step 2 from the same parameters, but the all-reduce gave them different "
                        "averaged gradients"), msg
    a, b = trainers[0].host_buffer().copy(), trainers[0].host_buffer().copy()
    b.view(np.uint32)[[3, 7]] += np.uint32(1)
    assert differences(a, b) == f"2 of {a.size} elements differ, indices 3..7, up to 1 ulps"


def test_gradients_accumulate_into_the_flat_buffer():
    t = Trainer(get_task("digits-cnn"), 0, 0, fuse=False)
    grads = t.grad_buffer()
    assert grads.numel() == t.numel + 1
    x, y = t.train_data.get(np.arange(16))
    t.loss_fn(t.model(x), y).backward()
    off = 0
    for p in t.model.parameters():
        assert p.grad.data_ptr() == grads[off:].data_ptr()
        off += p.numel()
    ref = Trainer(get_task("digits-cnn"), 0, 0, fuse=False)
    ref.loss_fn(ref.model(x), y).backward()
    want = torch.cat([p.grad.reshape(-1) for p in ref.model.parameters()])
    assert torch.equal(grads[: t.param_numel], want)


def test_linear_gradients_are_written_into_the_buffer_not_handed_to_autograd():
    """An MLP's weight gradients go straight into their views of the flat buffer (one in-place
    GEMM each): autograd never accumulates a weight-sized gradient there, and the values are
    the ones autograd computes."""
    t = Trainer(get_task("digits"), 0, 0, fuse=False)
    grads = t.grad_buffer()
    handed = []  # what autograd is handed to add into each .grad (None: nothing)
    for p in t.model.parameters():
        p.register_hook(lambda g: handed.append(g is not None))
    x, y = t.train_data.get(np.arange(16))
    t.loss_fn(t.model(x), y).backward()
    assert handed == [False] * 6  # every parameter of the MLP is a Linear's: no gradient went through autograd
    ref = Trainer(get_task("digits"), 0, 0, fuse=False)
    ref.loss_fn(ref.model(x), y).backward()
    want = torch.cat([p.grad.reshape(-1) for p in ref.model.parameters()])
    assert torch.allclose(grads[: t.param_numel], want, rtol=1e-6, atol=1e-7)
    assert grads[: t.param_numel].abs().sum() > 0


def test_the_buffered_linear_takes_any_leading_dims_and_falls_back_without_a_buffer():
    from dml.peer.trainer import grads_into_buffer

    torch.manual_seed(0)
    a, b = torch.nn.Linear(6, 4), torch.nn.Linear(6, 4)
    b.load_state_dict(a.state_dict())
    assert grads_into_buffer(torch.nn.Sequential(a)) == 1
    x = torch.randn(3, 5, 6, requires_grad=True)  # (batch, time, features)
    a(x).square().sum().backward()  # no .grad to write into yet: ordinary gradients
    ga, gx = a.weight.grad.clone(), x.grad.clone()
    x2 = x.detach().clone().requires_grad_(True)
    b(x2).square().sum().backward()
    assert torch.allclose(ga, b.weight.grad, atol=1e-6) and torch.allclose(gx, x2.grad, atol=1e-6)
    view = torch.zeros(4 * 6 + 4)
    a.weight.grad, a.bias.grad = view[:24].view(4, 6), view[24:]
    a(x.detach()).square().sum().backward()
    assert torch.allclose(view[:24].view(4, 6), b.weight.grad, atol=1e-5)
    assert torch.allclose(view[24:], b.bias.grad, atol=1e-5)
    with torch.no_grad():  # evaluation: a plain linear layer
        assert torch.equal(a(x), b(x))


def test_a_fused_trainer_refuses_synchronous_gradients():
    t = Trainer(get_task("digits"), 0, 0.1)  # plain SGD on an MLP: fused into backward
    assert t.fused_sgd
    with pytest.raises(ValueError, match="fuse=False"):
        t.train_synced(np.arange(8), 8, 1, lambda buf, n, s, part: None)


def _split(world: int, per_member: list[int], seed: int = 1) -> list[np.ndarray]:
    """Disjoint sample lists, ``per_member[r]`` samples for member r."""
    order = np.random.default_rng(seed).permutation(1400)
    out, pos = [], 0
    for n in per_member:
        out.append(order[pos : pos + n].astype(np.int64))
        pos += n
    return out


@pytest.mark.parametrize("name", sorted(TASKS))
@pytest.mark.parametrize("per_member", [[40, 40, 40], [40, 25, 0]], ids=["even", "uneven"])
def test_n_members_match_one_process_with_the_n_times_batch(name, per_member):
    """3 members x 5 steps of 8 equal one process taking 5 steps of their union; a member whose
    samples run out (25: a short last batch, then none; 0: none at all) takes part with weight 0."""
    world, bs, steps = 3, 8, 5
    task = TASKS[name]
    samples = _split(world, per_member)
    trainers, errors = run_members(world, lambda r, link: synced_member(task, r, world, link, samples[r], bs, steps))
    assert errors == [None] * world
    assert_bit_identical([t.host_buffer() for t in trainers], [t.sync_trace for t in trainers])
    ref = reference_trainer(task, samples, bs, steps)
    got, want = trainers[0].params(), ref.params()
    print(name, per_member, "max |dml - one process|", float(np.abs(got - want).max()))
    assert np.abs(got - want).max() <= 1e-5 * max(1.0, float(np.abs(want).max())), np.abs(got - want).max()
    init = Trainer(task, 0, 0, fuse=False).params()
    assert np.abs(got - init).max() > 1e-3  # it trained
    states = [t.optimizer.state_dict()["state"] for t in trainers]
    for st in states[1:]:  # the optimizer state is identical on every member too
        for k, v in st.items():
            for name_, x in v.items():
                if isinstance(x, torch.Tensor):
                    assert torch.equal(x, states[0][k][name_]), (k, name_)


def test_batch_norm_statistics_come_back_averaged_and_identical():
    def model() -> torch.nn.Module:
        return torch.nn.Sequential(torch.nn.Linear(64, 32), torch.nn.BatchNorm1d(32), torch.nn.ReLU(), torch.nn.Linear(32, 10))

    task = dataclasses.replace(get_task("digits"), model=model, optimizer=_momentum)
    samples = _split(2, [24, 24])
    trainers, errors = run_members(2, lambda r, link: synced_member(task, r, 2, link, samples[r], 8, 3))
    assert errors == [None] * 2
    assert_bit_identical([t.host_buffer() for t in trainers], [t.sync_trace for t in trainers])
    bn = trainers[0].model[1]
    assert not torch.equal(bn.running_mean, torch.zeros_like(bn.running_mean))


class _Poisoning:
    """A link that sends 1e30 in place of every value."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner

    def send(self, header: Header, payload: np.ndarray) -> int:
        bad = payload.copy().view(np.float32)
        bad[:] = 1e30
        return self.inner.send(header, bad.view(np.uint8))

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


class _PoisoningBlocks(_Poisoning):
    """Poisons only the streamed weights' blocks (every all-reduce after a step's first)."""

    def send(self, header: Header, payload: np.ndarray) -> int:
        return super().send(header, payload) if header.collective % 17 else self.inner.send(header, payload)


@pytest.mark.parametrize("streamed", [False, True], ids=["buffer", "streamed-blocks"])
def test_the_gradient_guard_refuses_a_poisoned_gradient_naming_its_sender(streamed):
    world, bs, steps = 3, 8, 2
    task = PLAIN if streamed else TASKS["mlp-sgd-momentum"]
    samples = _split(world, [16, 16, 16])
    wrap = _PoisoningBlocks if streamed else _Poisoning
    _, errors = run_members(world, lambda r, link: synced_member(task, r, world, link, samples[r], bs, steps,
                                                                 counts=[16] * world,
                                                                 stream_block=1024 if streamed else None),
                            link_wrap=lambda r, link: wrap(link) if r == 0 else link, abort_on_error=True)
    assert isinstance(errors[1], Poisoned) and errors[1].suspect == "0", errors


class _Bag(torch.nn.Module):
    """An embedding bag over the digits' 17 pixel levels: each batch touches few rows, so an
    honest member's own gradient is 0 on many ranges others' is not."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = torch.nn.Embedding(64 * 17, 500)  # a row is half a chunk (ringkit: 1000 elements)
        self.out = torch.nn.Linear(500, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        idx = torch.arange(64, device=x.device) * 17 + x.long().clamp(0, 16)
        return self.out(self.emb(idx).mean(1))


@pytest.mark.parametrize("per_member", [[24, 24, 24], [24, 8, 0]], ids=["sparse", "sparse-and-idle"])
def test_the_gradient_guard_passes_honest_sparse_gradients_and_members_without_samples(per_member):
    """Honest gradients pass the guard: an embedding's, whose ranges are 0 on one member and not
    on another, and those a member with no samples in a step (no own scale) receives."""
    def adam(params: Any) -> torch.optim.Optimizer:
        return torch.optim.Adam(params, lr=1e-2)

    world, bs, steps = 3, 8, 3
    task = dataclasses.replace(get_task("digits"), model=_Bag, optimizer=adam)
    samples = _split(world, per_member)
    trainers, errors = run_members(world, lambda r, link: synced_member(task, r, world, link, samples[r], bs, steps,
                                                                        counts=per_member))
    assert errors == [None] * world
    assert_bit_identical([t.host_buffer() for t in trainers], [t.sync_trace for t in trainers])
    want = reference_trainer(task, samples, bs, steps).params()
    assert np.abs(trainers[0].params() - want).max() <= 1e-5


def test_gradient_guards_weigh_each_step_by_its_samples_and_pick_an_honest_floor():
    g = GradientGuards("p0", 1, [20, 5, 0], 8)
    assert g.steps == 3
    assert [g.weights(s) for s in range(3)] == [[8.0, 5.0, 0.0], [8.0, 0.0, 0.0], [4.0, 0.0, 0.0]]
    first = g.for_step(0, 0.02, 99)
    assert first.floor == 0.02 and first.max_weight == 13.0 and first.weight_index == 99
    g.averaged(0, np.full(10, 0.5, np.float32))  # no samples of ours next step: its scale is kept
    assert g.for_step(1, 0.0, 99).floor == pytest.approx(0.5)
    assert GradientGuards("p0", 2, [20, 5, 0], 8).for_step(0, 0.0, 99).floor == GRAD_FLOOR


def test_each_steps_all_reduce_window_is_returned_in_order():
    import time

    t = Trainer(get_task("digits"), 0, 0.1, fuse=False)
    calls = []

    def allreduce(buf, n, s, part):
        calls.append(time.time())
        time.sleep(0.01)

    before = time.time()
    res = t.train_synced(np.arange(24), 8, 3, allreduce)
    assert len(res.windows) == 3
    for (enter, leave), called in zip(res.windows, calls):
        assert before <= enter <= called < leave, "the window holds the whole all-reduce call"
        assert leave - enter >= 0.01
    assert all(a[1] <= b[0] for a, b in zip(res.windows, res.windows[1:]))
    assert abs(res.exchange_s - sum(b - a for a, b in res.windows)) < 0.01


def _plain_sgd(params: Any) -> torch.optim.Optimizer:
    return torch.optim.SGD(params, lr=0.05)


PLAIN = dataclasses.replace(get_task("digits"), optimizer=_plain_sgd)  # 64 -> 128 -> 64 -> 10: two 8192-element weights


def _streaming(task: Any, block: int = 1024) -> Trainer:
    t = Trainer(task, 0, 0, fuse=False)
    t.stream_block, t.stream_min = block, 2 * block
    return t


@pytest.mark.parametrize("per_member", [[40, 40, 40], [40, 25, 0]], ids=["even", "uneven"])
def test_streamed_weights_match_one_process_with_the_n_times_batch(per_member):
    """With plain SGD the MLP's two large weights are streamed (8 row blocks each, one
    all-reduce a block): members stay bit-identical and end where one process with the N-times
    batch and an ordinary gradient ends, a member with no samples left taking part in every block."""
    world, bs, steps = 3, 8, 5
    samples = _split(world, per_member)
    trainers, errors = run_members(world, lambda r, link: synced_member(PLAIN, r, world, link, samples[r], bs, steps,
                                                                        counts=per_member, stream_block=1024))
    assert errors == [None] * world
    assert trainers[0].sync_parts == 1 + 8 + 8
    assert len(trainers[0].sync_trace) == steps * 17
    assert_bit_identical([t.host_buffer() for t in trainers], [t.sync_trace for t in trainers])
    ref = reference_trainer(PLAIN, samples, bs, steps)
    got, want = trainers[0].params(), ref.params()
    assert np.abs(got - want).max() <= 1e-5 * max(1.0, float(np.abs(want).max())), np.abs(got - want).max()
    assert np.abs(got - Trainer(PLAIN, 0, 0, fuse=False).params()).max() > 1e-3  # it trained


def test_a_streamed_weight_never_gets_a_gradient_of_its_size():
    t = _streaming(PLAIN)
    grads = t.grad_buffer()
    big = [m.weight for m in t.model.modules() if isinstance(m, torch.nn.Linear) and m.weight.numel() >= 2048]
    assert len(big) == 2
    assert grads.numel() == t.numel - sum(p.numel() for p in big) + 1
    seen: list[tuple[int, int]] = []

    def allreduce(buf: np.ndarray, n: int, s: int, part: int) -> None:
        seen.append((s, part))
        assert buf.size <= 1024 + 1 or part == 0
        assert all(p.grad is None for p in big), "no whole-weight gradient while a step averages"

    t.train_synced(np.arange(16), 8, 2, allreduce)
    assert seen == [(s, p) for s in range(2) for p in range(17)]
    assert all(p.grad is None for p in big)
    assert t._block is not None and t._block.numel() == 1024 + 1


def _same_steps(task: Any, steps: int = 3) -> tuple[np.ndarray, np.ndarray]:
    """One member's parameters after ``steps`` steps streamed and not (an all-reduce of one
    member leaves the buffer as it is: the average is its own gradient)."""
    out = []
    for t in (_streaming(task), Trainer(task, 0, 0, fuse=False)):
        t.train_synced(np.arange(8 * steps), 8, steps, lambda buf, n, s, part: None)
        out.append(t.params())
    return out[0], out[1]


def test_a_streamed_step_is_plain_sgds_own_step():
    streamed, plain = _same_steps(PLAIN)
    assert np.abs(streamed - plain).max() <= 1e-6, np.abs(streamed - plain).max()


class _Reused(torch.nn.Module):
    """A weight its layer uses and the forward uses again directly: autograd adds the second use
    to ``.grad``, which the streamed blocks must take in too."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = torch.nn.Linear(64, 64)
        self.out = torch.nn.Linear(64, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.fc(x)) + 0.1 * torch.tanh(x @ self.fc.weight.t())
        return self.out(h)


def test_a_streamed_weight_used_outside_its_layer_takes_both_gradients():
    task = dataclasses.replace(PLAIN, model=_Reused)
    t = _streaming(task)
    assert t.sync_parts > 1  # fc's weight (4096 elements) is streamed
    streamed, plain = _same_steps(task)
    assert np.abs(streamed - plain).max() <= 1e-6, np.abs(streamed - plain).max()


class _Tied(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = torch.nn.Linear(64, 64), torch.nn.Linear(64, 64)
        self.b.weight = self.a.weight
        self.out = torch.nn.Linear(64, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(torch.relu(self.b(torch.relu(self.a(x)))))


def _partly(params: Any) -> torch.optim.Optimizer:
    return torch.optim.SGD(list(params)[2:], lr=0.05)  # the first layer is not the optimizer's


@pytest.mark.parametrize("task,want", [(TASKS["mlp-sgd-momentum"], []), (get_task("digits-cnn"), []),
                                       (dataclasses.replace(PLAIN, model=_Tied), []),
                                       (dataclasses.replace(PLAIN, optimizer=_partly), ["2.weight"])],
                         ids=["momentum", "adam", "tied-weight", "weight-outside-the-optimizer"])
def test_only_plain_sgd_streams_and_only_weights_it_alone_steps(task, want):
    """Streaming takes plain SGD's step itself: with momentum or Adam, for a weight two layers
    share, or one the optimizer does not step, the gradient stays in the buffer."""
    t = _streaming(task)
    names = {id(p): n for n, p in t.model.named_parameters()}
    assert t.sync_parts == 1 + 8 * len(want)
    assert [names[id(p)] for p, _ in t._streamed] == want
    assert t.grad_buffer().numel() == t.numel + 1 - 8192 * len(want)
