"""The model session: the only place where saliencylab touches a user's model.

A session switches the model to eval mode, freezes its parameters (we only ever need gradients with
respect to inputs or activations, and frozen parameters make backward passes cheaper), owns every hook
it registers, counts forward/backward passes, and on exit (normal or exception) restores hooks, modes
and requires_grad flags exactly as they were.
"""

from __future__ import annotations

import resource
import time
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import nn

# Every per-module hook dictionary torch keeps; entries added during a session are removed on exit,
# including ones a method registered without going through the session.
_HOOK_DICTS = (
    "_forward_hooks",
    "_forward_hooks_with_kwargs",
    "_forward_hooks_always_called",
    "_forward_pre_hooks",
    "_forward_pre_hooks_with_kwargs",
    "_backward_hooks",
    "_backward_pre_hooks",
    "_state_dict_hooks",
    "_state_dict_pre_hooks",
    "_load_state_dict_pre_hooks",
    "_load_state_dict_post_hooks",
)


@dataclass
class Cost:
    """What an explanation spent: passes counted in images (a batch of 8 is 8 forward images)."""

    forward_images: int = 0
    backward_images: int = 0
    forward_calls: int = 0
    backward_calls: int = 0
    seconds: float = 0.0
    peak_memory_bytes: int | None = None
    memory_kind: str = ""

    def as_dict(self) -> dict:
        return dict(self.__dict__)

    def __add__(self, other: "Cost") -> "Cost":
        peak = [p for p in (self.peak_memory_bytes, other.peak_memory_bytes) if p is not None]
        return Cost(
            self.forward_images + other.forward_images,
            self.backward_images + other.backward_images,
            self.forward_calls + other.forward_calls,
            self.backward_calls + other.backward_calls,
            self.seconds + other.seconds,
            max(peak) if peak else None,
            self.memory_kind or other.memory_kind,
        )


def model_device(model: nn.Module) -> torch.device:
    for tensor in model.parameters():
        return tensor.device
    for tensor in model.buffers():
        return tensor.device
    return torch.device("cpu")


@dataclass
class _Snapshot:
    training: list = field(default_factory=list)
    requires_grad: list = field(default_factory=list)
    hook_keys: list = field(default_factory=list)


class ModelSession:
    """Context manager around a user's model; see the module docstring.

    >>> with ModelSession(model) as session:
    ...     logits = session.forward(x)
    """

    def __init__(self, model: nn.Module, *, eval_mode: bool = True, freeze_parameters: bool = True):
        if not isinstance(model, nn.Module):
            from .errors import InputError

            raise InputError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        self.model = model
        self.eval_mode = eval_mode
        self.freeze_parameters = freeze_parameters
        self.cost = Cost()
        self._handles: list = []
        self._snapshot: _Snapshot | None = None
        self._t0 = 0.0

    # -- lifecycle -----------------------------------------------------------------------------
    def __enter__(self) -> "ModelSession":
        snap = _Snapshot()
        for module in self.model.modules():
            snap.training.append((module, module.training))
            for name in _HOOK_DICTS:
                hooks = getattr(module, name, None)
                if hooks is not None:
                    snap.hook_keys.append((hooks, set(hooks.keys())))
        snap.requires_grad = [(p, p.requires_grad) for p in self.model.parameters()]
        self._snapshot = snap
        if self.eval_mode:
            self.model.eval()
        if self.freeze_parameters:
            for p, _ in snap.requires_grad:
                p.requires_grad_(False)
        self._device = model_device(self.model)
        if self._device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self._device)
        self._t0 = time.perf_counter()
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        self.restore()
        return False

    def restore(self) -> None:
        """Undo everything the session did. Safe to call twice."""
        if self._snapshot is None:
            return
        for handle in reversed(self._handles):
            handle.remove()
        self._handles.clear()
        snap = self._snapshot
        for hooks, keys in snap.hook_keys:
            for key in [k for k in hooks.keys() if k not in keys]:
                del hooks[key]
        for module, training in snap.training:
            module.training = training
        for p, flag in snap.requires_grad:
            p.requires_grad_(flag)
        self.cost.seconds += time.perf_counter() - self._t0
        if self._device.type == "cuda":
            self.cost.peak_memory_bytes = int(torch.cuda.max_memory_allocated(self._device))
            self.cost.memory_kind = "cuda max allocated"
        else:
            # ru_maxrss is the process's high-water mark in KiB on Linux: an upper bound, not a delta.
            self.cost.peak_memory_bytes = int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024
            self.cost.memory_kind = "process max RSS"
        self._snapshot = None

    # -- passes --------------------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        return self._device

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Run the model on a batch and count it."""
        self.cost.forward_images += int(x.shape[0])
        self.cost.forward_calls += 1
        return self.model(x)

    def grad(self, score: torch.Tensor, inputs, *, create_graph: bool = False, rows: int | None = None):
        """Gradients of the summed score with respect to `inputs` (a tensor or list), counted."""
        single = isinstance(inputs, torch.Tensor)
        seq = [inputs] if single else list(inputs)
        self.cost.backward_images += int(rows if rows is not None else score.shape[0])
        self.cost.backward_calls += 1
        grads = torch.autograd.grad(score.sum(), seq, create_graph=create_graph, allow_unused=True)
        grads = [torch.zeros_like(t) if g is None else g for g, t in zip(grads, seq)]
        return grads[0] if single else grads

    # -- hooks ---------------------------------------------------------------------------------
    def add_forward_hook(self, module: nn.Module, fn: Callable, **kwargs):
        handle = module.register_forward_hook(fn, **kwargs)
        self._handles.append(handle)
        return handle

    def add_forward_pre_hook(self, module: nn.Module, fn: Callable, **kwargs):
        handle = module.register_forward_pre_hook(fn, **kwargs)
        self._handles.append(handle)
        return handle

    def capture(self, modules: dict[str, nn.Module], *, make_differentiable: bool = True) -> dict:
        """Record each module's output on every forward call, keyed by name.

        With frozen parameters and an input that does not require grad, an intermediate output is
        not part of any graph; `make_differentiable` turns it into a graph leaf so that gradients
        can be taken with respect to it without propagating all the way down to the input.
        """
        store: dict[str, torch.Tensor] = {}

        def make(name):
            def hook(module, args, output):
                if not isinstance(output, torch.Tensor):
                    return None
                if make_differentiable and not output.requires_grad:
                    output = output.detach().requires_grad_(True)
                    store[name] = output
                    # The model continues with a copy: an in-place op downstream (out += identity,
                    # ReLU(inplace=True)) may not modify a leaf that requires grad.
                    return output.clone()
                store[name] = output
                return None

            return hook

        for name, module in modules.items():
            self.add_forward_hook(module, make(name))
        return store
