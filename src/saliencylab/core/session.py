"""The model session: the only place where saliencylab touches a user's model.

Two modes:
- *explain* (default): the model is switched to eval mode and its parameters are frozen (we only need
  gradients with respect to inputs or activations, and frozen parameters make backward passes cheaper);
- *train* (`differentiable=True`): the caller's train/eval mode and requires_grad flags are left alone and
  backward passes build a graph (`create_graph`), so maps carry gradient to the parameters.

Every temporary change to the model is an *edit* owned by the session: a hook, an attribute or
parameter rewrite, a module swap. Applying one returns a handle that undoes it; on exit (normal or
exception) every handle still applied is undone in reverse order, and a safety net restores hooks,
modes and requires_grad flags exactly as they were. `session.scope()` undoes the edits made inside it
at its own exit. The session also counts forward/backward passes and keys the call's randomness to the
images (`session.random(seed, purpose)`).
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch import nn

from .randomness import KeyedRandom, image_keys

try:  # not on Windows
    import resource
except ImportError:  # pragma: no cover
    resource = None

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


class Edit:
    """Handle of one temporary change to a model; `undo()` reverts it (idempotent).

    `remove()` is an alias, so an Edit can stand where a torch hook handle is expected."""

    def __init__(self, undo: Callable[[], None], description: str = ""):
        self._undo = undo
        self.description = description
        self.active = True

    def undo(self) -> None:
        if self.active:
            self.active = False
            self._undo()

    remove = undo

    def __repr__(self) -> str:
        return f"Edit({self.description!r}, active={self.active})"


_ABSENT = object()


class ModelSession:
    """Context manager around a user's model; see the module docstring.

    >>> with ModelSession(model) as session:
    ...     logits = session.forward(x)
    """

    def __init__(self, model: nn.Module, *, eval_mode: bool | None = None, freeze_parameters: bool | None = None,
                 differentiable: bool = False, image_ids=None):
        if not isinstance(model, nn.Module):
            from .errors import InputError

            raise InputError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        self.model = model
        self.differentiable = bool(differentiable)
        self.eval_mode = (not self.differentiable) if eval_mode is None else eval_mode
        self.freeze_parameters = (not self.differentiable) if freeze_parameters is None else freeze_parameters
        self.image_ids = None if image_ids is None else list(image_ids)
        self.cost = Cost()
        self._edits: list[Edit] = []
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
        if not self.eval_mode:
            # Train mode normalizes with batch statistics; an explanation's passes must not move the
            # running statistics (or the batch counter) of the user's normalization layers.
            for module in self.model.modules():
                if module.training and getattr(module, "track_running_stats", False) is True:
                    self.set_attr(module, "track_running_stats", False)
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
        self._undo_to(0)
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
        elif resource is not None:
            # ru_maxrss is the process's high-water mark in KiB on Linux: an upper bound, not a delta.
            self.cost.peak_memory_bytes = int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024
            self.cost.memory_kind = "process max RSS"
        self._snapshot = None

    # -- edits ---------------------------------------------------------------------------------
    def edit(self, undo: Callable[[], None], description: str = "") -> Edit:
        """Own a change the caller has just made: `undo` reverts it at exit (or at `handle.undo()`)."""
        handle = Edit(undo, description)
        self._edits.append(handle)
        return handle

    def _undo_to(self, depth: int) -> None:
        # Reverse order: a later edit may depend on an earlier one (a hook on a swapped module).
        errors = []
        while len(self._edits) > depth:
            handle = self._edits.pop()
            try:
                handle.undo()
            except Exception as e:  # keep undoing the rest; report the first failure
                errors.append(e)
        if errors:
            raise errors[0]

    @contextlib.contextmanager
    def scope(self):
        """Edits made inside the block are undone when it ends (normally or by an exception)."""
        depth = len(self._edits)
        try:
            yield self
        finally:
            self._undo_to(depth)

    def set_attr(self, obj: Any, name: str, value: Any) -> Edit:
        """Set `obj.name = value` (a parameter, a flag such as `fused_attn`, `forward`) until undone.

        The original object is put back, not a copy, so parameters stay the same tensors."""
        old = obj.__dict__.get(name, _ABSENT) if not isinstance(obj, nn.Module) else _module_attr(obj, name)
        setattr(obj, name, value)

        def undo():
            if old is _ABSENT:
                delattr(obj, name)
            else:
                setattr(obj, name, old)

        return self.edit(undo, f"set {type(obj).__name__}.{name}")

    def swap_module(self, name: str, replacement: nn.Module) -> Edit:
        """Replace the submodule at dotted path `name` until undone."""
        parent_name, _, child = name.rpartition(".")
        parent = self.model.get_submodule(parent_name) if parent_name else self.model
        if child not in parent._modules:
            from .errors import ConfigError

            raise ConfigError(f"model has no submodule named '{name}' to replace")
        return self.set_attr(parent, child, replacement)

    def hook(self, module: nn.Module, fn: Callable, kind: str = "forward", **kwargs) -> Edit:
        """Register a hook ("forward", "forward_pre", "full_backward", "full_backward_pre") until undone."""
        register = {
            "forward": module.register_forward_hook,
            "forward_pre": module.register_forward_pre_hook,
            "full_backward": module.register_full_backward_hook,
            "full_backward_pre": module.register_full_backward_pre_hook,
        }.get(kind)
        if register is None:
            raise ValueError(f"unknown hook kind {kind!r}")
        handle = register(fn, **kwargs)
        return self.edit(handle.remove, f"{kind} hook on {type(module).__name__}")

    def add_forward_hook(self, module: nn.Module, fn: Callable, **kwargs) -> Edit:
        return self.hook(module, fn, "forward", **kwargs)

    def add_forward_pre_hook(self, module: nn.Module, fn: Callable, **kwargs) -> Edit:
        return self.hook(module, fn, "forward_pre", **kwargs)

    # -- randomness ----------------------------------------------------------------------------
    def random(self, seed: int, purpose: str, n_images: int | None = None) -> KeyedRandom:
        """Draws keyed by (seed, purpose, image, draw) for this call's images (see core.randomness)."""
        ids = self.image_ids
        if ids is not None and n_images is not None:
            ids = image_keys(n_images, ids)
        return KeyedRandom(seed, purpose, ids)

    # -- passes --------------------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        return self._device

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Run the model on a batch and count it."""
        self.cost.forward_images += int(x.shape[0])
        self.cost.forward_calls += 1
        return self.model(x)

    def grad(self, score: torch.Tensor, inputs, *, create_graph: bool | None = None, rows: int | None = None):
        """Gradients of the summed score with respect to `inputs` (a tensor or list), counted.

        In a differentiable session the gradients keep their graph (double backprop) by default."""
        if create_graph is None:
            create_graph = self.differentiable
        single = isinstance(inputs, torch.Tensor)
        seq = [inputs] if single else list(inputs)
        self.cost.backward_images += int(rows if rows is not None else score.shape[0])
        self.cost.backward_calls += 1
        grads = torch.autograd.grad(score.sum(), seq, create_graph=create_graph, allow_unused=True)
        grads = [torch.zeros_like(t) if g is None else g for g, t in zip(grads, seq)]
        return grads[0] if single else grads

    def charge(self, cost: Cost) -> None:
        """Add the passes of a nested call (a method composed of another) to this session's cost."""
        self.cost.forward_images += cost.forward_images
        self.cost.backward_images += cost.backward_images
        self.cost.forward_calls += cost.forward_calls
        self.cost.backward_calls += cost.backward_calls

    def capture(self, modules: dict[str, nn.Module], *, make_differentiable: bool = True) -> dict:
        """Record each module's output on every forward call, keyed by name.

        With frozen parameters and an input that does not require grad, an intermediate output is
        not part of any graph; `make_differentiable` turns it into a graph leaf so that gradients
        can be taken with respect to it without propagating all the way down to the input. In a
        differentiable session an output that is already in a graph stays there (gradient must reach
        the parameters below it).
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
                if self.differentiable:
                    return output.clone()  # in-place ops downstream must not change the captured tensor
                return None

            return hook

        for name, module in modules.items():
            self.add_forward_hook(module, make(name))
        return store


def _module_attr(module: nn.Module, name: str):
    """A module attribute as stored (parameter, buffer, submodule or plain attribute), or _ABSENT."""
    for store in ("_parameters", "_buffers", "_modules"):
        d = module.__dict__.get(store, {})
        if name in d:
            return d[name]
    return module.__dict__.get(name, _ABSENT)


def model_fingerprint(model: nn.Module) -> str:
    """A short hash of a model's architecture and weights: the model part of a result's key."""
    import hashlib

    h = hashlib.sha1(type(model).__qualname__.encode())
    for name, t in model.state_dict().items():
        h.update(name.encode())
        h.update(str(tuple(t.shape)).encode())
        h.update(str(t.dtype).encode())
        data = t.detach().to("cpu").contiguous().reshape(-1)
        h.update(data.view(torch.uint8).numpy().tobytes() if data.numel() else b"")
    return h.hexdigest()[:16]
