"""Local training of a :class:`dml.Task` with torch over a flat parameter buffer. Imports no gRPC.

The model's floating-point parameters and buffers are re-pointed into one contiguous float32
tensor (plus one spare element for the all-reduce weight), so training updates it in place and
the exchange reads and writes it with no copy.
"""
from __future__ import annotations

import contextlib
import functools
import io
import logging
import math
import os
import pathlib
import threading
import time
import traceback
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

import dml.aggregation
import dml.common
import dml.peer
from dml.aggregation import digests
from dml.common.spec import PRECISIONS
from dml.common.task import MAX_METRIC_NAME, MAX_METRICS, Context, Task
from dml.peer import trainstate
from dml.peer.datacache import RowArray
from dml.peer.diskcopy import DiskCopy

log = logging.getLogger(__name__)
EVAL_BATCH = 32
# --sync grads with plain SGD: a Linear weight larger than STREAM_MIN_ELEMS gets no gradient
# buffer of its own; its gradient is taken after backward in row blocks of about
# STREAM_BLOCK_ELEMS, each all-reduced and applied before the next is made (Trainer.train_synced).
STREAM_BLOCK_ELEMS = 1 << 20  # 4 MiB of float32 per block
STREAM_MIN_ELEMS = 2 * STREAM_BLOCK_ELEMS
SCALER = "scaler"  # the state part of --precision fp16's GradScaler
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


class _GradLinear(torch.autograd.Function):
    """``x @ W.T + b`` whose backward adds the weight and bias gradients straight into
    ``W.grad`` and ``b.grad`` (``--sync grads``: views of the flat gradient buffer) with one
    in-place GEMM (``addmm_``), instead of handing autograd a new model-sized tensor to add
    there: the largest layer's gradient then never exists twice. The values are the same
    products autograd takes; only where they are summed differs."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        ctx.save_for_backward(x, weight)
        ctx.bias = bias
        return F.linear(x, weight, bias)

    @staticmethod
    def backward(ctx: Any, g: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
        x, weight = ctx.saved_tensors
        bias = ctx.bias
        grad_x = g @ weight if ctx.needs_input_grad[0] else None
        g2, x2 = g.reshape(-1, g.shape[-1]), x.reshape(-1, x.shape[-1])
        gw = gb = None
        stash = getattr(weight, "_dml_stream", None)
        with torch.no_grad():
            if stash is not None:  # a streamed weight: its gradient is taken later, block by block
                stash.append((g2, x2))
            elif weight.grad is not None and weight.grad.shape == weight.shape:
                weight.grad.addmm_(g2.t(), x2)
            elif ctx.needs_input_grad[1]:  # no buffer to write into: an ordinary gradient
                gw = g2.t() @ x2
            if bias is not None:
                if bias.grad is not None and bias.grad.shape == bias.shape:
                    bias.grad.add_(g2.sum(0))
                elif ctx.needs_input_grad[2]:
                    gb = g2.sum(0)
        return grad_x, gw, gb


def grads_into_buffer(model: torch.nn.Module) -> int:
    """Routes every plain ``nn.Linear`` of ``model`` (the class itself, not a subclass with a
    forward of its own) through :class:`_GradLinear`; returns how many. Other layers keep
    autograd's own accumulation into their ``.grad`` views. Gradient hooks registered on those
    weights are then not called (the gradient is never handed to autograd)."""
    linears = [m for m in model.modules() if type(m) is torch.nn.Linear and m.weight.requires_grad]
    for m in linears:
        m.forward = functools.partial(_grad_forward, m)  # type: ignore[method-assign]
    return len(linears)


def _grad_forward(m: torch.nn.Linear, x: torch.Tensor) -> torch.Tensor:
    if not torch.is_grad_enabled():  # evaluation: a plain linear layer
        return F.linear(x, m.weight, m.bias)
    return _GradLinear.apply(x, m.weight, m.bias)


def plain_sgd(optimizer: torch.optim.Optimizer) -> float | None:
    """The learning rate if ``optimizer`` is exactly plain SGD (``torch.optim.SGD`` itself, one
    param group, no momentum, weight decay, Nesterov or maximize), else None."""
    if type(optimizer) is not torch.optim.SGD or len(optimizer.param_groups) != 1:
        return None
    g = optimizer.param_groups[0]
    if g.get("momentum", 0) or g.get("weight_decay", 0) or g.get("nesterov", False) or g.get("maximize", False):
        return None
    lr = g["lr"]
    return float(lr) if isinstance(lr, (int, float)) else None


def fuse_sgd_into_backward(model: torch.nn.Module, lr: float) -> bool:
    """Routes every ``nn.Linear`` of ``model`` through :class:`_SGDLinear` when those are all
    its parameters (the built-in tasks' MLPs); returns False and changes nothing otherwise, and
    training then takes ordinary optimizer steps. Only for an optimizer that :func:`plain_sgd`
    accepts: this fast path must never change which optimizer a user asked for."""
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
    exchange_s: float = 0.0  # of which spent in the steps' all-reduces (--sync grads)
    # (enter, leave) of each step's all-reduce, wall-clock seconds (--sync grads): with the other
    # members' windows, the wait for the slowest member tells apart from the all-reduce itself.
    # With streamed weights a step's window runs from its buffer's all-reduce to its last block's,
    # the blocks' gradient products in between included (exchange_s counts the all-reduces only).
    windows: list[tuple[float, float]] = field(default_factory=list)


# --sync grads: averages one buffer of a step's gradient in place across the ring, given the
# buffer (gradients, then the weight slot), this member's samples in the step, the step's index
# and the part's (Trainer.sync_parts per step: the flat gradient buffer is part 0, each row
# block of a streamed weight one more, in the same order on every member).
AllReduce = Callable[[np.ndarray, int, int, int], None]


class TaskError(Exception):
    """The user's task failed (building its model, optimizer or data, or a step): the message
    names the part and carries the task's own error."""


@dataclass
class Evaluation:
    """Test metrics of the current parameters. Unpacks as ``(accuracy, loss)``."""

    accuracy: float
    loss: float
    metrics: dict[str, float]

    def __iter__(self) -> Iterator[float]:
        return iter((self.accuracy, self.loss))


USER_FRAMES = 4  # the innermost frames of the user's code a TaskError shows
# Frames in these folders are dml's or torch's, not the user's (their package folders).
_LIBRARY_DIRS = tuple(str(pathlib.Path(p).resolve()) + os.sep for p in
                      {os.path.dirname(m.__file__ or "") for m in (torch, np, dml.common, dml.peer, dml.aggregation)}
                      if p)


def user_frames(e: BaseException, root: pathlib.Path | None = None, limit: int = USER_FRAMES) -> str:
    """The innermost ``limit`` frames of ``e``'s traceback that are the user's code (not dml's,
    torch's or numpy's), one ``\n  File, line, in function: source`` each ("" when none is).
    Files under ``root`` (an extracted bundle) are shown relative to it."""
    base = str(root.resolve()) + os.sep if root is not None else None
    frames = []
    for f in traceback.extract_tb(e.__traceback__):
        path = str(pathlib.Path(f.filename).resolve()) if not f.filename.startswith("<") else f.filename
        if path.startswith(_LIBRARY_DIRS) or "importlib._bootstrap" in f.filename:
            continue
        shown = path[len(base):] if base is not None and path.startswith(base) else f.filename
        frames.append(f"\n  File \"{shown}\", line {f.lineno}, in {f.name}" + (f": {f.line.strip()}" if f.line else ""))
    return "".join(frames[-limit:])


def _call(what: str, fn: Callable[..., Any], *args: Any) -> Any:
    """Calls a task's function, turning its failure into a :class:`TaskError` naming ``what``,
    with the innermost lines of the user's traceback."""
    try:
        return fn(*args)
    except Exception as e:  # noqa: BLE001 - the user's code may raise anything
        raise TaskError(f"{what} raised {type(e).__name__}: {e}{user_frames(e)}") from e


class _Proximal:
    """FedProx's proximal term over the flat buffer: the gradients of the trained parameters are
    views into one flat gradient buffer laid out as ``flat``'s parameters are, so adding
    ``mu * (w - w_start)`` to all of them is one subtraction and one scaled add over the whole
    model, not a loop over tensors. The gradients stay attached between steps (zeroed in place,
    never set to None): backward accumulates into them in place."""

    def __init__(self, flat: torch.Tensor, params: list[torch.nn.Parameter], mu: float) -> None:
        self.mu = mu
        self.n = sum(p.numel() for p in params)  # the parameters come first in the flat buffer
        self._w = flat[: self.n]
        self._anchor = torch.zeros(self.n, dtype=flat.dtype, device=flat.device)
        self._diff = torch.zeros(self.n, dtype=flat.dtype, device=flat.device)
        self._grad = torch.zeros(self.n, dtype=flat.dtype, device=flat.device)
        base = flat.data_ptr()
        self._views: list[tuple[torch.nn.Parameter, torch.Tensor]] = []
        for p in params:
            if not p.requires_grad:  # frozen: no gradient, so the optimizer leaves it alone
                continue
            off = (p.data_ptr() - base) // flat.element_size()
            self._views.append((p, self._grad[off : off + p.numel()].view_as(p)))

    def begin(self) -> None:
        """Takes the current parameters as ``w_start`` and attaches the flat gradient views."""
        self._anchor.copy_(self._w)
        for p, g in self._views:
            p.grad = g

    def zero_grad(self) -> None:
        """Zeroes the gradients in place, keeping them views of the flat buffer."""
        self._grad.zero_()
        for p, g in self._views:
            if p.grad is not g:  # something replaced it (set_to_none elsewhere): attach it again
                p.grad = g

    def add_gradient(self) -> None:
        """Adds ``mu * (w - w_start)``, the proximal term's gradient, to every gradient."""
        if any(p.grad is not g for p, g in self._views):
            raise TaskError("a parameter's gradient was replaced during backward; the proximal term "
                            "needs gradients accumulated in place (no .grad assignment in the task)")
        torch.sub(self._w, self._anchor, out=self._diff)
        self._grad.add_(self._diff, alpha=self.mu)


class Batches:
    """Makes batches of a map-style dataset by sample index. An :class:`ArrayDataset` or a
    two-tensor ``TensorDataset`` is indexed all at once (a memory-mapped array is read only at
    those rows); any other dataset item by item, then ``collate``."""

    def __init__(self, dataset: Any, what: str, collate: Callable[[list[Any]], Any] | None, device: torch.device) -> None:
        self.what, self.device = what, device
        try:
            self.size = len(dataset)
        except Exception as e:  # noqa: BLE001
            raise TaskError(f"{what}: len() of the dataset raised {type(e).__name__}: {e}") from e
        self._ds = dataset
        self._collate = collate
        arrays = getattr(dataset, "arrays", None)
        if arrays is None and isinstance(dataset, torch.utils.data.TensorDataset) and len(dataset.tensors) == 2:
            arrays = dataset.tensors
        self._arrays: tuple[Any, Any] | None = None
        if arrays is not None:
            x, y = arrays
            self._arrays = (self._resident(x), self._resident(y))

    def _resident(self, a: Any) -> Any:
        """Small in-memory arrays go to the device once; memory maps and a store dataset's rows
        (fetched as batches read them) stay where they are."""
        if isinstance(a, (np.memmap, RowArray)) or self.device.type == "cpu":
            return a
        return torch.as_tensor(np.asarray(a) if isinstance(a, np.ndarray) else a).to(self.device)

    @property
    def arrays(self) -> tuple[Any, Any] | None:
        """(inputs, targets) when the dataset is array-backed."""
        return self._arrays

    def get(self, idx: np.ndarray) -> tuple[Any, Any]:
        """The batch of samples ``idx`` as (inputs, targets) on the device."""
        if self._arrays is not None:
            x, y = self._arrays
            return self._take(x, idx), self._take(y, idx)
        items = [_call(f"{self.what}[{int(i)}]", self._ds.__getitem__, int(i)) for i in idx]
        collate = self._collate or torch.utils.data.default_collate
        batch = _call(f"{self.what}: collate", collate, items)
        if not isinstance(batch, (tuple, list)) or len(batch) != 2:
            raise TaskError(f"{self.what}: an item must be (input, target), a batch of them is {type(batch).__name__}")
        return _to(batch[0], self.device), _to(batch[1], self.device)

    def _take(self, a: Any, idx: np.ndarray) -> Any:
        if isinstance(a, torch.Tensor):
            return a[torch.from_numpy(idx).to(a.device)].to(self.device)
        return torch.from_numpy(np.ascontiguousarray(a[idx])).to(self.device)


def _to(x: Any, device: torch.device) -> Any:
    if isinstance(x, torch.Tensor):
        return x.to(device)
    if isinstance(x, np.ndarray):
        return torch.from_numpy(x).to(device)
    if isinstance(x, (tuple, list)):
        return type(x)(_to(v, device) for v in x)
    if isinstance(x, dict):
        return {k: _to(v, device) for k, v in x.items()}
    return x


class Trainer:
    """A task's model, its flat buffer, its optimizer and its data, on one device.

    ``lr`` (the job's ``--lr``; 0 or None: the task's own) overrides every param group's lr.
    With ``fuse`` (default) exactly plain SGD on a model made only of ``nn.Linear`` layers is
    applied inside backward (:func:`fuse_sgd_into_backward`); any other optimizer takes its own
    ordinary steps. ``prox_mu`` > 0 adds FedProx's proximal term ``(mu/2)||w - w_start||^2``
    to the loss of every step (``w_start``: the parameters training started from, a ring
    round's committed ones), which needs real gradients: it turns the fused path off. Failures
    of the task's own code raise :class:`TaskError`.
    """

    def __init__(self, task: Task, seed: int, lr: float | None, device: str = "cpu",
                 ctx: Context | None = None, fuse: bool = True, prox_mu: float = 0.0,
                 precision: str = "fp32") -> None:
        self.task = task
        self.seed = seed
        self.device = torch.device(device)
        if precision not in PRECISIONS:
            raise ValueError(f"unknown precision {precision!r}: choose one of {', '.join(PRECISIONS)}")
        self.precision = precision
        ctx = ctx if ctx is not None else Context(seed=seed)
        self.ctx = ctx  # where the task finds its data on this peer (its labels(ctx) are read with it)
        # Held around every SGD step and by whatever else changes the parameters in place (a
        # gossip partner's averaging), so that never lands in the middle of a step.
        self.lock = threading.Lock()
        self.version = 0  # SGD steps taken (under the lock): tells whether the parameters moved
        with _INIT_LOCK:
            torch.manual_seed(seed)
            model = _call("model()", task.model)
        if not isinstance(model, torch.nn.Module):
            raise TaskError(f"model() must return a torch.nn.Module, got {type(model).__name__}")
        odd = [n for n, p in model.named_parameters() if p.dtype != torch.float32]
        if odd:
            raise TaskError(f"model(): dml trains float32 parameters; {odd[0]} is {dict(model.named_parameters())[odd[0]].dtype} "
                            "(return model.float(), and use --precision for mixed precision)")
        self.model = model.to(self.device)
        tensors = [p for p in self.model.parameters()] + [
            b for b in self.model.buffers() if b.dtype == torch.float32
        ]
        self.numel = sum(t.numel() for t in tensors)
        self.param_numel = sum(p.numel() for p in self.model.parameters())  # parameters come first, then buffers
        if self.numel == 0:
            raise TaskError("model() has no float32 parameters to train")
        # Host-side flat buffer (exchanged over the wire) and the device one training uses.
        # Empty, not zeros: each tensor is copied in, then its own storage freed, so the model
        # never exists twice (zeros touched the whole buffer first: a model-sized high-water mark).
        self.flat = torch.empty(self.numel + 1, dtype=torch.float32, device=self.device)
        self.flat[-1] = 0.0  # the weight slot
        offset = 0
        for t in tensors:
            n = t.numel()
            self.flat[offset : offset + n].copy_(t.detach().reshape(-1))
            t.data = self.flat[offset : offset + n].view_as(t)
            offset += n
        params = list(self.model.parameters())
        if task.optimizer is None:
            self.optimizer = torch.optim.SGD(params, lr=lr or 0.1)
        else:
            self.optimizer = _call("optimizer(params)", task.optimizer, params)
            if not isinstance(self.optimizer, torch.optim.Optimizer):
                raise TaskError(f"optimizer(params) must return a torch.optim.Optimizer, got {type(self.optimizer).__name__}")
        if lr:
            for g in self.optimizer.param_groups:
                g["lr"] = lr
        self.loss_fn: Callable[[Any, Any], Any] = task.loss or F.cross_entropy
        # What, beside the parameters, is the training state: each part's state_dict() is
        # snapshotted with the committed parameters, checkpointed and sent to joiners.
        self.state_parts: dict[str, Any] = {"optimizer": self.optimizer}
        # --optimizer-state average: the optimizer's floating tensors are averaged with the
        # parameters (after them in the buffer the all-reduce reads) and the digest covers them.
        self.average_state = False
        self._param_shapes = [tuple(p.shape) for g in self.optimizer.param_groups for p in g["params"]]
        self._xbuf: np.ndarray | None = None  # that buffer, reused across rounds
        self.prox_mu = float(prox_mu)
        if not (self.prox_mu >= 0 and np.isfinite(self.prox_mu)):
            raise ValueError(f"prox_mu must be finite and >= 0, got {prox_mu}")
        self._prox: _Proximal | None = _Proximal(self.flat, params, self.prox_mu) if self.prox_mu > 0 else None
        # Plain SGD on an MLP can apply each layer's update inside backward, straight into the
        # weights, so no gradient the size of the model ever exists (see _SGDLinear).
        # --precision fp16: a GradScaler (its scale is training state, like the optimizer's).
        self.scaler: torch.amp.GradScaler | None = None
        if precision == "fp16":
            self.scaler = torch.amp.GradScaler(self.device.type)
            self.state_parts[SCALER] = self.scaler
        sgd_lr = plain_sgd(self.optimizer) if fuse and self._prox is None and precision == "fp32" else None
        self.fused_sgd = sgd_lr is not None and fuse_sgd_into_backward(self.model, sgd_lr)
        self._layout = [(name, t.shape, off) for name, t, off in self._named_slices()]
        self._grads: torch.Tensor | None = None  # the flat gradient buffer (--sync grads), made on first use
        self._grad_views: list[tuple[torch.nn.Parameter, torch.Tensor]] = []
        self.stream_block = STREAM_BLOCK_ELEMS  # the streamed weights' block size (tests set it smaller)
        self.stream_min = STREAM_MIN_ELEMS
        self._streamed: list[tuple[torch.nn.Parameter, list[tuple[torch.Tensor, torch.Tensor]]]] = []
        self._block: torch.Tensor | None = None  # the streamed weights' block buffer (and weight slot)
        self._grad_buffers = slice(0, 0)  # where the float buffers' slots sit in the gradient buffer
        train = _call("train(ctx)", task.train, replace(ctx, split="train"))
        self.train_data = Batches(train, "train(ctx)", task.collate, self.device)
        if self.train_data.size == 0:
            raise TaskError("train(ctx) returned an empty dataset")
        test = _call("test(ctx)", task.test, replace(ctx, split="test")) if task.test is not None else None
        self.test_data = Batches(test, "test(ctx)", task.collate, self.device) if test is not None else None

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

    def set_params(self, params: np.ndarray | DiskCopy) -> None:
        """Overwrites the parameters from a flat float32 array (or a committed copy on disk,
        read straight into the buffer on a CPU device)."""
        if params.size != self.numel:
            raise ValueError(f"parameter count mismatch: got {params.size}, model has {self.numel}")
        if isinstance(params, DiskCopy):
            if self.device.type == "cpu":
                params.read_into(self.flat[: self.numel].numpy())
                return
            params = np.asarray(params)
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
        torch.save(self.model_state_dict(params), f)

    def model_state_dict(self, params: np.ndarray | None = None) -> dict[str, torch.Tensor]:
        """The model's state_dict (of ``params`` if given, else the live ones) whose float tensors
        are views of one CPU tensor over ``params`` (no copy of the model on CPU)."""
        if params is None:
            params, _ = self.params_view()
        base = torch.from_numpy(np.ascontiguousarray(params[: self.numel], dtype=np.float32))
        flat = {name for name, _, _ in self._layout}
        sd = {k: v.detach().cpu().clone() for k, v in self.model.state_dict().items() if k not in flat}
        for name, shape, off in self._layout:
            n = int(np.prod(shape)) if len(shape) else 1
            sd[name] = base[off : off + n].view(shape)
        return sd

    def initial_params(self) -> np.ndarray:
        """The seeded initial parameters (round 0) built again from the task and the seed, as
        every member of the job built them: what a peer that no longer holds round 0 starts a
        job rolled back to it from (coordinator.state: no live peer held the committed round
        and there is no checkpoint)."""
        with _INIT_LOCK:
            torch.manual_seed(self.seed)
            model = _call("model()", self.task.model)
        tensors = [p for p in model.parameters()] + [b for b in model.buffers() if b.dtype == torch.float32]
        out = torch.cat([t.detach().reshape(-1).float().cpu() for t in tensors]) if tensors else torch.zeros(0)
        if out.numel() != self.numel:
            raise TaskError(f"model() built again has {out.numel()} parameters, not {self.numel}")
        return out.numpy().copy()

    def reset_state(self) -> None:
        """Forgets what training built up (the optimizer's moments and steps, an outer
        momentum, fp16's loss scale): the state of a job at round 0."""
        for part in self.state_parts.values():
            if isinstance(part, torch.optim.Optimizer):
                part.state.clear()
            elif isinstance(part, torch.amp.GradScaler):
                part.load_state_dict(torch.amp.GradScaler(self.device.type).state_dict())
            elif hasattr(part, "reset"):
                part.reset()

    # -- the training state (trainstate) -----------------------------------------------------
    def capture_state(self, into: dict[str, Any] | None = None) -> dict[str, Any]:
        """A copy of the training state (every state part), made into ``into`` where it fits."""
        return trainstate.capture(self.state_parts, into)

    def restore_state(self, state: dict[str, Any]) -> None:
        """Loads a captured or downloaded training state (ValueError if it does not fit)."""
        trainstate.restore(self.state_parts, state)

    def round_digest(self, params: np.ndarray, state: dict[str, Any] | None, like: str = "") -> str:
        """The digest members compare for a round (:mod:`dml.aggregation.digests`): of the
        parameters, and with ``--optimizer-state average`` of the averaged optimizer tensors after
        them. ``like``: the digest this one is checked against (its algorithm is used)."""
        if not self.average_state or state is None:
            return digests.digest(params, like)
        return trainstate.hash_with(params, trainstate.averaged(state[trainstate.OPTIMIZER], self._param_shapes), like)

    @property
    def averaged_shapes(self) -> list[tuple[int, ...]] | None:
        """The parameters' shapes, which place the optimizer's averaged tensors, with
        ``--optimizer-state average``; else None."""
        return self._param_shapes if self.average_state else None

    def state_bytes(self, state: dict[str, Any], **meta: Any) -> bytes:
        """A captured state serialised (trainstate.to_bytes), with ``meta``."""
        return trainstate.to_bytes(state, self.averaged_shapes, **meta)

    def exchange_buffer(self) -> np.ndarray:
        """What the all-reduce averages: :meth:`host_buffer` (parameters, weight slot), and with
        ``--optimizer-state average`` a buffer of the parameters, the optimizer's averaged
        tensors, then the weight slot (write it back with :meth:`load_exchange_buffer`)."""
        if not self.average_state:
            return self.host_buffer()
        tensors = list(trainstate.averaged(self.optimizer.state_dict(), self._param_shapes))
        n = self.numel + sum(t.numel() for t in tensors) + 1
        if self._xbuf is None or self._xbuf.size != n:
            self._xbuf = None
            self._xbuf = np.empty(n, dtype=np.float32)
        buf = self._xbuf
        buf[: self.numel] = self.flat[: self.numel].cpu().numpy()
        off = self.numel
        for t in tensors:
            k = t.numel()
            buf[off : off + k] = t.detach().reshape(-1).cpu().numpy()
            off += k
        buf[-1] = 0.0
        return buf

    def load_exchange_buffer(self, buf: np.ndarray) -> None:
        """Writes an averaged :meth:`exchange_buffer` back into the parameters (and the
        optimizer's averaged tensors)."""
        if not self.average_state:
            self.load_host_buffer(buf)
            return
        self.flat[: self.numel].copy_(torch.from_numpy(buf[: self.numel]))
        off = self.numel
        with torch.no_grad():
            for t in trainstate.averaged(self.optimizer.state_dict(), self._param_shapes):
                k = t.numel()
                t.copy_(torch.from_numpy(buf[off : off + k]).view_as(t))
                off += k
        if off != buf.size - 1:
            raise ValueError(f"the optimizer state changed size during the exchange ({off} vs {buf.size - 1})")

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

    def autocast(self) -> Any:
        """The context every forward pass runs in: ``torch.autocast`` to the job's
        ``--precision`` (bf16 or fp16) on this device, or a no-op for fp32. Parameters, the flat
        buffer and the exchange stay float32 either way."""
        if self.precision == "fp32":
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=torch.bfloat16 if self.precision == "bf16" else torch.float16)

    def backward_and_step(self, loss: torch.Tensor, extra: Callable[[], None] | None = None) -> None:
        """Backward of ``loss`` then the optimizer's step; with fp16 through the GradScaler
        (scaled backward, gradients unscaled before ``extra`` (the proximal term) adds to them,
        the step skipped when they overflowed, the scale updated)."""
        scaler = self.scaler
        if scaler is None:
            loss.backward()
            if extra is not None:
                extra()
            self.optimizer.step()
            return
        scaler.scale(loss).backward()
        if extra is not None:
            scaler.unscale_(self.optimizer)
            extra()
        scaler.step(self.optimizer)
        scaler.update()

    def _run(self, batches: list[np.ndarray]) -> StepResult:
        self.model.train()
        total, loss_sum = 0, 0.0
        prox = self._prox
        if prox is not None:
            with self.lock:
                prox.begin()  # w_start: the parameters this training starts from
        for idx in batches:
            x, y = self.train_data.get(np.ascontiguousarray(idx, dtype=np.int64))
            with self.lock:
                if prox is None:
                    self.optimizer.zero_grad(set_to_none=True)
                else:
                    prox.zero_grad()
                with self.autocast():
                    loss = self._loss(self.model(x), y)
                self.backward_and_step(loss, prox.add_gradient if prox is not None else None)
                self.version += 1
            total += int(idx.size)
            loss_sum += float(loss.detach()) * int(idx.size)
        if prox is None:
            self.optimizer.zero_grad(set_to_none=True)  # gradients are not needed past the round
        else:
            prox.zero_grad()
        return StepResult(samples=total, loss=loss_sum / max(total, 1))

    def grad_buffer(self) -> torch.Tensor:
        """The flat gradient buffer, laid out like :attr:`flat` less the streamed weights (below):
        every other trainable parameter's ``.grad`` is a view of it at its place, so backward
        accumulates straight into it and a step's all-reduce reads and writes it whole. The float
        buffers' slots (and a frozen parameter's) hold no gradient; the last element is the
        all-reduce weight slot.

        Streamed weights: with plain SGD (:func:`plain_sgd`) in fp32, a ``nn.Linear`` weight of at
        least :attr:`stream_min` elements that no other module shares gets no slot here. Its
        layer's backward keeps what the gradient is made of (the output's gradient and the input,
        a batch's worth each) and :meth:`train_synced` takes the gradient from them in row blocks
        after the rest is averaged, each block all-reduced and applied before the next is made:
        no gradient the size of that weight ever exists. An MLP's first weight is nearly all of
        it (96% of ``synthetic:10M``), so the step holds a 4 MiB block instead of a model-sized
        gradient buffer."""
        if self._grads is None:
            routed = self.precision == "fp32" and self._prox is None
            if routed:
                # fp32 only: under autocast the products would be taken in another precision than
                # the weights', which autograd's own linear handles and this one does not.
                grads_into_buffer(self.model)
            streamed = self._streamable() if routed else []
            base = self.flat.data_ptr()
            skip = sorted(((p.data_ptr() - base) // 4, p.numel()) for p in streamed)
            gone = sum(n for _, n in skip)
            self._grads = torch.zeros(self.numel - gone + 1, dtype=torch.float32, device=self.device)
            self._grad_buffers = slice(self.param_numel - gone, self.numel - gone)
            self._grad_views = []
            ids = {id(p) for p in streamed}
            for p in self.model.parameters():
                if p.requires_grad and id(p) not in ids:
                    off = (p.data_ptr() - base) // 4
                    off -= sum(n for o, n in skip if o < off)
                    self._grad_views.append((p, self._grads[off : off + p.numel()].view_as(p)))
            self._streamed = []
            for p in streamed:
                p._dml_stream = []  # type: ignore[attr-defined]  # read by _GradLinear's backward
                self._streamed.append((p, p._dml_stream))  # type: ignore[attr-defined]
            if streamed:
                block = max(self._block_rows(p) * p.shape[1] for p in streamed)
                self._block = torch.zeros(block + 1, dtype=torch.float32, device=self.device)
        for p, view in self._grad_views:
            p.grad = view
        return self._grads

    def _streamable(self) -> list[torch.nn.Parameter]:
        """The weights :meth:`grad_buffer` streams (none unless the optimizer is plain SGD over
        them: the block's update is that optimizer's step, taken here)."""
        if plain_sgd(self.optimizer) is None:
            return []
        optimized = {id(p) for p in self.optimizer.param_groups[0]["params"]}
        owners: dict[int, int] = {}
        for m in self.model.modules():
            for q in m._parameters.values():
                if q is not None:
                    owners[id(q)] = owners.get(id(q), 0) + 1
        return [m.weight for m in self.model.modules()
                if type(m) is torch.nn.Linear and m.weight.requires_grad and m.weight.dim() == 2
                and m.weight.numel() >= self.stream_min and owners[id(m.weight)] == 1 and id(m.weight) in optimized]

    def _block_rows(self, p: torch.Tensor) -> int:
        return min(p.shape[0], max(1, self.stream_block // p.shape[1]))

    @property
    def sync_parts(self) -> int:
        """How many all-reduces a ``--sync grads`` step takes: the gradient buffer, then one per
        row block of each streamed weight (:meth:`grad_buffer`). The same on every member: it
        depends on the model and the optimizer only."""
        with self.lock:
            self.grad_buffer()
        return 1 + sum(-(-p.shape[0] // self._block_rows(p)) for p, _ in self._streamed)

    def train_synced(self, samples: np.ndarray, batch_size: int, steps: int, allreduce: AllReduce) -> StepResult:
        """``--sync grads``: ``steps`` steps, step ``s`` on ``samples[s*batch_size:(s+1)*batch_size]``
        (none past the end: this member then takes part with 0 samples). After each backward
        ``allreduce(buffer, samples, s, 0)`` averages the flat gradient buffer (:meth:`grad_buffer`)
        in place across the ring, weighted by samples; then the optimizer steps on the average.
        Each streamed weight's gradient follows in row blocks, parts ``1 ..`` :attr:`sync_parts`
        - 1, each averaged the same way and applied as plain SGD's step before the next is made.
        Every member gets the same bytes back, so from identical parameters and optimizer state
        every member takes the identical step. The float buffers (a batch norm's running
        statistics) travel in their slots of the same buffer as values, and come back averaged.
        Needs real gradients: a trainer built with ``fuse=False``."""
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if self.fused_sgd:
            raise ValueError("synchronous gradients need a trainer built with fuse=False")
        self.model.train()
        total, loss_sum, spent = 0, 0.0, 0.0
        windows: list[tuple[float, float]] = []
        buffers = slice(self.param_numel, self.numel)
        for s in range(steps):
            idx = np.ascontiguousarray(samples[s * batch_size : (s + 1) * batch_size], dtype=np.int64)
            n = int(idx.size)
            with self.lock:
                grads = self.grad_buffer()
                grads.zero_()
                try:
                    for _, stash in self._streamed:
                        stash.clear()
                    if n:
                        x, y = self.train_data.get(idx)
                        with self.autocast():
                            loss = self._loss(self.model(x), y)
                        loss.backward()  # no fp16 here (spec.validate): its scale would differ per member
                        self._gather_grads()
                        loss_sum += float(loss.detach()) * n
                    w0 = time.time()
                    grads[self._grad_buffers].copy_(self.flat[buffers])
                    spent += self._average_part(grads, allreduce, n, s, 0)
                    self.flat[buffers].copy_(grads[self._grad_buffers])
                    # Whatever autograd left in a streamed weight's .grad (a use of it outside its
                    # layer) is added to its blocks, not stepped on here unaveraged.
                    extras = [p.grad for p, _ in self._streamed]
                    for p, _ in self._streamed:
                        p.grad = None
                    self.optimizer.step()
                    part = 1
                    for (p, stash), extra in zip(self._streamed, extras):
                        part, took = self._stream_weight(p, stash, extra, allreduce, n, s, part)
                        spent += took
                    windows.append((w0, time.time()))
                finally:
                    for _, stash in self._streamed:
                        stash.clear()
                self.version += 1
            total += n
        return StepResult(samples=total, loss=loss_sum / max(total, 1), exchange_s=spent, windows=windows)

    def _average_part(self, buf: torch.Tensor, allreduce: AllReduce, n: int, step: int, part: int) -> float:
        """One all-reduce of ``buf`` (a host view on CPU, a host copy elsewhere); its seconds."""
        host = buf.numpy() if self.device.type == "cpu" else buf.cpu().numpy()
        t0 = time.monotonic()
        allreduce(host, n, step, part)
        took = time.monotonic() - t0
        if self.device.type != "cpu":
            buf.copy_(torch.from_numpy(host))
        return took

    @torch.no_grad()
    def _stream_weight(self, p: torch.nn.Parameter, stash: list[tuple[torch.Tensor, torch.Tensor]],
                       extra: torch.Tensor | None, allreduce: AllReduce, n: int, step: int, part: int) -> tuple[int, float]:
        """A streamed weight's step: block by block, its rows' gradient (``g.T @ x`` of every use
        of its layer this step, plus whatever autograd left in ``.grad`` from a use outside the
        layer) into the block buffer, averaged as part ``part``, ``part + 1``, .., then plain
        SGD's update of those rows. Returns the next part and the seconds spent averaging."""
        assert self._block is not None
        lr = float(self.optimizer.param_groups[0]["lr"])  # read every step: a scheduler may move it
        if extra is not None and extra.is_sparse:
            extra = extra.to_dense()
        rows, cols = p.shape
        rb = self._block_rows(p)
        took = 0.0
        for r0 in range(0, rows, rb):
            r1 = min(rows, r0 + rb)
            blk = self._block[: (r1 - r0) * cols + 1]
            view = blk[:-1].view(r1 - r0, cols)
            if extra is not None:
                view.copy_(extra[r0:r1])
            else:
                view.zero_()
            for g, x in stash:
                view.addmm_(g.t()[r0:r1], x)
            took += self._average_part(blk, allreduce, n, step, part)
            p[r0:r1].add_(view, alpha=-lr)  # torch.optim.SGD's own update: p - lr * g
            part += 1
        return part, took

    def _gather_grads(self) -> None:
        """Copies into the flat buffer any gradient backward did not accumulate there (it may
        replace a ``.grad`` whose layout it dislikes), and points ``.grad`` back at its view."""
        for p, view in self._grad_views:
            g = p.grad
            if g is None or g.data_ptr() != view.data_ptr():
                if g is not None:
                    view.copy_(g.to_dense() if g.is_sparse else g)
                p.grad = view

    def _loss(self, out: Any, y: Any) -> torch.Tensor:
        loss = _call("loss(output, target)", self.loss_fn, out, y)
        if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
            raise TaskError(f"loss(output, target) must return a scalar tensor, got {type(loss).__name__}"
                            f"{tuple(loss.shape) if isinstance(loss, torch.Tensor) else ''}")
        return loss.reshape(())

    @torch.no_grad()
    def evaluate(self, batch_size: int = EVAL_BATCH) -> Evaluation:
        """Test metrics of the current parameters (NaN with no test data), computed in batches so
        activations never take more than a batch's worth of memory: accuracy in [0, 1] (NaN when
        the output is not one score per class and the task's metrics give none), the mean loss,
        and the task's own metrics over the whole test set (:func:`add_metrics`)."""
        self.model.eval()
        data = self.test_data
        if data is None or data.size == 0:
            return Evaluation(float("nan"), float("nan"), {})
        n = data.size
        correct, loss_sum = 0, 0.0
        sums: dict[str, tuple[bool, float, float]] = {}
        classify = True
        for i in range(0, n, batch_size):
            idx = np.arange(i, min(i + batch_size, n), dtype=np.int64)
            x, y = data.get(idx)
            with self.autocast():
                out = self.model(x)
                loss_sum += float(self._loss(out, y)) * idx.size
            out = out.float() if isinstance(out, torch.Tensor) and out.is_floating_point() else out
            if classify and isinstance(out, torch.Tensor) and out.dim() == 2 and isinstance(y, torch.Tensor) \
                    and y.dim() == 1 and not y.is_floating_point():
                correct += int((out.argmax(1) == y).sum())
            else:
                classify = False
            if self.task.metrics is not None:
                add_metrics(sums, _call("metrics(output, target)", self.task.metrics, out, y), int(idx.size))
        metrics = {k: num / den if den else float("nan") for k, (_, num, den) in sums.items()}
        acc = metrics.pop("accuracy", correct / n if classify else float("nan"))
        if not (math.isnan(acc) or 0.0 <= acc <= 1.0):
            raise TaskError(f"metrics(output, target): accuracy must be in [0, 1], got {acc}")
        return Evaluation(acc, loss_sum / n, metrics)


def _number(name: str, v: Any) -> float:
    try:
        x = float(v)  # a Python number, a numpy scalar or a one-element tensor
    except (TypeError, ValueError, RuntimeError):
        raise TaskError(f"metrics(output, target): {name!r} must be a number or a pair of numbers, "
                        f"got {type(v).__name__}") from None
    if math.isinf(x):
        raise TaskError(f"metrics(output, target): {name!r} is {x}")
    return x


def add_metrics(sums: dict[str, tuple[bool, float, float]], got: Any, batch: int) -> None:
    """Adds one test batch's ``metrics(output, target)`` to ``sums`` (name -> (given as a pair,
    numerator, denominator)); each metric is then ``numerator / denominator`` over the whole
    test set (NaN when the denominator is 0). A number is the batch's mean: it adds ``(value x
    batch, batch)``, so it is averaged over batches by their size. A pair ``(numerator,
    denominator)`` is added as it is: a ratio such as recall or F1 comes out exact for the
    test set, where a mean of per-batch ratios would not. Raises :class:`TaskError` for
    anything else, for more than MAX_METRICS names, a name that is not a string of 1 to
    MAX_METRIC_NAME characters, or a metric that is a number in one batch and a pair in another."""
    if not isinstance(got, Mapping):
        raise TaskError(f"metrics(output, target) must return a dict of name -> value, got {type(got).__name__}")
    for k, v in got.items():
        if not isinstance(k, str) or not 0 < len(k) <= MAX_METRIC_NAME:
            raise TaskError(f"metrics(output, target): a metric's name must be a string of 1 to {MAX_METRIC_NAME} "
                            f"characters, got {k!r:.80}")
        pair = isinstance(v, (tuple, list))
        if pair and len(v) != 2:
            raise TaskError(f"metrics(output, target): {k!r} must be a number or a pair (numerator, denominator), "
                            f"got {len(v)} values")
        num, den = (_number(k, v[0]), _number(k, v[1])) if pair else (_number(k, v) * batch, float(batch))
        was_pair, a, b = sums.get(k, (pair, 0.0, 0.0))
        if was_pair != pair:
            raise TaskError(f"metrics(output, target): {k!r} is a number in some batches and a pair in others")
        sums[k] = (pair, a + num, b + den)
    if len(sums) > MAX_METRICS:
        raise TaskError(f"metrics(output, target): at most {MAX_METRICS} metrics, got {len(sums)}")
