"""The outer optimizer (DiLoCo's outer step) against a hand computation, its state, and the rules
that keep members bit-identical."""
from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from dml.peer.outer import OuterOptimizer


def _hand(kind: str, lr: float, mom: float, w0: np.ndarray, deltas: list[np.ndarray]) -> list[np.ndarray]:
    """torch.optim.SGD's (nesterov) momentum written out in float64: each round's average is
    ``w - delta``, its pseudo-gradient ``g = w - average = delta``; buf = g on the first step,
    then buf = mom * buf + g; the step is g + mom * buf (nesterov) or buf; w -= lr * step."""
    w = w0.astype(np.float64)
    buf = None
    out = []
    for d in deltas:
        g = d.astype(np.float64)
        buf = g.copy() if buf is None else mom * buf + g
        step = g + mom * buf if kind == "nesterov" else buf
        w = w - lr * step
        out.append(w.copy())
    return out


@pytest.mark.parametrize("kind", ["nesterov", "sgd"])
def test_outer_step_matches_the_hand_computation(kind: str) -> None:
    rng = np.random.default_rng(1)
    n, lr, mom = 1000, 0.7, 0.9
    w = rng.normal(size=n).astype(np.float32)
    deltas = [(0.01 * rng.normal(size=n)).astype(np.float32) for _ in range(4)]
    want = _hand(kind, lr, mom, w, deltas)
    opt = OuterOptimizer(kind, lr, mom, n)
    for i, d in enumerate(deltas):
        committed = w.copy()
        buf = committed - d  # what the ring returned
        opt.step(committed, buf)
        np.testing.assert_allclose(buf, want[i], rtol=0, atol=1e-5)
        assert np.array_equal(committed, w), "the committed parameters are read, never written"
        w = buf
    # Not the average itself: with lr 0.7 and momentum the result moved past it.
    assert not np.allclose(w, want[0])


def test_first_nesterov_step_is_lr_times_one_plus_momentum() -> None:
    committed = np.array([1.0, -2.0, 0.5], dtype=np.float32)
    average = np.array([0.9, -1.5, 0.5], dtype=np.float32)
    opt = OuterOptimizer("nesterov", 0.7, 0.9, 3)
    opt.step(committed, average)
    g = np.array([0.1, -0.5, 0.0])
    np.testing.assert_allclose(average, committed - 0.7 * 1.9 * g, rtol=1e-6)
    np.testing.assert_allclose(opt.momentum(), g, rtol=1e-6)


def test_members_with_the_same_inputs_stay_bit_identical() -> None:
    rng = np.random.default_rng(2)
    n = 4097
    members = [OuterOptimizer("nesterov", 0.7, 0.9, n) for _ in range(3)]
    w = rng.normal(size=n).astype(np.float32)
    for _ in range(5):
        avg = (w - 0.05 * rng.normal(size=n)).astype(np.float32)
        outs = []
        for m in members:
            buf = avg.copy()
            m.step(w.copy(), buf)
            outs.append(buf)
        assert all(o.tobytes() == outs[0].tobytes() for o in outs)
        w = outs[0]
    assert len({m.momentum().tobytes() for m in members}) == 1


def test_a_restored_state_continues_bit_for_bit() -> None:
    rng = np.random.default_rng(3)
    n = 500
    a = OuterOptimizer("nesterov", 0.7, 0.9, n)
    w = rng.normal(size=n).astype(np.float32)
    for _ in range(2):
        buf = (w - 0.1).astype(np.float32)
        a.step(w.copy(), buf)
        w = buf
    b = OuterOptimizer("nesterov", 0.7, 0.9, n)
    b.load_state_dict(copy.deepcopy(a.state_dict()))
    avg = (w - 0.2 * rng.normal(size=n)).astype(np.float32)
    ra, rb = avg.copy(), avg.copy()
    a.step(w.copy(), ra)
    b.step(w.copy(), rb)
    assert ra.tobytes() == rb.tobytes()
    # Restoring the state from before a step undoes that step's momentum (a re-issued round).
    before = copy.deepcopy(a.state_dict())
    again = avg.copy()
    a.step(w.copy(), again)
    a.load_state_dict(before)
    redo = avg.copy()
    a.step(w.copy(), redo)
    assert redo.tobytes() == again.tobytes()


def test_an_empty_state_means_no_momentum_yet() -> None:
    n = 10
    fresh = OuterOptimizer("nesterov", 0.7, 0.9, n).state_dict()
    opt = OuterOptimizer("nesterov", 0.7, 0.9, n)
    buf = np.zeros(n, dtype=np.float32)
    opt.step(np.ones(n, dtype=np.float32), buf)
    assert opt.momentum() is not None
    opt.load_state_dict(fresh)
    assert opt.momentum() is None


def test_bad_inputs_are_refused() -> None:
    with pytest.raises(ValueError, match="unknown outer optimizer"):
        OuterOptimizer("adam", 0.7, 0.9, 3)
    with pytest.raises(ValueError, match="unknown outer optimizer"):
        OuterOptimizer("none", 0.7, 0.9, 3)
    opt = OuterOptimizer("sgd", 0.7, 0.9, 3)
    flat = np.zeros(4, dtype=np.float32)
    with pytest.raises(ValueError, match="share memory"):
        opt.step(flat[:3], flat[:3])
    with pytest.raises(ValueError, match="3 parameters"):
        opt.step(np.zeros(2, dtype=np.float32), np.zeros(2, dtype=np.float32))
    with pytest.raises(ValueError, match="float32"):
        opt.step(np.zeros(3, dtype=np.float32), np.zeros(3, dtype=np.float64))
    other = OuterOptimizer("sgd", 0.7, 0.9, 5)
    other.step(np.ones(5, dtype=np.float32), np.zeros(5, dtype=np.float32))
    with pytest.raises(ValueError, match="shape"):
        opt.load_state_dict(other.state_dict())
    with pytest.raises(ValueError, match="not an outer optimizer state"):
        opt.load_state_dict({"nothing": 1})
    assert isinstance(opt.state_dict()["param_groups"][0]["lr"], float)
    assert torch.is_tensor(other.state_dict()["state"][0]["momentum_buffer"])


def test_the_job_flags_reach_the_spec_and_zero_momentum_stays_zero() -> None:
    from dml.client import cli
    from dml.common.spec import spec_from_pb, spec_to_pb, with_defaults

    a = cli.build_parser().parse_args(["submit", "--outer-optimizer", "nesterov", "--outer-lr", "0.5",
                                       "--outer-momentum", "0", "--prox-mu", "0.01"])
    spec = cli.spec_from_args(a)
    assert (spec.outer_optimizer, spec.outer_lr, spec.outer_momentum, spec.prox_mu) == ("nesterov", 0.5, 0.0, 0.01)
    # What the coordinator makes of it: 0 momentum is a value, not proto3's "unset".
    back = with_defaults(spec_from_pb(spec_to_pb(spec)))
    assert (back.outer_optimizer, back.outer_momentum, back.prox_mu) == ("nesterov", 0.0, 0.01)
    d = cli.spec_from_args(cli.build_parser().parse_args(["submit"]))
    assert (d.outer_optimizer, d.outer_lr, d.outer_momentum, d.prox_mu) == ("none", 0.7, 0.9, 0.0)


@pytest.mark.parametrize("argv,words", [
    (["--outer-optimizer", "adam"], "invalid choice: 'adam'"),
    (["--outer-lr", "0"], "--outer-lr: must be in (0, 100]"),
    (["--outer-momentum", "1"], "--outer-momentum: must be in [0, 1)"),
    (["--prox-mu", "-0.1"], "--prox-mu: must be in [0, 1e+06]"),
])
def test_bad_job_flags_exit_2_with_one_line(argv: list[str], words: str, capsys: pytest.CaptureFixture[str]) -> None:
    from dml.client import cli

    with pytest.raises(SystemExit) as e:
        cli.build_parser().parse_args(["submit", *argv])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert words in err, err
