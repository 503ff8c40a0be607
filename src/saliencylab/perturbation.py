"""The perturbation engine: the one place that turns (images, masks, baseline) into scored batches.

A keep-mask is 1 where the image is kept and 0 where it is replaced by the baseline (soft values
blend): perturbed = x * m + baseline * (1 - m). Masks are never materialized for all rows at once:
the caller gives a function that builds the masks of one chunk of rows (row = image * n + k), and
the engine chunks by `batch_size`, so memory stays flat however many images or masks there are.

Deletion/insertion, MoRF/LeRF, ROAD, sensitivity-N, infidelity, occlusion and RISE all run here.

Shared passes (issue 16; `FAST = False` turns them off, for the benchmark's before/after): a metric's
clean forward (`resolve_remembered`) is remembered for its session, and rows whose mask keeps every
pixel (deletion's first checkpoint, insertion's last, MoRF/LeRF/ROAD at 0, sensitivity-N's clean
score) are scored from it instead of forwarded again. Their scores then come from a forward at
another batch size: equal to before up to float rounding (1e-7 on the EfficientNet-Lite0 softmax,
the same order as changing `batch_size`). Inside `shared_passes()`, what does not depend on the map
(the clean outputs, sensitivity-N's score drops) is also reused across metric calls on the same
model and images, bit for bit: a leaderboard's methods share those passes.
"""

from __future__ import annotations

import contextlib
import math
import weakref
from typing import Callable

import torch
import torch.nn.functional as F

from .core.progress import progress
from .baselines import Baseline, baseline_images, make_baseline
from .core.errors import ConfigError
from .core.targets import Target

MaskFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]

# The engine's shared passes and fast paths (issue 16): rows whose mask keeps every pixel are scored
# from the clean forward the metric already made (`remember_clean`), not forwarded again; sensitivity-N
# selects its random subsets by a k-th value instead of a full sort. False restores the code before
# (benchmarks/faithfulness.py --compare alternates both in one process).
FAST = True

# session -> (images, outputs of the clean forward): what `Metric.resolve` computed, kept for the
# session's lifetime only (a weak key: nothing outlives the metric call).
_CLEAN: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def remember_clean(session, x: torch.Tensor, outputs: torch.Tensor) -> None:
    """Keep the model's outputs on the clean images `x` for this session: the engine then scores the
    rows that keep every pixel (deletion's first checkpoint, insertion's last, MoRF/LeRF/ROAD at 0,
    sensitivity-N's clean score) from them instead of another forward pass of the same image."""
    try:
        _CLEAN[session] = (x, outputs.detach())
    except TypeError:  # a session that cannot be weakly referenced: no sharing
        pass


def resolve_remembered(metric, session, x: torch.Tensor, target):
    """`metric.resolve(session, x, target)` (the one clean forward) that also remembers the outputs.

    Inside `shared_passes()` the clean outputs are also kept across calls (`SHARED`, keyed by the
    model's weights and the images' bytes): the leaderboard measures every method's maps on the same
    images, and the clean forward is the same each time (bit for bit: the same batch, the same model)."""
    from .core.targets import resolve_target

    key = shared_key(session, x, "clean outputs")
    outputs = SHARED.get(key)
    if outputs is None:
        with torch.no_grad():
            outputs = session.forward(x)
        SHARED.put(key, outputs.detach())
    remember_clean(session, x, outputs)
    return resolve_target(target, outputs)


_SHARING = 0  # depth of open `shared_passes()` scopes


@contextlib.contextmanager
def shared_passes(size: int = 64):
    """Within this scope, metric calls reuse the results that do not depend on the map under
    evaluation (`SHARED`: the clean outputs, sensitivity-N's score drops) across calls: a leaderboard
    that measures every method's maps on the same images runs those forward passes once, and scores
    exactly as without it. Only for models that are pure functions of their input and weights (a
    model that records or counts its inputs sees fewer of them). The cache is emptied when the
    outermost scope ends.

    >>> with perturbation.shared_passes():
    ...     for method in methods: sl.evaluate(model, x, maps[method], "sensitivity_n")
    """
    global _SHARING
    _SHARING += 1
    SHARED.size = max(SHARED.size, int(size))
    try:
        yield SHARED
    finally:
        _SHARING -= 1
        if not _SHARING:
            SHARED.clear()


class SharedResults:
    """A small LRU of results that do not depend on the map under evaluation (the clean outputs,
    sensitivity-N's score drops), so that measuring several methods' maps on the same images runs
    those forward passes once. Bounded (`size` entries), so memory stays flat over a long run.
    Used only inside `shared_passes()` and while `FAST`; `clear()` empties it."""

    def __init__(self, size: int = 64):
        from collections import OrderedDict

        self.size = int(size)
        self.items = OrderedDict()

    def get(self, key):
        if key is None or not (FAST and _SHARING) or key not in self.items:
            return None
        self.items.move_to_end(key)
        return self.items[key]

    def put(self, key, value) -> None:
        if key is None or not (FAST and _SHARING):
            return
        self.items[key] = value
        self.items.move_to_end(key)
        while len(self.items) > self.size:
            self.items.popitem(last=False)

    def clear(self) -> None:
        self.items.clear()


SHARED = SharedResults()


def _digest(t: torch.Tensor) -> str:
    import hashlib

    data = t.detach().to("cpu").contiguous().reshape(-1)
    h = hashlib.blake2b(str((tuple(t.shape), t.dtype, t.device.type)).encode(), digest_size=16)
    h.update(data.view(torch.uint8).numpy().tobytes() if data.numel() else b"")
    return h.hexdigest()


def shared_key(session, x: torch.Tensor, *parts):
    """A key for `SHARED`: the model (weights, buffers, train/eval modes, hooks), the images' bytes and
    `parts` (hashable settings); None (nothing shared) when the session edits the model or sharing is off."""
    if not (FAST and _SHARING):
        return None
    from .core.session import model_fingerprint

    model = session.model
    # edits of the session, or hooks on the model (the user's own included: they may keep state),
    # can change what a forward pass computes: nothing is shared then
    if any(e.active for e in getattr(session, "_edits", ())):
        return None
    modules = list(model.modules())
    if any(m._forward_hooks or m._forward_pre_hooks for m in modules):
        return None
    modes = tuple(m.training for m in modules)
    try:
        hash(parts)
    except TypeError:
        return None
    return (id(model), model_fingerprint(model), modes, _digest(x), parts)


def _clean_outputs(session, x):
    found = _CLEAN.get(session) if FAST else None
    return found[1] if found is not None and found[0] is x else None


def apply_masks(x_rows: torch.Tensor, masks: torch.Tensor, baseline_rows: torch.Tensor) -> torch.Tensor:
    """x * m + b * (1 - m), with masks of shape (N, 1 or C, H, W)."""
    return torch.lerp(baseline_rows, x_rows, masks)


# Rows per forward pass when batch_size is None. CPUs run a forward pass fastest per image at small
# batches (EfficientNet-Lite0 on 2 cores: 26 ms/image at batch 1, 24 at 4, 33 at 8, 54 at 64: cache-bound);
# accelerators at large ones.
# With a backward pass the CPU optimum is larger (forward+backward: 43-45 ms/image at 8-16, 56 at 32).
AUTO_BATCH_SIZE = {"cpu": 4}
AUTO_BATCH_SIZE_OTHER = 64
AUTO_BACKWARD_BATCH_SIZE = {"cpu": 16}
AUTO_BACKWARD_BATCH_SIZE_OTHER = 32


def auto_batch_size(device, backward: bool = False, pixels: int | None = None) -> int:
    """Rows per pass for `batch_size=None` on this device (forward-only, or forward+backward).

    The CPU figures are for 224x224 images; smaller images get proportionally more rows (up to 256),
    since for them the per-call overhead, not the cache, dominates."""
    kind = torch.device(device).type
    if backward:
        rows = AUTO_BACKWARD_BATCH_SIZE.get(kind, AUTO_BACKWARD_BATCH_SIZE_OTHER)
    else:
        rows = AUTO_BATCH_SIZE.get(kind, AUTO_BATCH_SIZE_OTHER)
    if kind == "cpu" and pixels:
        rows = max(rows, min(256, rows * (224 * 224) // int(pixels)))
    return rows


class Perturber:
    """Scores perturbed copies of a batch of images; see the module docstring.

    baseline: a Baseline spec (see saliencylab.baselines) or an Imputer, whose replacement values
    depend on the mask (ROAD's noisy linear imputation).
    score: "softmax" (probability of the target class, the I-GOS/insertion convention), "logit",
    "log_softmax"; callable targets score themselves.
    batch_size: rows per forward pass; None picks one for the device (`auto_batch_size`).
    """

    def __init__(self, baseline="zero", score: str = "softmax", batch_size: int | None = None):
        if batch_size is not None and (not isinstance(batch_size, int) or isinstance(batch_size, bool)
                                       or batch_size < 1):
            raise ConfigError(f"batch_size must be a positive int or None (automatic), got {batch_size!r}")
        self.baseline = make_perturbation_baseline(baseline)
        self.score = score
        self.batch_size = batch_size

    def scores(self, session, x: torch.Tensor, target: Target, n: int, make_masks: MaskFn, *,
               reduce: Callable | None = None, perturb: Callable | None = None, desc: str = "",
               images: torch.Tensor | None = None) -> torch.Tensor:
        """Score n perturbations of each image: returns (B, n).

        `make_masks(image_index, k)` returns keep-masks (N, 1 or C, H', W') for a chunk of rows;
        masks smaller than the image are upsampled (nearest). `reduce(scores, image, k, masks)`, if
        given, is called on every chunk (RISE accumulates mask-weighted scores this way).
        `perturb(inputs, image, k)`, if given, transforms a chunk's perturbed inputs before the
        forward pass (the I-GOS family adds noise there; extremal perturbation flips).
        `images`: when `x` is a subset of the call's images, their indices among them, so that a
        random baseline draws each image's own numbers (see `baselines.baseline_images`).
        """
        with torch.no_grad():
            return self._run(session, x, target, n, make_masks, reduce, perturb, False, desc, images)

    def scores_and_grads(self, session, x: torch.Tensor, target: Target, n: int, make_masks: MaskFn, *,
                         reduce: Callable, perturb: Callable | None = None, desc: str = "",
                         images: torch.Tensor | None = None) -> torch.Tensor:
        """Like `scores`, with one forward+backward pass per chunk: for differentiable masks.

        `reduce(scores, grads, image, k, masks)` receives each chunk's gradients of the row scores
        with respect to its keep-masks (as `fit_masks` sized them, i.e. the image size for masks
        given at the image size), so the caller folds them into its own mask parameters chunk by
        chunk (e.g. through the adjoint of its upsampling); nothing is kept for all rows at once.
        Returns the (B, n) scores.
        """
        if isinstance(self.baseline, Imputer):
            raise ConfigError("mask gradients need a fixed baseline, not a mask-dependent imputer")
        return self._run(session, x, target, n, make_masks, reduce, perturb, True, desc, images)

    def _run(self, session, x, target, n, make_masks, reduce, perturb, grads, desc, images=None):
        """The chunk loop shared by `scores` and `scores_and_grads`."""
        B = x.shape[0]
        target = target.with_score(self.score)
        imputing = isinstance(self.baseline, Imputer)
        base = None if imputing else baseline_images(self.baseline, x, session, images)
        out = torch.empty(B, n, device=x.device, dtype=x.dtype)
        total = B * n
        size = self.batch_size or auto_batch_size(x.device, pixels=x.shape[-2] * x.shape[-1])
        starts = range(0, total, size)
        # rows that keep every pixel are the clean image: scored from the clean forward, if remembered
        clean = None if grads or perturb is not None else _clean_outputs(session, x)
        for start in progress(starts, desc=desc, total=len(starts)):
            rows = torch.arange(start, min(start + size, total), device=x.device)
            image, k = rows // n, rows % n
            masks = fit_masks(make_masks(image, k), x.shape[-2:]).to(x.dtype)
            if grads:
                masks = masks.detach().requires_grad_(True)
            if clean is not None:
                whole = masks.flatten(1).eq(1).all(1)
                if bool(whole.any()):
                    s = torch.empty(len(rows), device=x.device, dtype=x.dtype)
                    s[whole] = target(clean[image[whole]], image[whole]).to(x.dtype)
                    rest = ~whole
                    if bool(rest.any()):
                        s[rest] = self._forward(session, x, target, image[rest], k[rest], masks[rest], rows[rest],
                                                base, imputing, None).to(x.dtype)
                    out[image, k] = s.to(out.dtype)
                    if reduce is not None:
                        reduce(s, image, k, masks)
                    continue
            with torch.enable_grad() if grads else torch.no_grad():
                s = self._forward(session, x, target, image, k, masks, rows, base, imputing, perturb)
                g = session.grad(s, masks) if grads else None
            s = s.detach()
            out[image, k] = s.to(out.dtype)
            if grads:
                reduce(s, g, image, k, masks.detach())
            elif reduce is not None:
                reduce(s, image, k, masks)
        return out

    def _forward(self, session, x, target, image, k, masks, rows, base, imputing, perturb):
        """Scores of one chunk's perturbed rows (one forward pass)."""
        xr = x[image]
        if imputing:
            inputs = self.baseline.impute(xr, masks, seed_rows=rows)
        else:
            inputs = apply_masks(xr, masks, base[image])
        if perturb is not None:
            inputs = perturb(inputs, image, k)
        return target(_forward_fast(session, inputs), image)


# Channels-last inputs on CPU (issue 16): the engine's no-grad scoring passes hand the model its
# perturbed images in channels-last memory order when they are this large. Convolutions (oneDNN) then
# skip their layout conversions: EfficientNet-Lite0 at 224x224, batch 4, one thread: 21 instead of
# 32 ms per image (a 56-px CNN of the test zoo at 224x224: 24 instead of 56 ms); small images lose
# (the zoo CNN at 32x32: 10 instead of 8 ms), hence the threshold. The values are the same; the
# outputs move by float rounding only (1e-7 on the EfficientNet-Lite0 softmax, as a change of batch
# size does). A model that cannot take them (a `.view` of its input, say) gets contiguous inputs
# from its first failure on (remembered per model). `FAST = False` or None here turns this off.
CHANNELS_LAST_MIN_PIXELS: int | None = 128 * 128
_NO_CHANNELS_LAST: "weakref.WeakSet" = weakref.WeakSet()


def _forward_fast(session, inputs: torch.Tensor) -> torch.Tensor:
    """`session.forward(inputs)`, with channels-last inputs where they pay (see CHANNELS_LAST_MIN_PIXELS)."""
    model = session.model
    if (not FAST or CHANNELS_LAST_MIN_PIXELS is None or inputs.dim() != 4 or inputs.device.type != "cpu"
            or inputs.requires_grad or inputs.shape[-2] * inputs.shape[-1] < CHANNELS_LAST_MIN_PIXELS
            or model in _NO_CHANNELS_LAST):
        return session.forward(inputs)
    try:
        return session.forward(inputs.contiguous(memory_format=torch.channels_last))
    except RuntimeError:
        try:
            _NO_CHANNELS_LAST.add(model)
        except TypeError:
            pass
        session.cost.forward_images -= int(inputs.shape[0])  # the failed call is not a pass
        session.cost.forward_calls -= 1
        return session.forward(inputs)


MASK_UPSAMPLING = ("nearest", "bilinear")


def fit_masks(masks: torch.Tensor, size, mode: str = "nearest") -> torch.Tensor:
    """Bring (N, c, h, w) masks to the image size.

    "nearest": hard tiles (each cell repeated ceil(H/h) x ceil(W/w) times, then cropped).
    "bilinear": soft tents, bilinear interpolation with align_corners=True, i.e. what
    torch.nn.UpsamplingBilinear2d does (the I-GOS evaluation's `upscale`): the grid's corner cells sit
    on the image's corner pixels. Bilinear masks come back in float (bool masks as float32).
    """
    if masks.dim() == 3:
        masks = masks[:, None]
    H, W = size
    h, w = masks.shape[-2:]
    if (h, w) == (H, W):
        return masks
    if mode == "bilinear":
        if not masks.is_floating_point():
            masks = masks.float()
        return F.interpolate(masks, size=(H, W), mode="bilinear", align_corners=True)
    if mode != "nearest":
        raise ConfigError(f"unknown mask upsampling '{mode}'; choose one of {', '.join(MASK_UPSAMPLING)}")
    th, tw = math.ceil(H / h), math.ceil(W / w)
    if h * th < H or w * tw < W:
        raise ConfigError(f"masks of size {h}x{w} cannot tile images of size {H}x{W}")
    return masks.repeat_interleave(th, dim=-2).repeat_interleave(tw, dim=-1)[..., :H, :W]


# -- rankings ----------------------------------------------------------------------------------
def tile_sums(maps: torch.Tensor, tile: int) -> torch.Tensor:
    """Sum (B, H, W) maps over square tiles (edge tiles may be smaller): (B, ceil(H/t), ceil(W/t))."""
    if tile == 1:
        return maps
    H, W = maps.shape[-2:]
    ph, pw = (-H) % tile, (-W) % tile
    padded = F.pad(maps[:, None], (0, pw, 0, ph))
    return F.avg_pool2d(padded, tile, stride=tile, divisor_override=1)[:, 0]


def rank_positions(values: torch.Tensor, seed: int = 0) -> torch.Tensor:
    """Position of each unit when units are sorted by decreasing value (0 = most important).

    values: (B, U). Ties are broken by a seeded random permutation, so a constant map gives a
    random order rather than a raster scan.
    """
    B, U = values.shape
    g = torch.Generator(device="cpu").manual_seed(seed)
    perm = torch.randperm(U, generator=g).to(values.device)
    order = perm[torch.argsort(-values[:, perm], dim=1, stable=True)]
    pos = torch.empty_like(order)
    pos.scatter_(1, order, torch.arange(U, device=values.device).expand(B, U))
    return pos


def ranked_masks(positions: torch.Tensor, counts: torch.Tensor, shape: tuple[int, int], *,
                 insertion: bool, size: tuple[int, int] | None = None, upsampling: str = "nearest",
                 dtype: torch.dtype = torch.float32) -> MaskFn:
    """Masks that remove (deletion) or reveal (insertion) the `counts[k]` top-ranked units.

    positions: (B, U) from rank_positions; counts: (K,) number of units acted on at step k;
    shape: the unit grid (h, w) with h * w = U.
    upsampling "nearest" returns the binary (N, 1, h, w) grid (the engine repeats it into hard tiles);
    "bilinear" upsamples each chunk's binary grid to the image `size` with `fit_masks(..., "bilinear")`
    (soft tents, in `dtype`), as the I-GOS deletion/insertion evaluation does.
    """
    h, w = shape
    if upsampling not in MASK_UPSAMPLING:
        raise ConfigError(f"unknown mask upsampling '{upsampling}'; choose one of {', '.join(MASK_UPSAMPLING)}")
    if upsampling == "bilinear" and size is None:
        raise ConfigError("bilinear mask upsampling needs the image size")

    def make(image, k):
        acted = positions[image] < counts[k][:, None]
        keep = (acted if insertion else ~acted).view(-1, 1, h, w)
        if upsampling == "bilinear":
            # the binary grid first, then the interpolation: an insertion mask is then exactly one
            # minus the deletion mask of the same step (bilinear weights sum to one, up to rounding)
            return fit_masks(keep.to(dtype), size, "bilinear")
        return keep

    return make


STEP_RULES = ("even", "floor")


def step_counts(units: int, steps: int | None = None, per_step: int | None = None,
                rule: str = "even") -> torch.Tensor:
    """How many units are acted on at each checkpoint, from 0 to all units inclusive.

    per_step: that many units per checkpoint, the last one takes the rest. Otherwise `steps` by `rule`:
    "even" spreads steps + 1 checkpoints evenly (round(k * units / steps)); "floor" acts on
    max(1, units // steps) units per checkpoint, the last one taking the rest (I-GOS's
    `step = max(1, num_pixels // 50)`: 15 of 784 cells, 53 steps, the last of 4 cells).
    """
    if per_step is None:
        if steps is None or steps < 1:
            raise ConfigError(f"steps must be a positive int, got {steps!r}")
        if rule == "even":
            return torch.round(torch.linspace(0, units, steps + 1)).long()
        if rule != "floor":
            raise ConfigError(f"unknown step rule '{rule}'; choose one of {', '.join(STEP_RULES)}")
        per_step = max(1, int(units // steps))
    counts = torch.arange(0, units + per_step, per_step).clamp(max=units)
    return torch.unique_consecutive(counts)


# -- seeded randomness keyed by row ----------------------------------------------------------------
# Perturbation metrics draw random subsets and noise for each row (image * n + k). Drawing them
# from a counter-based hash of (seed, row, element) instead of a generator makes every row's draw
# independent of how rows are chunked (batch_size) and of the device: same seed, same numbers.
_M32 = 0xFFFFFFFF


def _hash32(v: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer mixer (int64 tensors holding values in [0, 2**32)); no int64 overflow."""
    v = ((v >> 16) ^ v) * 0x45D9F3B & _M32
    v = ((v >> 16) ^ v) * 0x45D9F3B & _M32
    return (v >> 16) ^ v


def row_bits(seed: int, rows: torch.Tensor, size: int) -> torch.Tensor:
    """(N, size) uniformly distributed 32-bit integers (int64), one stream per row, keyed by seed."""
    rows = rows.to(torch.int64)
    key = _hash32((_hash32(torch.tensor(int(seed) & _M32, device=rows.device)) + rows) & _M32)
    j = torch.arange(size, device=rows.device, dtype=torch.int64) * 0x9E3779B1 & _M32
    return _hash32(_hash32(key[:, None] ^ j) ^ 0x5BD1E995)


def row_uniform(seed: int, rows: torch.Tensor, size: int, dtype=torch.float32) -> torch.Tensor:
    """(N, size) uniform values in (0, 1) (24-bit resolution); see row_bits."""
    return (((row_bits(seed, rows, size) >> 8).to(torch.float64) + 0.5) * 2.0 ** -24).to(dtype)


def row_normal(seed: int, rows: torch.Tensor, shape, dtype=torch.float32) -> torch.Tensor:
    """(N, *shape) standard normal values, one stream per row (inverse CDF of row_uniform)."""
    shape = tuple(shape)
    u = row_uniform(seed, rows, math.prod(shape), torch.float64)
    return torch.special.ndtri(u).to(dtype).view(len(rows), *shape)


def random_subsets(seed: int, rows: torch.Tensor, units: int, sizes: torch.Tensor) -> torch.Tensor:
    """(N, units) bool, True on `sizes[r]` units of row r drawn uniformly without replacement."""
    keys = row_bits(seed, rows, units) * units + torch.arange(units, device=rows.device)  # unique keys
    order = keys.argsort(dim=1)
    positions = torch.empty_like(order)
    positions.scatter_(1, order, torch.arange(units, device=rows.device).expand_as(order))
    return positions < sizes.to(rows.device)[:, None]


# -- ROAD: noisy linear imputation ---------------------------------------------------------------
class Imputer:
    """A mask-dependent baseline: replacement values computed from the kept pixels."""

    def impute(self, x: torch.Tensor, masks: torch.Tensor, seed_rows: torch.Tensor | None = None) -> torch.Tensor:
        raise NotImplementedError


class LinearImputer(Imputer):
    """ROAD's noisy linear imputation (Rong et al. 2022), batched in torch.

    Each removed pixel takes the weighted mean of its 8 neighbours (removed or kept), kept pixels
    stay fixed: the solution of a sparse linear system per image (the authors solve it with
    scipy's spsolve, one image at a time). Here all images and channels are solved at once by
    conjugate gradients preconditioned with a geometric multigrid V-cycle (solve_linear_imputation).
    Gaussian noise (std `noise`) is added to the imputed pixels, as in ROAD, to hide the mask's
    shape; it is drawn per row from `seed` (row_normal), so it does not depend on batch_size.

    Units of the noise: the authors (tleemann/road_evaluation, road/imputed_dataset.py
    `ImputedDataset.__getitem__`) impute images in [0, 1] pixel units and normalize afterwards (the
    `transform` applied after `NoisyLinearImputer.__call__`), so their noise 0.01 is 0.01 / std per
    channel in the model's input space. Give the model's normalization as `mean`, `std` (per channel,
    or one number) and the imputation runs in pixel units, as theirs: x * std + mean is imputed, the
    noise added, and the result normalized back (kept pixels are returned untouched, bit for bit).
    The linear fill commutes with the per-channel affine map (its weights sum to 1), so only the
    noise's scale changes, and an image with every pixel removed, which the authors' solve cannot
    handle (a singular system), is filled with 0 in pixel units (black) rather than 0 in input units.
    Without `std` the images are taken to be in pixel units already (noise `noise` in input units).
    """

    name = "road"

    def __init__(self, noise: float = 0.01, iterations: int = 50, tol: float = 1e-6, seed: int = 0,
                 mean=None, std=None):
        self.noise = float(noise)
        self.iterations = int(iterations)
        self.tol = float(tol)
        self.seed = int(seed)
        self.mean, self.std = check_normalization(mean, std)

    def __repr__(self) -> str:
        extra = "" if self.std is None else f", mean={self.mean}, std={self.std}"
        return (f"LinearImputer(noise={self.noise}, iterations={self.iterations}, tol={self.tol}, "
                f"seed={self.seed}{extra})")

    def impute(self, x, masks, seed_rows=None):
        rows = seed_rows if seed_rows is not None else torch.arange(x.shape[0], device=x.device)
        return self.fill(x, masks, lambda: row_normal(self.seed, rows.to(x.device), x.shape[1:], x.dtype))

    def fill(self, x, masks, draw: Callable[[], torch.Tensor]) -> torch.Tensor:
        """The imputation of `x` under keep-`masks` (kept from 0.5 up), with standard normal noise
        `draw()` (N, C, H, W) scaled by `noise` in pixel units (see the class docstring)."""
        keep = (masks >= 0.5).to(x.dtype).expand(-1, 1, -1, -1)[:, :1]
        if self.std is None:
            filled = solve_linear_imputation(x, keep, self.iterations, self.tol)
            if self.noise > 0:
                filled = filled + (1 - keep) * self.noise * draw()
            return filled
        mean, std = channel_stats(self.mean, self.std, x)
        pixels = x * std + mean
        filled = solve_linear_imputation(pixels, keep, self.iterations, self.tol)
        if self.noise > 0:
            filled = filled + (1 - keep) * self.noise * draw()
        return torch.where(keep.bool(), x, (filled - mean) / std)


def check_normalization(mean, std) -> tuple:
    """(mean, std) as tuples of floats (None, None: no normalization); std > 0. One number stands for
    every channel."""
    if std is None:
        if mean is not None:
            raise ConfigError("a normalization mean needs its std")
        return None, None

    def floats(v, name):
        values = (v,) if isinstance(v, (int, float)) and not isinstance(v, bool) else v
        try:
            values = tuple(float(f) for f in values)
        except (TypeError, ValueError) as e:
            raise ConfigError(f"normalization {name} must be a number or a sequence of numbers, got {v!r}") from e
        if not values or not all(math.isfinite(f) for f in values):
            raise ConfigError(f"normalization {name} must be finite numbers, got {v!r}")
        return values

    std = floats(std, "std")
    mean = floats(0.0 if mean is None else mean, "mean")
    if any(s <= 0 for s in std):
        raise ConfigError(f"normalization std must be positive, got {std!r}")
    if len(mean) != len(std) and 1 not in (len(mean), len(std)):
        raise ConfigError(f"normalization mean and std differ in length: {mean!r}, {std!r}")
    return mean, std


def channel_stats(mean, std, x: torch.Tensor):
    """(1, C, 1, 1) tensors of `mean`, `std` (tuples, one value or one per channel) for images `x`."""
    C = x.shape[1]
    out = []
    for values, name in ((mean, "mean"), (std, "std")):
        if len(values) not in (1, C):
            raise ConfigError(f"the normalization {name} has {len(values)} values for images of {C} channels")
        out.append(torch.tensor(values, device=x.device, dtype=x.dtype).expand(C).view(1, C, 1, 1))
    return out


def _pool2(t: torch.Tensor, reduce: str = "sum", pad: float = 0.0) -> torch.Tensor:
    """2x2 sum (or min) pooling of (N, C, H, W), odd sizes padded at the end with `pad`. (The four
    strided corners added pairwise, (a + b) + (c + d), the order of the reshape reduction this replaced
    (equal bit for bit, tested): 2-15x faster on CPU than it, and than avg/max_pool2d, which cost
    milliseconds per call on small CPU tensors.)"""
    N, C, H, W = t.shape
    if H % 2 or W % 2:
        t = F.pad(t, (0, W % 2, 0, H % 2), value=pad)
    if not FAST:  # the reshape reduction (before issue 16)
        t = t.reshape(N, C, (H + 1) // 2, 2, (W + 1) // 2, 2)
        return t.sum((3, 5)) if reduce == "sum" else t.amin((3, 5))
    a, b, c, d = t[..., 0::2, 0::2], t[..., 0::2, 1::2], t[..., 1::2, 0::2], t[..., 1::2, 1::2]
    if reduce == "sum":
        return (a + b).add_(c + d)
    return torch.minimum(torch.minimum(a, b), torch.minimum(c, d))


def _pyramid_fill(x: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """Initial guess: each hole gets the mask-weighted average of the nearest coarser level."""
    levels = [(x * keep, keep)]
    while max(levels[-1][1].shape[-2:]) > 1:
        v, w = levels[-1]
        levels.append((_pool2(v), _pool2(w)))
    v, w = levels[-1]
    guess = torch.where(w > 0, v / w.clamp_min(1e-12), torch.zeros_like(v))
    for v, w in reversed(levels[:-1]):
        up = guess.repeat_interleave(2, -2).repeat_interleave(2, -1)[..., :v.shape[-2], :v.shape[-1]]
        guess = torch.where(w > 0, v / w.clamp_min(1e-12), up)
    return guess


def _neighbour_sum(p: torch.Tensor) -> torch.Tensor:
    """12 x the weighted sum of ROAD's 8 neighbours, zero outside the image.

    ROAD's weights (tleemann/road_evaluation, road/imputations.py) are 1/6 for the four direct
    neighbours and 1/12 for the four diagonal ones; neighbours outside the image are dropped and a
    removed pixel is the weighted mean of the neighbours that exist (the authors' `sum_neighbors`
    correction, our `_Grid.norm`). 12 x that kernel is [1, 2, 1]^T [1, 2, 1] - 4 * centre, applied
    here as two separable passes.
    """
    q = F.pad(p, (1, 1, 1, 1))
    v = q[..., :-2, :] + q[..., 2:, :]
    v.add_(q[..., 1:-1, :], alpha=2)
    s = v[..., :-2] + v[..., 2:]
    return s.add_(v[..., 1:-1], alpha=2).sub_(p, alpha=4)


class _Grid:
    """One multigrid level: the imputation operator A = hole * (norm - neighbour_sum) on a grid,
    scaled by 12 (so the interior diagonal is 12)."""

    def __init__(self, hole: torch.Tensor, omega: float = 0.8):
        self.hole = hole  # (N, 1, h, w), 1 on unknowns
        self.norm = _neighbour_sum(torch.ones_like(hole[:1]))  # 12 x neighbour weight present (< 12 at borders)
        self.step = omega / self.norm  # damped Jacobi

    def apply(self, p: torch.Tensor) -> torch.Tensor:
        return _neighbour_sum(p).neg_().addcmul_(self.norm, p).mul_(self.hole)

    def coarser(self) -> "_Grid":
        # a coarse cell is unknown only when all its fine cells are (cells outside the image count
        # as unknown); partly known cells stay Dirichlet, which keeps the coarse problem well posed
        return _Grid(_pool2(self.hole, "min", pad=1.0))


def _v_cycle(grids: list, level: int, r: torch.Tensor, sweeps: int = 2) -> torch.Tensor:
    """Symmetric V-cycle for A e = r, from e = 0: damped Jacobi, piecewise-constant prolongation and
    its transpose (2x2 sums) as restriction, the same stencil rediscretized on coarse grids. Being
    symmetric positive definite, it is a valid preconditioner for conjugate gradients."""
    g = grids[level]
    coarsest = level == len(grids) - 1
    e = r * g.step
    for _ in range((20 if coarsest else sweeps) - 1):
        e.addcmul_(r - g.apply(e), g.step)
    if coarsest:
        return e
    H, W = r.shape[-2:]
    coarse = grids[level + 1]
    ec = _v_cycle(grids, level + 1, _pool2(r - g.apply(e)).mul_(coarse.hole), sweeps)
    e.addcmul_(ec.repeat_interleave(2, -2).repeat_interleave(2, -1)[..., :H, :W], g.hole)
    for _ in range(sweeps):
        e.addcmul_(r - g.apply(e), g.step)
    return e


def solve_linear_imputation(x: torch.Tensor, keep: torch.Tensor, iterations: int = 50,
                            tol: float = 1e-6) -> torch.Tensor:
    """Removed pixels (keep = 0) = weighted mean of their neighbours; kept pixels fixed.

    x: (N, C, H, W); keep: (N, 1, H, W) of 0/1. The system (diag(norm) - W_uu) u = W_uk x_k is
    symmetric positive definite wherever a hole touches a kept pixel; it is solved for all images
    and channels at once by multigrid-preconditioned conjugate gradients (MGCG), from the pyramid
    fill as initial guess, until every system's relative residual is below `tol` (at most
    `iterations` steps; about 5-10 suffice at 224x224 whatever the holes). Iterates and residuals
    are kept in float64 on CPU/CUDA, because in float32 the residual of a large hole (condition
    number ~ its diameter squared) stalls around 1e-4 of the value range; the V-cycle runs in the
    input's dtype. An image with every pixel removed (a singular system) is filled with 0.
    """
    keep = keep.to(x.dtype)
    if bool(keep.all()):
        return x.clone()
    work = torch.float64 if x.device.type in ("cpu", "cuda") else x.dtype
    grids = [_Grid(1 - keep)]
    while max(grids[-1].hole.shape[-2:]) > 2:
        grids.append(grids[-1].coarser())
    fine = _Grid((1 - keep).to(work))
    known = (x * keep).to(work)
    b = fine.hole * _neighbour_sum(known)
    u = fine.hole * _pyramid_fill(x, keep).to(work)
    r = b - fine.apply(u)
    b_norm = b.flatten(2).norm(dim=2)[..., None, None]

    def done(res):
        return bool((res.flatten(2).norm(dim=2)[..., None, None] <= tol * b_norm).all())

    if not done(r):
        z = _v_cycle(grids, 0, r.to(x.dtype)).to(work)
        p = z
        rz = (r * z).sum((2, 3), keepdim=True)
        for _ in range(iterations):
            Ap = fine.apply(p)
            pAp = (p * Ap).sum((2, 3), keepdim=True)
            alpha = torch.where(pAp > 0, rz / pAp.clamp_min(1e-300), torch.zeros_like(pAp))
            u = u + alpha * p
            r = r - alpha * Ap
            if done(r):
                break
            z = _v_cycle(grids, 0, r.to(x.dtype)).to(work)
            rz_new = (r * z).sum((2, 3), keepdim=True)
            beta = torch.where(rz > 0, rz_new / rz.clamp_min(1e-300), torch.zeros_like(rz))
            rz = rz_new
            p = z + beta * p
    return (known + u).to(x.dtype)


def make_perturbation_baseline(spec):
    """Like baselines.make_baseline, plus 'road' for ROAD's linear imputation."""
    if isinstance(spec, (Imputer, Baseline)):
        return spec
    if spec == "road":
        return LinearImputer()
    return make_baseline(spec)
