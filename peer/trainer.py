"""Local training with torch over a flat parameter buffer. Imports no gRPC.

The model's floating-point parameters and buffers are re-pointed into one contiguous float32
tensor (plus one spare element for the all-reduce weight), so training updates it in place and
the exchange reads and writes it with no copy.
"""
from __future__ import annotations

import functools
import io
import logging
import threading
from typing import Any
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from dml.common.tasks import Task

log = logging.getLogger(__name__)
EVAL_BATCH = 32
_INIT_LOCK = threading.Lock()  # torch's seed is global: peers sharing a process build one at a time


class _SGDLinear(torch.autograd.Function):
    """``x @ W.T + b`` whose backward applies plain SGD to ``W`` and ``b`` in place.

    Backward first computes the gradient for the layer below from the old weights, then does
    ``W -= lr * g.T @ x`` as one in-place GEMM (``addmm_``): the weight gradient is never
    materialised, so training holds no model-sized gradient. Every gradient is still taken at
    the old weights, so this is exactly a plain SGD step (up to float rounding order)."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, lr: float) -> torch.Tensor:
        ctx.save_for_backward(x, weight)
        ctx.lr = lr
        ctx.bias = bias
        return F.linear(x, weight, bias)

    @staticmethod
    def backward(ctx: Any, g: torch.Tensor) -> tuple[torch.Tensor | None, None, None, None]:
        x, weight = ctx.saved_tensors
        grad_x = g @ weight if ctx.needs_input_grad[0] else None
        with torch.no_grad():
            weight.addmm_(g.t(), x, alpha=-ctx.lr)
            if ctx.bias is not None:
                ctx.bias.sub_(g.sum(0), alpha=ctx.lr)
        return grad_x, None, None, None


def fuse_sgd_into_backward(model: torch.nn.Module, lr: float) -> bool:
    """Routes every ``nn.Linear`` of ``model`` through :class:`_SGDLinear` when those are all
    its parameters (the built-in tasks' MLPs); returns False and changes nothing otherwise, and
    training then takes ordinary optimizer steps."""
    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    owned = {id(p) for m in linears for p in m.parameters(recurse=False)}
    if not linears or any(id(p) not in owned for p in model.parameters()):
        return False
    for m in linears:
        m.forward = functools.partial(_fused_forward, m, lr)  # type: ignore[method-assign]
    return True


def _fused_forward(m: torch.nn.Linear, lr: float, x: torch.Tensor) -> torch.Tensor:
    if not torch.is_grad_enabled():  # evaluation: a plain linear layer
        return F.linear(x, m.weight, m.bias)
    return _SGDLinear.apply(x, m.weight, m.bias, lr)


@dataclass
class StepResult:
    """What one round of local training did."""

    samples: int
    loss: float


class Trainer:
    """A task's model, its flat buffer, plain SGD and the data, on one device.

    Plain SGD keeps no optimizer state, so restoring the parameters restores the whole training
    state: a round re-run after a membership change starts from exactly the committed point.
    """

    def __init__(self, task: Task, seed: int, lr: float, device: str = "cpu") -> None:
        self.task = task
        self.device = torch.device(device)
        # Held around every SGD step and by whatever else changes the parameters in place (a
        # gossip partner's averaging), so that never lands in the middle of a step.
        self.lock = threading.Lock()
        self.version = 0  # SGD steps taken (under the lock): tells whether the parameters moved
        with _INIT_LOCK:
            torch.manual_seed(seed)
            self.model = task.build_model().to(self.device)
        tensors = [p for p in self.model.parameters()] + [
            b for b in self.model.buffers() if b.is_floating_point()
        ]
        self.numel = sum(t.numel() for t in tensors)
        # Host-side flat buffer (exchanged over the wire) and the device one training uses.
        self.flat = torch.zeros(self.numel + 1, dtype=torch.float32, device=self.device)
        offset = 0
        for t in tensors:
            n = t.numel()
            self.flat[offset : offset + n].copy_(t.detach().reshape(-1))
            t.data = self.flat[offset : offset + n].view_as(t)
            offset += n
        self.optimizer = torch.optim.SGD(self.model.parameters(), lr=lr)
        # Plain SGD on an MLP can apply each layer's update inside backward, straight into the
        # weights, so no gradient the size of the model ever exists (see _SGDLinear).
        self.fused_sgd = fuse_sgd_into_backward(self.model, lr)
        self._layout = [(name, t.shape, off) for name, t, off in self._named_slices()]
        data = task.load()
        self.data = data
        self._x = torch.from_numpy(data.x_train).to(self.device)
        self._y = torch.from_numpy(data.y_train).to(self.device)
        self._xt = torch.from_numpy(data.x_test).to(self.device)
        self._yt = torch.from_numpy(data.y_test).to(self.device)

    # -- parameters ------------------------------------------------------------------------
    def host_buffer(self) -> np.ndarray:
        """The flat buffer (parameters then the weight slot) as a float32 numpy array.

        On CPU this is a view of the live parameters; on CUDA a host copy that
        :meth:`load_host_buffer` writes back.
        """
        if self.device.type == "cpu":
            return self.flat.numpy()
        return self.flat.cpu().numpy()

    def load_host_buffer(self, buf: np.ndarray) -> None:
        """Writes a host buffer back into the parameters (a no-op for the CPU view itself)."""
        if self.device.type == "cpu" and np.shares_memory(buf, self.flat.numpy()):
            return
        self.flat.copy_(torch.from_numpy(buf))

    def params_view(self) -> tuple[np.ndarray, bool]:
        """The parameters without a copy where possible: (array, True) for the live CPU buffer
        (valid until the next training step), (host copy, False) on an accelerator."""
        if self.device.type == "cpu":
            return self.flat.numpy()[: self.numel], True
        return self.params(), False

    def params(self) -> np.ndarray:
        """A copy of the parameters (without the weight slot)."""
        return self.flat[: self.numel].cpu().numpy().copy()

    def set_params(self, params: np.ndarray) -> None:
        """Overwrites the parameters from a flat float32 array."""
        if params.size != self.numel:
            raise ValueError(f"parameter count mismatch: got {params.size}, model has {self.numel}")
        self.flat[: self.numel].copy_(torch.from_numpy(np.ascontiguousarray(params, dtype=np.float32)))

    def params_from_state_dict(self, sd: dict[str, Any]) -> np.ndarray:
        """The flat parameters a state_dict of this model holds (a new array; the model is not
        touched). ValueError when an entry is missing, misshapen or not float32."""
        out = np.empty(self.numel, dtype=np.float32)
        for name, shape, off in self._layout:
            t = sd.get(name)
            if not isinstance(t, torch.Tensor) or tuple(t.shape) != tuple(shape) or t.dtype != torch.float32:
                raise ValueError(f"state_dict entry {name!r} is missing or not a float32 tensor of shape {tuple(shape)}")
            n = t.numel()
            out[off : off + n] = t.detach().reshape(-1).cpu().numpy()
        return out

    def _named_slices(self) -> list[tuple[str, torch.Tensor, int]]:
        base = self.flat.data_ptr()
        out = []
        for name, t in self.model.state_dict(keep_vars=True).items():
            if t.is_floating_point() and t.dtype == torch.float32 and t.numel():
                out.append((name, t, (t.data_ptr() - base) // 4))
        return out

    def state_dict_bytes(self, params: np.ndarray | None = None) -> memoryview:
        """The model's state_dict (of ``params`` if given, else the live ones), torch.save'd
        into memory (see :meth:`save_state_dict`); a view of the bytes, not a copy."""
        out = io.BytesIO()
        self.save_state_dict(out, params)
        return out.getbuffer()

    def save_state_dict(self, f: Any, params: np.ndarray | None = None) -> None:
        """torch.save's the model's state_dict (of ``params`` if given, else the live ones) to
        the file object ``f``. The float tensors are views of one flat array, which torch.save
        writes once (it keeps views of a storage as views): no copy of the model is made.
        Loading gives tensors that share one storage."""
        if params is None:
            params, _ = self.params_view()
        base = torch.from_numpy(np.ascontiguousarray(params[: self.numel], dtype=np.float32))
        flat = {name for name, _, _ in self._layout}
        sd = {k: v.detach().cpu().clone() for k, v in self.model.state_dict().items() if k not in flat}
        for name, shape, off in self._layout:
            n = int(np.prod(shape)) if len(shape) else 1
            sd[name] = base[off : off + n].view(shape)
        torch.save(sd, f)

    @staticmethod
    def warm_up() -> None:
        """Imports what a first job would (the optimizer pulls in much of torch), so a peer's
        start-up, not its first round, pays that time and memory."""
        torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1)

    # -- training --------------------------------------------------------------------------
    def train(self, indices: np.ndarray, steps: int, batch_size: int, rng: np.random.Generator) -> StepResult:
        """Runs ``steps`` SGD steps on full mini-batches drawn from ``indices`` without
        replacement, reshuffling when fewer than ``batch_size`` remain (a batch is never larger
        than the shard). Returns samples processed and their mean loss."""
        if indices.size == 0:
            raise ValueError("no training samples assigned")
        batch_size = min(batch_size, int(indices.size))
        order = rng.permutation(indices)
        pos, batches = 0, []
        for _ in range(steps):
            if pos + batch_size > order.size:
                order, pos = rng.permutation(indices), 0
            batches.append(order[pos : pos + batch_size])
            pos += batch_size
        return self._run(batches)

    def train_on(self, samples: np.ndarray, batch_size: int) -> StepResult:
        """One SGD step per ``batch_size`` consecutive samples of ``samples``, in order (the last
        batch may be smaller). The coordinator's plan fixes ``samples``; none means no step."""
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        return self._run([samples[i : i + batch_size] for i in range(0, samples.size, batch_size)])

    def _run(self, batches: list[np.ndarray]) -> StepResult:
        self.model.train()
        total, loss_sum = 0, 0.0
        for idx in batches:
            batch = torch.from_numpy(np.ascontiguousarray(idx, dtype=np.int64)).to(self.device)
            with self.lock:
                self.optimizer.zero_grad(set_to_none=True)
                loss = F.cross_entropy(self.model(self._x[batch]), self._y[batch])
                loss.backward()
                self.optimizer.step()
                self.version += 1
            total += int(batch.numel())
            loss_sum += float(loss.detach()) * int(batch.numel())
        self.optimizer.zero_grad(set_to_none=True)  # gradients are not needed past the round
        return StepResult(samples=total, loss=loss_sum / max(total, 1))

    @torch.no_grad()
    def evaluate(self, batch_size: int = EVAL_BATCH) -> tuple[float, float]:
        """Test accuracy in [0, 1] and mean test loss of the current parameters, computed in
        batches so activations never take more than a batch's worth of memory."""
        self.model.eval()
        n = int(self._yt.numel())
        if n == 0:
            return float("nan"), float("nan")
        correct, loss_sum = 0, 0.0
        for i in range(0, n, batch_size):
            logits = self.model(self._xt[i : i + batch_size])
            y = self._yt[i : i + batch_size]
            loss_sum += float(F.cross_entropy(logits, y, reduction="sum"))
            correct += int((logits.argmax(1) == y).sum())
        return correct / n, loss_sum / n
