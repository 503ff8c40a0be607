"""The method contract, the registry, and the batched gradient loop every gradient method shares.

A method is a class: `Method(model, **params)`, with two public entry points:
- `explain(x, target=None) -> Explanation`: maps, low-resolution maps, targets, outputs, cost, extras;
- `attribute(x, target=None) -> Tensor`: just the maps, (B, H, W) at the input's resolution, higher =
  more important, sign and magnitude kept. `channels=True` keeps (B, C, H, W) for input-space methods.

Both take `create_graph=True` (maps that carry gradient to the model's parameters, in the caller's
train/eval mode; for methods with `differentiable = True`) and `image_ids` (the keys of the call's
random draws, so results do not depend on batching or sharding).

A subclass implements `compute(session, x, target) -> Explanation` and returns everything it computed
(nothing is stored on the instance; the target is an argument). Maps may be (B, C, H, W) input-space
maps or (B, h, w) layer maps; `explain` sums channels and upsamples. Metadata lives on the class:
`input_space`, `uses_gradients`, `differentiable`, `stochastic`, `needs_data`, `requires`.
"""

from __future__ import annotations

from typing import Callable, ClassVar

import torch
from torch import nn
import torch.nn.functional as F

from ..core.progress import progress
from ..core.errors import ConfigError, InputError
from ..core.explanation import Explanation
from ..core.registry import Param, Registry, declared_params
from ..core.session import ModelSession, model_device
from ..core.targets import Target, TargetSpec, resolve_target
from ..core.validation import check_images

__all__ = ["Method", "Param", "registry", "register", "available", "get", "describe", "parameters", "build",
           "clean_outputs", "upsample", "check_batch_size", "accumulate_input_gradients"]


class Method:
    """Base class; see the module docstring. Parameters are declared once, as `Param` class attributes
    (or, for older methods, as keyword arguments of `__init__` passed on to `super().__init__`)."""

    name: ClassVar[str] = ""
    description: ClassVar[str] = ""
    input_space: ClassVar[bool] = True
    uses_gradients: ClassVar[bool] = True  # False for forward-only (perturbation) methods
    differentiable: ClassVar[bool] = False  # supports create_graph=True
    stochastic: ClassVar[bool] = False  # draws random numbers (keyed to the images: see core.randomness)
    needs_data: ClassVar[bool] = False  # needs feature statistics or training data (`data=`)
    requires: ClassVar[str | None] = None  # a model kind the method needs ("bcos_model"); None: any model
    # Bumped when results change for the same parameters: stored rows of an older revision are not reused.
    revision: ClassVar[int] = 0

    def __init__(self, model: nn.Module, **params):
        if not isinstance(model, nn.Module):
            raise InputError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        declared = declared_params(type(self))
        if declared:
            from ..core.registry import check_known

            check_known("method", self.name or type(self).__name__, params, declared)
            missing = [n for n, p in declared.items() if p.required and n not in params]
            if missing:
                raise ConfigError(f"method '{self.name}' needs {', '.join(map(repr, missing))}")
        self.model = model
        # The constructor's input, exactly as given (tensors, data sets): rebuilding with
        # `type(m)(model, **m.params)` gives the same method. Explanation.spec is its JSON record.
        self.params = dict(params)
        for key, value in params.items():
            setattr(self, key, value)
        self.check()

    def check(self) -> None:
        """Validate parameters at construction (fail now, not deep inside `explain`)."""

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.params.items() if not isinstance(v, torch.Tensor))
        return f"{type(self).__name__}({args})"

    # -- public entry points -------------------------------------------------------------------
    def explain(self, x: torch.Tensor, target: TargetSpec = None, *, channels: bool = False,
                create_graph: bool = False, image_ids=None) -> Explanation:
        """Explain a batch of images; see the module docstring."""
        if channels and not self.input_space:
            raise ConfigError(f"method '{self.name}' works at a layer: channels=True is not available")
        if create_graph and not self.differentiable:
            raise ConfigError(
                f"method '{self.name}' is not differentiable: create_graph=True is available for "
                f"{', '.join(available(differentiable=True))}")
        x = check_images(x, model_device(self.model))
        if image_ids is not None:
            from ..core.randomness import image_keys

            image_ids = image_keys(x.shape[0], image_ids)
        with ModelSession(self.model, differentiable=create_graph, image_ids=image_ids) as session:
            result = self.compute(session, x, target)
        maps = result.maps
        if maps.dim() == 4 and not channels:
            maps = maps.sum(dim=1)
        elif maps.dim() == 3 and tuple(maps.shape[-2:]) != tuple(x.shape[-2:]):
            if result.lowres is None:
                result.lowres = maps.detach()
            maps = upsample(maps, x.shape[-2:])
        result.maps = maps if create_graph else maps.detach()
        result.method = self.name
        result.params = dict(self.params)
        result.cost = session.cost
        result.image_ids = image_ids
        if result.outputs is not None:
            result.outputs = result.outputs.detach()
        return result

    def attribute(self, x: torch.Tensor, target: TargetSpec = None, *, channels: bool = False,
                  create_graph: bool = False, image_ids=None) -> torch.Tensor:
        """Attribution maps for a batch of images: `explain(...).maps`."""
        return self.explain(x, target, channels=channels, create_graph=create_graph, image_ids=image_ids).maps

    # -- what a subclass implements ------------------------------------------------------------
    def compute(self, session: ModelSession, x: torch.Tensor, target: TargetSpec) -> Explanation:
        """Return an Explanation with maps, targets, outputs (and lowres, extras where it has them)."""
        raise NotImplementedError(f"{type(self).__name__} does not implement compute()")


def clean_outputs(session: ModelSession, x: torch.Tensor, target: TargetSpec, **kwargs) -> tuple[Target, torch.Tensor]:
    """Resolve the target against the clean batch: one no-grad forward. Returns (Target, outputs)."""
    with torch.no_grad():
        outputs = session.forward(x)
    return resolve_target(target, outputs, **kwargs), outputs.detach()


# -- the registry ------------------------------------------------------------------------------
registry: Registry = Registry("method", base=Method, skip=2)
register = registry.register
get = registry.get
describe = registry.describe


def available(**filters) -> list[str]:
    """Names of every registered method (filtered by class metadata, e.g. `differentiable=True`)."""
    return registry.available(**filters)


def parameters(name) -> dict[str, object]:
    """A method's parameters and their defaults."""
    return registry.parameters(name)


def build(name, model: nn.Module, **params) -> "Method":
    """Instantiate a method by name, with a clear error for unknown parameters."""
    return registry.build(name, model, **params)


def upsample(maps: torch.Tensor, size) -> torch.Tensor:
    """Bilinear upsampling of (B, h, w) maps to `size`."""
    return F.interpolate(maps[:, None], size=tuple(size), mode="bilinear", align_corners=False)[:, 0]


def check_batch_size(batch_size) -> int:
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ConfigError(f"batch_size must be a positive int, got {batch_size!r}")
    return batch_size


def accumulate_input_gradients(
    session: ModelSession,
    target: Target,
    n_images: int,
    n_samples: int,
    make_inputs: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    reduce: Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], None],
    batch_size: int | None,
    desc: str = "",
    *,
    pixels: int | None = None,
) -> None:
    """Forward and backward `n_images * n_samples` derived inputs in chunks of `batch_size` rows.

    Rows are ordered image-major (row = image * n_samples + sample), so a chunk mixes images and
    samples freely and every pass is full. `make_inputs(image_index, sample_index)` builds a chunk's
    inputs; `reduce(grads, image_index, sample_index, inputs)` folds its input gradients into the
    caller's accumulators. `batch_size=None` picks the rows per pass for the device and the image size
    `pixels` (H * W) (`perturbation.auto_batch_size(device, backward=True)`); `make_inputs` is only
    called for the rows that are explained, so a random draw in it is never spent on sizing.
    In a differentiable session the gradients keep their graph (`session.grad`).
    """
    if batch_size is None:
        from ..perturbation import auto_batch_size

        batch_size = auto_batch_size(session.device, backward=True, pixels=pixels)
    batch_size = check_batch_size(batch_size)
    total = n_images * n_samples
    starts = range(0, total, batch_size)
    for start in progress(starts, desc=desc, total=len(starts)):
        rows = torch.arange(start, min(start + batch_size, total), device=session.device)
        image, sample = rows // n_samples, rows % n_samples
        inputs = make_inputs(image, sample).detach().requires_grad_(True)
        scores = target(session.forward(inputs), image)
        grads = session.grad(scores, inputs)
        reduce(grads, image, sample, inputs.detach())


# Activation module types whose outputs are "neurons" (PathwayGrad) or pass relevance on (LRP).
ACTIVATIONS = (nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.ELU, nn.SiLU, nn.GELU, nn.Hardswish, nn.Mish, nn.Tanh)


def out_of_place(session, module: nn.Module) -> None:
    """Switch an in-place activation to out-of-place for the session (an edit): a hook that keeps or
    routes gradient to the module's input needs that input intact."""
    if getattr(module, "inplace", False):
        session.set_attr(module, "inplace", False)


def replace_activation_backward(session, modules, function, *extra) -> None:
    """Give each module the backward pass of `function` (an autograd Function taking (x, y, *extra)
    whose forward returns y): its output becomes `function.apply(x, y.detach(), *extra)`, so the
    gradient reaches the input x only through `function.backward` (session edits)."""
    def hook(module, args, output):
        x = args[0] if args else None
        if isinstance(x, torch.Tensor) and isinstance(output, torch.Tensor) and x.requires_grad:
            return function.apply(x, output.detach(), *extra)
        return None

    for module in modules:
        out_of_place(session, module)
        session.hook(module, hook)
