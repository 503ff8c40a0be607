"""Model guidance: a loss on a model's explanations that pulls them into the annotated object.

After Rao, Boehle, Parchami-Araghi and Schiele, "Studying how to efficiently and effectively guide
models with explanations" (ICCV 2023); authors' code sukrutrao/Model-Guidance (MIT): `losses.py`
(the four losses), `attribution_methods.py` (`AttributorBase.apply_post_processing`: the maps each
loss sees), `train.py` (the training step: which images count, how the losses are summed) and
`utils.py` (`get_random_optimization_targets`, `filter_bbs`). The loss formulas below follow those
files; the comments name the function each line comes from.

For each image i, one class c_i is explained (`target`), its map A_i (H, W) is computed by a
differentiable method (`saliencylab.explain(..., create_graph=True)`), and the box region M_i (H, W)
(union of the image's boxes of class c_i, or a given mask) scores it:

- `energy` (EnergyPointingGameBBMultipleLoss): 1 - sum(A+ M) / sum(A+), A+ = max(A, 0) of the raw map
  (no rescaling); when sum(A+) < 1e-7 the loss is 1 - sum(A+ M) (as the authors).
- `l1` (GradiaBBMultipleLoss): mean over all H*W pixels of |Â - M|, Â = A+ / max|A+| per image.
- `rrr` (RRRBBMultipleLoss, "right for the right reasons"): sum over pixels outside M of Â^2,
  Â = A / max|A| per image (signed: negative attribution outside the box is penalised too).
- `ppce` (HAICSBBMultipleLoss, per-pixel cross-entropy): mean over pixels inside M of -log Â,
  Â = A+ / max|A+| (torch's binary cross-entropy, whose log is clamped at -100).

A map of a method with a layer (Grad-CAM at `layer=`) is computed at the layer's resolution
(`Explanation.lowres`); the authors clamp and rescale it there and then upsample it bilinearly
(align_corners=False) to the image, and so do we for l1/rrr/ppce; energy uses the upsampled map (the
authors upsample before the loss clamps). At the input the maps are the method's (B, H, W) maps
(input x gradient: the gradient times the input summed over colour channels, as the authors' IxG).

Targets: (B,) class indices (or one int), or (B, K) multi-hot labels: then one class per image is
drawn among the present ones with probability proportional to the label values, as the authors'
`get_random_optimization_targets` (torch.multinomial; `seed=` or `generator=` makes it repeatable).
Boxes: anything `saliencylab.metrics.localization.boxes_to_masks` takes ((B, 4), (B, K, 4) or a list
of boxes per image, (x0, y0, x1, y1) pixels, x1/y1 exclusive), or boxes with a leading class column
(class, x0, y0, x1, y1): then only the boxes of the explained class count (the authors' `filter_bbs`).
Masks: (B, H, W) booleans, or (B, K, H, W) one mask per class (the explained class's is used).

Skipped images: an image whose region has no pixel (no box, an empty list, only zero-area boxes, an
empty mask) adds nothing and is counted in `info["skipped"]` (the authors skip images without boxes,
`train.py`: `if train_bbs[img_idx] is None: continue`). If every image is skipped the loss is a zero
that still backpropagates (no explanation is computed then).

Where we differ from the authors (each deliberate):
- An image whose boxes of the chosen class are all absent is skipped; the authors would still add
  the loss of an empty mask (energy: a constant 1; l1: pull every attribution to 0; rrr: penalise all
  of it; ppce: NaN). Their data never has that case (the class is drawn among those with boxes).
- The batch's loss is the sum over the used images, as the authors' training step (so the weight
  lambda scales with the batch size); `reduction="mean"` averages over the used images instead.
- The per-image rescaling divides by max|A| only where it is non-zero, as the authors, but through a
  safe denominator so that a zero map gives a zero gradient rather than NaN (same values).
- Coordinates outside the image raise an InputError (the authors' slicing would wrap negative ones).
- method="bcos" gives the B-cos contributions W(x) x (the dynamic scales held fixed for the input
  gradient, summed over the 6 encoded channels). The authors' BCosAttributor takes its gradient in
  `explanation_mode()` but after a forward pass run outside it, so their maps are plain input x
  gradient of the encoded (x, 1 - x) input; we do not reproduce that.
- Input x gradient at a hidden layer (the authors' "Mid"/"Final" layers for IxG) is not offered:
  `layer=` is for layer methods (gradcam, gradcam_plus_plus, layercam).

Train mode and batch normalisation: the maps are computed in the caller's train/eval mode, in one
pass over the whole batch (a method's `batch_size` defaults to the batch, so the explanation sees the
same batch statistics as the caller's own forward pass). In train mode a batch-norm layer normalises
with the batch's statistics, so image i's logit depends on every image of the batch, and the map of
image i (the gradient of the summed target logits) includes the terms d logit_j / d x_i of the other
images: it is not the map image i would get alone. The authors' batched attributor does the same
(`torch.autograd.grad(torch.unbind(target_outputs), ...)`). In eval mode, or without batch norm, the
batched loss equals a loop over single images. The explanation's own forward passes never move the
running statistics (the session switches `track_running_stats` off for them); only the caller's
forward pass for the classification loss does (with `with_logits=True`, the one forward pass that
gives both the maps and the logits does, once).

Randomness: the class drawn among multi-hot labels comes from torch's global generator, as the
authors, or from `generator=` / a generator seeded with `seed=`; unlike the library's explanation
methods it is not keyed to image ids (a training batch carries none), so the draw for an image
depends on its position in the batch.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..core.errors import ConfigError, InputError, unknown_name


def buffers_kept_on_error(fn):
    """A loss that raises leaves the model's buffers (batch-norm running statistics) as they were: its
    forward pass in train mode may already have moved them before the error was found."""
    import functools

    @functools.wraps(fn)
    def wrapper(model, *args, **kwargs):
        saved = [(b, b.detach().clone()) for b in model.buffers()] if isinstance(model, torch.nn.Module) \
            and model.training else []
        try:
            return fn(model, *args, **kwargs)
        except BaseException:
            with torch.no_grad():
                for buffer, value in saved:
                    buffer.copy_(value)
            raise
    return wrapper

GUIDANCE_LOSSES = ("energy", "l1", "rrr", "ppce")

# Which maps each loss sees (attribution_methods.py, the flags each loss class sets in losses.py):
# clamp to the positive part first, then rescale by max |A| per image.
_ONLY_POSITIVE = {"energy": False, "l1": True, "rrr": False, "ppce": True}
_RESCALE = {"energy": False, "l1": True, "rrr": True, "ppce": True}
_REDUCTIONS = ("sum", "mean")


@buffers_kept_on_error
def guidance_loss(model, x, target, boxes=None, masks=None, method="input_x_gradient", loss="energy",
                  layer=None, *, details=False, reduction="sum", seed=None, generator=None, with_logits=False,
                  **method_params):
    """The guidance loss of a batch: a scalar that backpropagates to the model's parameters.

    model: the model being trained (its train/eval mode is used as it is, and kept).
    x: (B, C, H, W) images. target: (B,) class indices, one int, or (B, K) multi-hot labels (one present
    class drawn per image, see `seed`/`generator`). boxes / masks: the object region (module docstring).
    method: any differentiable method (`saliencylab.methods.available(differentiable=True)`), with
    its parameters in `method_params`; `layer`: the layer of a layer method (Grad-CAM). loss: one of
    GUIDANCE_LOSSES. reduction: "sum" over the used images (the authors) or "mean".
    details=True returns (loss, info), info = {"used": int, "skipped": int, "maps": (B, H, W) maps
    as computed (with graph), "classes": (B,) explained classes, "per_image": (B,) losses, NaN where
    skipped}.
    with_logits=True also returns the model's logits on `x` from the explanation's own forward pass,
    with their graph: `(loss, logits)` (or `(loss, info)` with info["logits"]). Computing the
    classification loss on them instead of a second `model(x)` saves a forward and a backward pass
    (the authors' training step shares one forward pass the same way). That pass then counts as the
    step's forward pass: it updates batch-norm running statistics once, as `model(x)` would. Needs a
    method that runs one forward pass over the whole batch (input_x_gradient, gradient, the CAMs with
    their default batch_size); others raise a ConfigError.
    """
    if loss not in GUIDANCE_LOSSES:
        raise unknown_name("guidance loss", loss, GUIDANCE_LOSSES)
    if reduction not in _REDUCTIONS:
        raise ConfigError(f"reduction must be 'sum' or 'mean', got {reduction!r}")
    if not isinstance(x, torch.Tensor) or x.dim() != 4:
        raise InputError(f"x must be a (B, C, H, W) tensor of images, got "
                         f"{tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__}")
    B, _, H, W = x.shape
    if B == 0:
        raise InputError("x holds no images")
    classes = choose_classes(target, B, seed=seed, generator=generator).to(x.device)
    region = object_region(boxes, masks, classes, (B, H, W)).to(x.device)
    used = region.flatten(1).any(1)
    n_used = int(used.sum())

    if n_used == 0:
        value = torch.zeros((), dtype=x.dtype, device=x.device, requires_grad=True)
        info = {"used": 0, "skipped": B, "maps": None, "classes": classes,
                "per_image": torch.full((B,), float("nan"), dtype=x.dtype, device=x.device)}
        return _result(value, info, details, with_logits, lambda: model(x))

    if with_logits:
        expl, logits = _explain_sharing_forward(model, x, classes, method, layer, method_params)
    else:
        expl, logits = _explain(model, x, classes, method, layer, method_params), None
    maps = expl.maps
    if tuple(maps.shape) != (B, H, W):
        raise InputError(f"method '{method}' gave maps of shape {tuple(maps.shape)}; guidance needs ({B}, {H}, {W})")
    seen = _loss_maps(expl, loss, (H, W))
    per_image = per_image_loss(seen, region.to(seen.dtype), loss)
    kept = per_image[used]
    value = kept.sum() if reduction == "sum" else kept.mean()
    shown = torch.where(used, per_image, torch.full_like(per_image, float("nan"))).detach()
    info = {"used": n_used, "skipped": B - n_used, "maps": maps, "classes": classes, "per_image": shown}
    return _result(value, info, details, with_logits, lambda: logits)


def _result(value, info, details, with_logits, logits):
    if with_logits:
        info["logits"] = logits()
        return (value, info) if details else (value, info["logits"])
    return (value, info) if details else value


# -- the pieces ---------------------------------------------------------------------------------
def per_image_loss(maps: torch.Tensor, region: torch.Tensor, loss: str) -> torch.Tensor:
    """(B,) losses of (B, H, W) maps (already clamped/rescaled as `loss` expects, except energy's
    clamp) against (B, H, W) 0/1 regions; see the module docstring for the formulas."""
    if loss == "energy":  # EnergyPointingGameBBMultipleLoss.__call__
        pos = maps.clamp(min=0)
        num = (pos * region).sum(dim=(1, 2))
        den = pos.sum(dim=(1, 2))
        small = den < 1e-7
        return torch.where(small, 1 - num, 1 - num / torch.where(small, torch.ones_like(den), den))
    if loss == "l1":  # GradiaBBMultipleLoss: L1Loss(reduction="mean") against the 0/1 box mask
        return (maps - region).abs().mean(dim=(1, 2))
    if loss == "rrr":  # RRRBBMultipleLoss: squared attributions outside the boxes, summed
        return (maps.square() * (1 - region)).sum(dim=(1, 2))
    if loss == "ppce":  # HAICSBBMultipleLoss: BCELoss(mean) of the in-box attributions against 1
        bce = F.binary_cross_entropy(maps.clamp(0, 1), torch.ones_like(maps), reduction="none")
        inside = region.sum(dim=(1, 2))
        return (bce * region).sum(dim=(1, 2)) / inside.clamp(min=1)
    raise unknown_name("guidance loss", loss, GUIDANCE_LOSSES)


def _loss_maps(expl, loss: str, size) -> torch.Tensor:
    """The maps the loss sees: AttributorBase.apply_post_processing (positive part, then rescaling by
    max |A| per image, then bilinear upsampling of a layer's map to the image)."""
    from ..methods.base import upsample

    low = expl.lowres
    at_layer = (low is not None and low.dim() == 3 and tuple(low.shape[-2:]) != tuple(size)
                and low.requires_grad == expl.maps.requires_grad)
    if loss == "energy" or not at_layer:
        a = expl.maps
        upsampled = True
    else:
        a = low
        upsampled = False
    if _ONLY_POSITIVE[loss]:
        a = a.clamp(min=0)
    if _RESCALE[loss]:
        peak = a.abs().flatten(1).amax(dim=1)[:, None, None]
        a = torch.where(peak == 0, a, a / torch.where(peak == 0, torch.ones_like(peak), peak))
    return a if upsampled else upsample(a, size)


def _explain(model, x, classes, method, layer, method_params):
    from .. import methods as _methods
    from ..api import explain

    params = dict(method_params)
    if isinstance(method, str):
        declared = _methods.parameters(method) if method in _methods.available() else None
        if declared is None:
            raise unknown_name("method", method, _methods.available(differentiable=True))
        if layer is not None:
            if "layer" not in declared:
                layered = [n for n in _methods.available(differentiable=True) if "layer" in _methods.parameters(n)]
                raise ConfigError(f"method '{method}' works at the input and takes no layer= "
                                  f"(layer methods: {', '.join(layered)})")
            params["layer"] = layer
        # One pass over the whole batch, as the caller's forward pass (batch-norm statistics).
        size = declared.get("batch_size", None)
        if "batch_size" in declared and "batch_size" not in params and isinstance(size, int) and size < len(x):
            params["batch_size"] = len(x)
    elif layer is not None:
        params["layer"] = layer
    return explain(model, x, method, target=classes, create_graph=True, **params)


class _SharedForward(torch.nn.Module):
    """Runs the user's model; its forward pass over exactly the batch `x` is kept (with its graph) as
    the step's logits (a pass without autograd, such as a method's target probe, is not) and, for that
    pass only, batch-norm layers that track running statistics in
    train mode do so (the explanation's session switches that off for its passes)."""

    def __init__(self, model, x):
        super().__init__()
        self.model = model
        self.batch = x
        self.logits = None
        self.tracking = [m for m in model.modules() if m.training and getattr(m, "track_running_stats", False) is True]

    def forward(self, inputs):
        if (self.logits is not None or not torch.is_grad_enabled() or inputs.shape != self.batch.shape
                or not torch.equal(inputs.detach(), self.batch)):
            return self.model(inputs)
        flags = [m.track_running_stats for m in self.tracking]
        try:
            for m in self.tracking:
                m.track_running_stats = True
            self.logits = self.model(inputs)
        finally:
            for m, flag in zip(self.tracking, flags):
                m.track_running_stats = flag
        return self.logits


def _explain_sharing_forward(model, x, classes, method, layer, method_params):
    from ..core.layers import resolve_layers

    if layer is not None and not isinstance(layer, torch.nn.Module):
        ((_, layer),) = resolve_layers(model, layer)  # the user's names, checked on the user's model
    wrapper = _SharedForward(model, x.detach())
    expl = _explain(wrapper, x, classes, method, layer, method_params)
    if wrapper.logits is None:
        raise ConfigError(f"with_logits=True needs a method that runs one forward pass over the whole batch "
                          f"(input_x_gradient, gradient, gradcam, ...); '{method}' does not")
    return expl, wrapper.logits


def choose_classes(target, B: int, *, seed=None, generator=None) -> torch.Tensor:
    """(B,) class indices: the given ones, or one present class per image of multi-hot labels drawn
    with probability proportional to the label (utils.get_random_optimization_targets)."""
    if isinstance(target, bool) or target is None:
        raise InputError("target must be (B,) class indices, one int, or (B, K) multi-hot labels; got "
                         f"{target!r}")
    if isinstance(target, int):
        return torch.full((B,), target, dtype=torch.long)
    t = torch.as_tensor(target.detach() if isinstance(target, torch.Tensor) else target)
    if t.dim() == 0:
        return torch.full((B,), int(t), dtype=torch.long)
    if t.shape[0] != B or t.dim() > 2:
        raise InputError(f"target must be ({B},) class indices or ({B}, K) multi-hot labels; got shape {tuple(t.shape)}")
    if t.dim() == 1:
        if t.is_floating_point() and not bool((t == t.round()).all()):
            raise InputError("target (B,) must hold class indices (integers)")
        return t.long()
    p = t.to(torch.float64)
    if not bool(torch.isfinite(p).all()) or bool((p < 0).any()):
        raise InputError("multi-hot target must be finite and non-negative")
    empty = ~(p > 0).any(1)
    if bool(empty.any()):
        raise InputError(f"multi-hot target: image(s) {empty.nonzero().flatten().tolist()[:10]} have no "
                         "present class to explain")
    if generator is None and seed is not None:
        generator = torch.Generator().manual_seed(int(seed))
    p = (p / p.sum(1, keepdim=True)).cpu()
    return torch.multinomial(p, 1, generator=generator).squeeze(1)


def object_region(boxes, masks, classes: torch.Tensor, shape) -> torch.Tensor:
    """(B, H, W) booleans: the region of the explained class of each image (module docstring)."""
    from ..metrics.localization import _box_tensor, region_masks

    B, H, W = shape
    if boxes is None and masks is None:
        raise InputError(f"guidance needs the object region: pass boxes=({B}, 4) as (x0, y0, x1, y1) pixels "
                         f"or masks=({B}, {H}, {W}) booleans")
    if boxes is not None and masks is not None:
        raise InputError("guidance takes boxes= or masks=, not both")
    if masks is not None:
        m = masks
        if isinstance(m, torch.Tensor) and m.dim() == 4 and m.shape[1] != 1:  # (B, K, H, W): one per class
            if m.shape[0] != B or tuple(m.shape[-2:]) != (H, W):
                raise InputError(f"masks must be ({B}, {H}, {W}) or ({B}, K, {H}, {W}); got {tuple(m.shape)}")
            if int(classes.max()) >= m.shape[1] or int(classes.min()) < 0:
                raise InputError(f"masks hold {m.shape[1]} classes but class {int(classes.max())} is explained")
            m = m[torch.arange(B, device=m.device), classes.to(m.device)]
        return region_masks(shape, masks=m)
    boxes = _class_boxes(boxes, classes, B)
    t = _box_tensor(boxes, B)
    if not bool(torch.isfinite(t).all()):
        raise InputError("boxes contain NaN or infinite coordinates")
    real = (t[..., 2] > t[..., 0]) & (t[..., 3] > t[..., 1])
    outside = real & ((t[..., 0] < 0) | (t[..., 1] < 0) | (t[..., 2] > W) | (t[..., 3] > H))
    if bool(outside.any()):
        i, k = outside.nonzero()[0].tolist()
        raise InputError(f"box {t[i, k].tolist()} of image {i} lies outside the {W}x{H} image "
                         f"(x0, y0, x1, y1 pixels, x1 <= {W}, y1 <= {H})")
    return region_masks(shape, boxes=t)


def _class_boxes(boxes, classes, B):
    """Keep only the boxes of the explained class where boxes carry a class column (utils.filter_bbs)."""
    if isinstance(boxes, torch.Tensor) or type(boxes).__module__.startswith("numpy"):
        t = torch.as_tensor(boxes).detach().cpu()
        if t.dim() >= 2 and t.shape[-1] == 5:
            t = t[:, None] if t.dim() == 2 else t
            return [t[i][t[i, :, 0] == classes[i].item()][:, 1:] for i in range(t.shape[0])]
        return boxes
    if isinstance(boxes, (list, tuple)) and len(boxes) == B:
        out = []
        for i, entry in enumerate(boxes):
            e = entry
            if entry is not None and not (isinstance(entry, (list, tuple)) and len(entry) == 0):
                e = torch.as_tensor(entry.detach().cpu() if isinstance(entry, torch.Tensor) else entry,
                                    dtype=torch.float64)
                if e.dim() >= 1 and e.shape[-1] == 5:
                    e = e.reshape(-1, 5)
                    e = e[e[:, 0] == classes[i].item()][:, 1:]
            out.append([] if e is None else e)
        return out
    return boxes
