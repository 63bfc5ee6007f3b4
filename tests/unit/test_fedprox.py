"""FedProx's proximal term in the trainer against autograd of the explicit term
``(mu/2)||w - w_start||^2`` added to the loss."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from dml.common.task import ArrayDataset, Context, Task
from dml.common.tasks import get_task
from dml.peer.trainer import TaskError, Trainer

SEED = 7


def _data(n: int = 96, features: int = 8, classes: int = 3) -> ArrayDataset:
    rng = np.random.default_rng(0)
    return ArrayDataset(rng.normal(size=(n, features)).astype(np.float32), rng.integers(0, classes, n).astype(np.int64))


def _task(optimizer, model=None) -> Task:
    data = _data()
    return Task(model=model or (lambda: torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 3))),
                train=lambda ctx: data, optimizer=optimizer)


def _explicit(task: Task, mu: float, samples: np.ndarray, batch: int, lr: float | None = None) -> np.ndarray:
    """The same steps with the proximal term written into the loss and differentiated by autograd."""
    torch.manual_seed(SEED)
    model = task.model()
    params = list(model.parameters())
    opt = task.optimizer(params) if task.optimizer is not None else torch.optim.SGD(params, lr=lr or 0.1)
    if lr:
        for g in opt.param_groups:
            g["lr"] = lr
    start = [p.detach().clone() for p in params]
    x, y = task.train(Context(seed=SEED)).arrays
    for i in range(0, samples.size, batch):
        idx = samples[i : i + batch]
        opt.zero_grad()
        loss = F.cross_entropy(model(torch.from_numpy(x[idx])), torch.from_numpy(y[idx]))
        loss = loss + mu / 2 * sum(((p - s) ** 2).sum() for p, s in zip(params, start))
        loss.backward()
        opt.step()
    return torch.cat([p.detach().reshape(-1) for p in params]).numpy()


@pytest.mark.parametrize("name,optimizer", [
    ("sgd-momentum", lambda ps: torch.optim.SGD(ps, lr=0.05, momentum=0.9)),
    ("adam", lambda ps: torch.optim.Adam(ps, lr=1e-2)),
])
def test_proximal_gradient_equals_autograd_of_the_explicit_term(name: str, optimizer) -> None:
    task = _task(optimizer)
    mu = 0.5
    samples = np.random.default_rng(1).permutation(96)[:64].astype(np.int64)
    tr = Trainer(task, SEED, None, prox_mu=mu)
    tr.train_on(samples, 8)  # 8 steps: the parameters move away from w_start, so the term matters
    want = _explicit(task, mu, samples, 8)
    got = tr.params()[: want.size]
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    without = Trainer(task, SEED, None)
    without.train_on(samples, 8)
    assert not np.allclose(without.params()[: want.size], want, rtol=1e-5, atol=1e-6), "mu made no difference"


def test_plain_sgd_mlp_takes_real_gradients_with_the_term() -> None:
    """The built-in MLP with plain SGD is fused by default, which could not add the term: with
    prox_mu it trains unfused and matches the explicit term."""
    task = get_task("digits")
    assert Trainer(task, SEED, 0.1).fused_sgd
    tr = Trainer(task, SEED, 0.1, prox_mu=2.0)
    assert not tr.fused_sgd
    samples = np.arange(0, 320, dtype=np.int64)
    tr.train_on(samples, 32)
    want = _explicit(task, 2.0, samples, 32, lr=0.1)
    np.testing.assert_allclose(tr.params()[: want.size], want, rtol=1e-5, atol=1e-6)


def test_the_term_starts_from_each_trainings_own_start() -> None:
    """w_start is re-taken at every call (a round's committed parameters), not kept from the first."""
    task = _task(lambda ps: torch.optim.SGD(ps, lr=0.1))
    samples = np.arange(32, dtype=np.int64)
    a = Trainer(task, SEED, None, prox_mu=1.0)
    a.train_on(samples, 8)
    mid = a.params()
    a.train_on(samples, 8)
    b = Trainer(task, SEED, None, prox_mu=1.0)
    b.set_params(mid)
    b.train_on(samples, 8)
    np.testing.assert_array_equal(a.params(), b.params())


def test_frozen_parameters_stay_frozen_and_gradients_are_views() -> None:
    def model():
        m = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 3))
        m[0].weight.requires_grad_(False)
        return m

    task = _task(lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.5), model=model)
    tr = Trainer(task, SEED, None, prox_mu=1.0)
    frozen = tr.model[0].weight.detach().clone()
    tr.train_on(np.arange(64, dtype=np.int64), 8)
    assert torch.equal(tr.model[0].weight, frozen)
    assert tr.model[0].weight.grad is None
    g = tr.model[2].weight.grad
    assert g is not None and not g.any(), "zeroed after the round, in place"
    base, size = tr._prox._grad.data_ptr(), tr._prox._grad.numel() * 4
    assert base <= g.data_ptr() < base + size, "the gradient is a view of the flat gradient buffer"


def test_a_task_that_replaces_gradients_gets_a_task_error() -> None:
    class Bad(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(8, 3)

        def forward(self, x):
            self.lin.weight.grad = None  # swaps the gradient out from under the trainer
            return self.lin(x)

    task = _task(lambda ps: torch.optim.SGD(ps, lr=0.1), model=Bad)
    tr = Trainer(task, SEED, None, prox_mu=1.0)
    with pytest.raises(TaskError, match="gradient was replaced"):
        tr.train_on(np.arange(16, dtype=np.int64), 8)


def test_bad_mu_is_refused() -> None:
    with pytest.raises(ValueError, match="prox_mu"):
        Trainer(_task(None), SEED, 0.1, prox_mu=-1.0)
    with pytest.raises(ValueError, match="prox_mu"):
        Trainer(_task(None), SEED, 0.1, prox_mu=float("nan"))
