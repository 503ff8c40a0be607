"""C3LT: cycle-consistent counterfactuals by latent transformations (Khorram & Li Fuxin, CVPR 2022).

Two small maps in the latent space of a fixed generator, g: z -> z' (source class to target class) and
h: z' -> z (back), are trained so that the generated image G(step(E(x), g)) is classified as the target
class, stays close to the query, maps back to it (cycle), and looks real to a discriminator. After
training a counterfactual costs one encoder, two tiny maps and one generator pass: no optimisation per
query.

    from saliencylab.counterfactuals import c3lt
    domain = c3lt.digits_domain()                         # shipped: sklearn digits, 32 px, class pair 4 <-> 9
    model = c3lt.C3LT(domain.generator, domain.encoder, domain.classifier, domain.discriminator,
                      source=4, target=9, perceptual_layers=domain.perceptual_layers)
    model.fit(domain.images(4, "train"), domain.images(9, "train"), out_dir="runs/c3lt")   # resumable
    cf = model.explain(domain.images(4))                  # .images, .masks (B, H, W), .probabilities

What follows the authors' code (khorrams/c3lt; GPL, so read for the formulas, nothing copied):
- the maps (`c3lt/modules.py`, `NLMappingConv`): 1x1 conv, ReLU, 1x1 conv on latents (B, D, 1, 1)
  (`NLMappingFC`, linear layers, for flat latents (B, D)); a step is residual and keeps the latent's
  norm (`c3lt/helper.py`, `nonlinear_map_step`: z <- (z + map(z)) * |z| / |z + map(z)|), `n_steps`
  steps (default 1, `args.py --n_steps`);
- the loss (`c3lt/train.py`, `train_c3lt`), both directions averaged:
  cls + alpha * prox + beta * cyc + gamma * adv, with
  cls = NLL of the target class (`helper.classifier_loss`, "nll"; "hinge": max(p_max other - p_target
  + kappa, 0) on softmax outputs), prox = (L1(x, x_cf) + p1 * smoothness(m) + p2 * entropy(m)) /
  (1 + p1 + p2) where m is the squared difference min-max normalised per image (`proximity_loss`,
  `gen_masks(mode="mse")`, `smoothness_loss` with beta 2, `entropy_loss` = mean min(m, 1 - m)),
  cyc = (perceptual(x1, x1_cyc) + perceptual(x2, x2_cyc) + L1(z1, z1_cyc) + L1(z2, z2_cyc)) / 4 with
  perceptual = (sum over the classifier's layers of L1 of the features + L1 of the images) /
  (1 + number of layers) (`perceptual_loss`, layers 'layer1', 'layer2' of MnistNet, their ReLU
  outputs), adv = mean BCE(D(.), real) over the two counterfactuals and the two cycled images;
- defaults (`args.py`): alpha 0.1, beta 0.1, gamma 0.001, p1 10, p2 1, kappa 0.05, Adam lr 1e-3
  (`--lr_map`, default betas) for g and h together, batch 128, 200 epochs, StepLR every 25 epochs x 0.5;
  an epoch zips a shuffled pass over the source images with one over the target images, both batches
  cut to the smaller one (`assert_batch_size_equal`);
- the change mask shown with a counterfactual is |x_cf - x| min-max normalised per image
  (`gen_masks(mode="abs")`), the mask the authors pass to their COUT metric.

Deliberate differences: the classification loss is cross-entropy on the classifier's output (the
authors apply NLLLoss to MnistNet's log-softmax output: the same number; for a classifier returning
log-probabilities ours is unchanged, as log_softmax is idempotent); we train `epochs` epochs (the
authors' loop runs epochs + 1, `range(0, epochs + 1)`); the min-max mask normalisation leaves a mask
of zeros where the images are equal (the authors divide by zero there); for several channels the mask
is the channel mean (the authors' code is single-channel, "TODO RGB"); the frozen networks are run in
eval mode with their parameters frozen through `ModelSession` (the authors set a `requires_grad`
attribute on the modules, which leaves gradients flowing into them); the perceptual layers are named
(`perceptual_layers`, any modules of the classifier; empty: the image L1 term alone) instead of
MnistNet's hard-coded 'layer1', 'layer2'; without a discriminator the adversarial term is left out;
checkpoints are written every epoch and a run resumes (theirs snapshots g, h every 25 epochs).
"""

from __future__ import annotations

import contextlib
import json
import math
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..core.errors import ConfigError, InputError
from ..core.session import model_device
from .digits import DigitsDomain, digits_domain  # noqa: F401  (re-exported: the shipped domain)

__all__ = ["C3LT", "Counterfactuals", "LatentMap", "latent_step", "change_mask", "smoothness_loss", "entropy_loss",
           "proximity_loss", "classification_loss", "perceptual_loss", "adversarial_loss", "digits_domain",
           "DigitsDomain", "DEFAULTS"]

# The authors' defaults (khorrams/c3lt args.py): see the module docstring.
DEFAULTS = dict(alpha=0.1, beta=0.1, gamma=0.001, p1=10.0, p2=1.0, cls_type="nll", kappa=0.05, lr=1e-3,
                batch_size=128, epochs=200, decay_step=25, decay_gamma=0.5, n_steps=1)
CHECKPOINTS = "checkpoints"  # the folder and checkpoint format of training.loop, whose readers C3LT uses
FORMAT = 1


# -- the maps ------------------------------------------------------------------------------------
class LatentMap(nn.Module):
    """The authors' NLMappingConv / NLMappingFC: T2(ReLU(T1(z))), 1x1 convolutions (or linear layers)."""

    def __init__(self, latent_dim: int, conv: bool = True):
        super().__init__()
        layer = (lambda: nn.Conv2d(latent_dim, latent_dim, 1, 1, 0, bias=True)) if conv else \
            (lambda: nn.Linear(latent_dim, latent_dim, bias=True))
        self.T1 = nn.Sequential(layer(), nn.ReLU())
        self.T2 = nn.Sequential(layer())

    def forward(self, z):
        return self.T2(self.T1(z))


def latent_step(z: torch.Tensor, fn: Callable, n_steps: int = 1) -> list[torch.Tensor]:
    """[z, z_1, ..., z_n]: residual steps z <- z + fn(z), each rescaled to the norm of the starting z
    (flattened per sample), as the authors' `nonlinear_map_step`."""
    shape = z.shape
    flat = z.reshape(shape[0], -1)
    norm = flat.norm(dim=1, keepdim=True)
    path, prev = [z], flat
    for _ in range(n_steps):
        step = prev + fn(prev.reshape(shape)).reshape(shape[0], -1)
        step = step * norm / step.norm(dim=1, keepdim=True).clamp_min(1e-12)
        path.append(step.reshape(shape))
        prev = step
    return path


# -- the loss terms ------------------------------------------------------------------------------
def change_mask(x: torch.Tensor, x_cf: torch.Tensor, mode: str = "abs") -> torch.Tensor:
    """(B, H, W) in [0, 1]: |x_cf - x| ("abs") or (x_cf - x)^2 ("mse"), averaged over channels, min-max
    normalised per image (zeros where the two images are equal)."""
    d = x_cf - x
    d = d.abs() if mode == "abs" else d.pow(2) if mode == "mse" else None
    if d is None:
        raise ConfigError(f"mask mode must be 'abs' or 'mse', got {mode!r}")
    d = d.mean(1)
    flat = d.reshape(d.shape[0], -1)
    lo = flat.min(1, keepdim=True).values
    span = flat.max(1, keepdim=True).values - lo
    flat = (flat - lo) / torch.where(span > 0, span, torch.ones_like(span))
    return flat.reshape(d.shape)


def smoothness_loss(masks: torch.Tensor, power: float = 2.0) -> torch.Tensor:
    """Mean over images of (mean |vertical differences|^power + mean |horizontal differences|^power) / 2."""
    a = (masks[:, :-1, :] - masks[:, 1:, :]).abs().pow(power).flatten(1).mean(1)
    b = (masks[:, :, :-1] - masks[:, :, 1:]).abs().pow(power).flatten(1).mean(1)
    return (a + b).mean() / 2


def entropy_loss(masks: torch.Tensor) -> torch.Tensor:
    """Mean of min(m, 1 - m): zero for a binary mask (the authors' "entropy")."""
    return torch.minimum(masks, 1.0 - masks).mean()


def proximity_loss(x: torch.Tensor, x_cf: torch.Tensor, p1: float = 10.0, p2: float = 1.0) -> torch.Tensor:
    """(L1(x, x_cf) + p1 * smoothness(m) + p2 * entropy(m)) / (1 + p1 + p2), m = change_mask(mode="mse")."""
    m = change_mask(x, x_cf, "mse")
    return (F.l1_loss(x_cf, x) + p1 * smoothness_loss(m) + p2 * entropy_loss(m)) / (1 + p1 + p2)


def classification_loss(outputs: torch.Tensor, target: int, kind: str = "nll", kappa: float = 0.05) -> torch.Tensor:
    """"nll": cross-entropy of `target`; "hinge": mean max(max other softmax prob - target prob + kappa, 0)."""
    if kind == "nll":
        return F.cross_entropy(outputs, torch.full((outputs.shape[0],), int(target), dtype=torch.long,
                                                   device=outputs.device))
    if kind == "hinge":
        p = outputs.softmax(1)
        others = torch.cat([p[:, :target], p[:, target + 1:]], 1)
        return (others.amax(1) - p[:, target] + kappa).clamp_min(0).mean()
    raise ConfigError(f"cls_type must be 'nll' or 'hinge', got {kind!r}")


def perceptual_loss(x: torch.Tensor, y: torch.Tensor, features: Callable | None = None) -> torch.Tensor:
    """(sum_l L1(f_l(x), f_l(y)) + L1(x, y)) / (1 + L): `features(images)` -> list of L feature tensors."""
    total = F.l1_loss(y, x)
    fx = features(x) if features is not None else []
    fy = features(y) if features is not None else []
    for a, b in zip(fx, fy):
        total = total + F.l1_loss(b, a)
    return total / (1 + len(fx))


def adversarial_loss(probabilities: torch.Tensor) -> torch.Tensor:
    """BCE of the discriminator's probabilities against 'real' (the authors' nn.BCELoss with valid = 1)."""
    return F.binary_cross_entropy(probabilities, torch.ones_like(probabilities))


# -- results ------------------------------------------------------------------------------------
@dataclass
class Counterfactuals:
    """What `C3LT.explain` returns (all on the CPU, detached).

    images (B, C, H, W) the counterfactuals; masks (B, H, W) |x_cf - x| min-max normalised per image;
    probabilities (B, K) the classifier's softmax at the counterfactuals; query_probabilities (B, K) at
    the queries; reconstructions G(E(x)); latents E(x) and latents_cf; path: the images after each
    latent step (n_steps entries); source / target the classes.
    """

    images: torch.Tensor
    masks: torch.Tensor
    probabilities: torch.Tensor
    query_probabilities: torch.Tensor
    reconstructions: torch.Tensor
    latents: torch.Tensor
    latents_cf: torch.Tensor
    source: int
    target: int
    path: list = field(default_factory=list)

    @property
    def valid(self) -> torch.Tensor:
        """(B,) bool: the classifier's top class at the counterfactual is the target."""
        return self.probabilities.argmax(1) == self.target


# -- C3LT ---------------------------------------------------------------------------------------
class C3LT:
    """Learned counterfactual maps between two classes in a generator's latent space (module docstring).

    generator(z) -> images; encoder(images) -> z (any shape, (B, D, 1, 1) as the authors' DCGAN or
    (B, D)); classifier(images) -> logits or log-probabilities; discriminator(images) -> probability of
    real (optional). All four are left as they are: used in eval mode with frozen parameters during
    each call. perceptual_layers: names of classifier modules whose outputs enter the cycle's
    perceptual loss (the shipped domain gives its layer1 / layer2 ReLUs). The maps are built from
    `seed` when the latent size is first seen.
    """

    def __init__(self, generator: nn.Module, encoder: nn.Module, classifier: nn.Module,
                 discriminator: nn.Module | None = None, *, source: int = 4, target: int = 9,
                 perceptual_layers: Sequence[str] = (), alpha: float = DEFAULTS["alpha"],
                 beta: float = DEFAULTS["beta"], gamma: float = DEFAULTS["gamma"], p1: float = DEFAULTS["p1"],
                 p2: float = DEFAULTS["p2"], cls_type: str = DEFAULTS["cls_type"], kappa: float = DEFAULTS["kappa"],
                 n_steps: int = DEFAULTS["n_steps"], lr: float = DEFAULTS["lr"],
                 batch_size: int = DEFAULTS["batch_size"], decay_step: int = DEFAULTS["decay_step"],
                 decay_gamma: float = DEFAULTS["decay_gamma"], seed: int = 0):
        for name, m in (("generator", generator), ("encoder", encoder), ("classifier", classifier)):
            if not isinstance(m, nn.Module):
                raise ConfigError(f"{name} must be a torch.nn.Module, got {type(m).__name__}")
        if discriminator is not None and not isinstance(discriminator, nn.Module):
            raise ConfigError(f"discriminator must be a torch.nn.Module or None, got {type(discriminator).__name__}")
        for name, v in (("source", source), ("target", target)):
            if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 0:
                raise ConfigError(f"{name} must be a class index (an integer >= 0), got {v!r}")
        if int(source) == int(target):
            raise ConfigError(f"source and target must differ, both are {source}")
        if cls_type not in ("nll", "hinge"):
            raise ConfigError(f"cls_type must be 'nll' or 'hinge', got {cls_type!r}")
        for name, v in (("alpha", alpha), ("beta", beta), ("gamma", gamma), ("p1", p1), ("p2", p2), ("kappa", kappa)):
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
                raise ConfigError(f"{name} must be a number >= 0, got {v!r}")
        for name, v in (("n_steps", n_steps), ("batch_size", batch_size), ("decay_step", decay_step)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ConfigError(f"{name} must be an integer >= 1, got {v!r}")
        if isinstance(decay_gamma, bool) or not isinstance(decay_gamma, (int, float)) or not 0 < decay_gamma <= 1:
            raise ConfigError(f"decay_gamma must be a number in (0, 1], got {decay_gamma!r}")
        if not (isinstance(lr, (int, float)) and lr > 0):
            raise ConfigError(f"lr must be > 0, got {lr!r}")
        if isinstance(perceptual_layers, str):
            perceptual_layers = (perceptual_layers,)
        modules = dict(classifier.named_modules())
        missing = [n for n in perceptual_layers if n not in modules]
        if missing:
            raise ConfigError(f"perceptual layer(s) {', '.join(map(repr, missing))} not found in the classifier")
        self.generator, self.encoder, self.classifier, self.discriminator = generator, encoder, classifier, discriminator
        self.source, self.target = int(source), int(target)
        self.perceptual_layers = tuple(perceptual_layers)
        self.config = dict(alpha=float(alpha), beta=float(beta), gamma=float(gamma) if discriminator is not None else 0.0,
                           p1=float(p1), p2=float(p2), cls_type=cls_type, kappa=float(kappa), n_steps=n_steps,
                           lr=float(lr), batch_size=batch_size, decay_step=decay_step, decay_gamma=float(decay_gamma),
                           seed=int(seed), source=self.source, target=self.target,
                           perceptual_layers=list(self.perceptual_layers))
        self.g: LatentMap | None = None
        self.h: LatentMap | None = None
        self.history: list[dict] = []

    # -- plumbing ----------------------------------------------------------------------------
    def _maps(self, z: torch.Tensor) -> tuple[LatentMap, LatentMap]:
        if self.g is None:
            if z.dim() not in (2, 4):  # 1x1 convolutions act on (B, D, H, W) codes of any H, W
                raise InputError(f"the encoder must return latents (B, D) or (B, D, H, W), got {tuple(z.shape)}")
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(self.config["seed"])
                self.g = LatentMap(z.shape[1], conv=z.dim() == 4).to(z.device)
                self.h = LatentMap(z.shape[1], conv=z.dim() == 4).to(z.device)
        return self.g, self.h

    @contextlib.contextmanager
    def _frozen(self):
        """The user's networks in eval mode with frozen parameters (restored at exit); yields the
        classifier's feature function for the perceptual loss."""
        from ..core.session import ModelSession

        nets = [self.generator, self.encoder, self.classifier] + ([self.discriminator] if self.discriminator else [])
        with contextlib.ExitStack() as stack:
            sessions = [stack.enter_context(ModelSession(m, eval_mode=True, freeze_parameters=True)) for m in nets]
            features = None
            if self.perceptual_layers:
                session = sessions[2]
                modules = dict(self.classifier.named_modules())
                store = session.capture({n: modules[n] for n in self.perceptual_layers}, make_differentiable=False)

                def features(images):
                    store.clear()
                    self.classifier(images)
                    return [store[n] for n in self.perceptual_layers]
            yield features

    def _check_images(self, x, where: str) -> torch.Tensor:
        if not isinstance(x, torch.Tensor):
            raise InputError(f"{where} must be a tensor (N, C, H, W), got {type(x).__name__}")
        if x.dim() != 4 or x.shape[0] == 0:
            raise InputError(f"{where} must be images (N, C, H, W) with N >= 1, got shape {tuple(x.shape)}")
        if not x.is_floating_point() or not bool(torch.isfinite(x).all()):
            raise InputError(f"{where} must be finite floats")
        return x

    # -- the loss ----------------------------------------------------------------------------
    def loss_terms(self, x1: torch.Tensor, x2: torch.Tensor, features=None) -> dict[str, torch.Tensor]:
        """The loss of one batch pair (x1 of the source class, x2 of the target class, same size):
        {"loss", "cls", "prox", "cyc", "adv"} (call inside `_frozen`, as `fit` does)."""
        c = self.config
        n = c["n_steps"]
        z1 = self.encoder(x1)
        g, h = self._maps(z1)
        z2 = self.encoder(x2)
        z1_cf = latent_step(z1, g, n)[-1]
        z2_cf = latent_step(z2, h, n)[-1]
        x1_cf, x2_cf = self.generator(z1_cf), self.generator(z2_cf)
        zero = x1.new_zeros(())
        cls = (classification_loss(self.classifier(x1_cf), self.target, c["cls_type"], c["kappa"]) +
               classification_loss(self.classifier(x2_cf), self.source, c["cls_type"], c["kappa"])) / 2
        prox = (proximity_loss(x1, x1_cf, c["p1"], c["p2"]) + proximity_loss(x2, x2_cf, c["p1"], c["p2"])) / 2 \
            if c["alpha"] else zero
        cyc = adv = zero
        if c["beta"] or c["gamma"]:
            z1_cyc = latent_step(z1_cf, h, n)[-1]
            z2_cyc = latent_step(z2_cf, g, n)[-1]
            x1_cyc, x2_cyc = self.generator(z1_cyc), self.generator(z2_cyc)
            if c["beta"]:
                cyc = (perceptual_loss(x1, x1_cyc, features) + perceptual_loss(x2, x2_cyc, features) +
                       F.l1_loss(z1_cyc, z1) + F.l1_loss(z2_cyc, z2)) / 4
            if c["gamma"]:
                d = self.discriminator
                adv = (adversarial_loss(d(x2_cf)) + adversarial_loss(d(x1_cf)) + adversarial_loss(d(x1_cyc)) +
                       adversarial_loss(d(x2_cyc))) / 4
        loss = cls + c["alpha"] * prox + c["beta"] * cyc + c["gamma"] * adv
        return {"loss": loss, "cls": cls, "prox": prox, "cyc": cyc, "adv": adv}

    # -- training ----------------------------------------------------------------------------
    def fit(self, x_source: torch.Tensor, x_target: torch.Tensor, *, epochs: int = DEFAULTS["epochs"],
            out_dir=None, resume: bool = True, progress: bool = True, callback: Callable | None = None,
            keep_checkpoints: int = 2) -> list[dict]:
        """Train g and h on images of the source class and of the target class; returns the history
        (one row per epoch: the epoch's mean loss terms, lr, seconds). Every call starts from the maps
        built from `seed` (maps trained or loaded before are replaced), unless it resumes a checkpoint.

        out_dir: a checkpoint per epoch (maps, optimiser, scheduler, random state, history; written to a
        temporary file and renamed) and `history.json`; calling `fit` again with the same folder resumes
        from the last checkpoint, bit-identical to an uninterrupted run (each epoch's shuffle is keyed
        by (seed, epoch)); the settings and data must match (epochs may grow). callback(event, info):
        "batch" / "epoch" events; an exception there stops the run, which a later call resumes.
        """
        from tqdm.auto import tqdm

        from ..core import progress as _progress
        from ..training.loop import (_atomic_save, _atomic_text, _checkpoints, _key, _load_last_checkpoint, _rng_state,
                                     _seed_epoch, _set_rng_state)

        x1 = self._check_images(x_source, "x_source")
        x2 = self._check_images(x_target, "x_target")
        if x1.shape[1:] != x2.shape[1:]:
            raise InputError(f"x_source and x_target must have the same image shape, got {tuple(x1.shape[1:])} and "
                             f"{tuple(x2.shape[1:])}")
        if isinstance(keep_checkpoints, bool) or not isinstance(keep_checkpoints, int) or keep_checkpoints < 1:
            raise ConfigError(f"keep_checkpoints must be an integer >= 1, got {keep_checkpoints!r}")
        if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 0:
            raise ConfigError(f"epochs must be an integer >= 0, got {epochs!r}")
        c = self.config
        device = model_device(self.generator)
        x1, x2 = x1.to(device), x2.to(device)
        previous = (self.g, self.h)  # kept if the run is refused before it starts
        self.g = self.h = None  # a run starts from the maps built from `seed` (or the checkpoint it resumes)
        with torch.no_grad(), self._frozen():
            self._maps(self.encoder(x1[:1]))
            classes = self.classifier(x1[:1]).shape[-1]
        if max(self.source, self.target) >= classes:
            self.g, self.h = previous
            raise InputError(f"source {self.source} / target {self.target}: the classifier has {classes} outputs")
        params = list(self.g.parameters()) + list(self.h.parameters())
        optimizer = torch.optim.Adam(params, lr=c["lr"])
        scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=c["decay_step"], gamma=c["decay_gamma"])
        config = dict(c, data=[_fingerprint(x1), _fingerprint(x2)])
        run_dir = Path(out_dir) if out_dir is not None else None
        history: list[dict] = []
        start = 0
        outer_numpy, outer_python = np.random.get_state(), random.getstate()  # _seed_epoch seeds them too
        with _restore(outer_numpy, outer_python), torch.random.fork_rng(devices=[device.index or 0] if device.type == "cuda" else []):
            if run_dir is not None:
                try:
                    (run_dir / CHECKPOINTS).mkdir(parents=True, exist_ok=True)
                except OSError as exc:
                    self.g, self.h = previous
                    raise InputError(f"cannot create output folder '{run_dir}': {exc.strerror or exc}") from None
                if not resume:
                    for p in _checkpoints(run_dir):
                        p.unlink()
                _, blob = _load_last_checkpoint(run_dir)  # training.loop's: same folder and format
                if blob is not None:
                    saved = {k: v for k, v in blob["config"].items()}
                    diff = sorted(k for k in set(saved) | set(config) if saved.get(k) != config.get(k))
                    if diff:
                        self.g, self.h = previous
                        raise ConfigError(f"'{run_dir}' holds a C3LT run with other settings ({', '.join(diff)} "
                                          "differ); resume=False starts over, or use another folder")
                    if blob["epoch"] > epochs:
                        self.g, self.h = previous
                        raise ConfigError(f"'{run_dir}' already holds {blob['epoch']} epochs, more than the {epochs} "
                                          "asked for; use another folder or resume=False")
                    self.g.load_state_dict(blob["g"])
                    self.h.load_state_dict(blob["h"])
                    optimizer.load_state_dict(blob["optimizer"])
                    scheduler.load_state_dict(blob["scheduler"])
                    _set_rng_state(blob["rng"], device)
                    history, start = list(blob["history"]), int(blob["epoch"])
            n_batches = math.ceil(min(len(x1), len(x2)) / c["batch_size"])
            bar = tqdm(total=(epochs - start) * n_batches, desc="c3lt", unit="batch", delay=1.0, leave=False,
                       disable=None if (progress and _progress._enabled) else True, dynamic_ncols=True)
            self.g.train()
            self.h.train()
            try:
                with self._frozen() as features:
                    for epoch in range(start + 1, epochs + 1):
                        t0 = time.perf_counter()
                        _seed_epoch(c["seed"], epoch)
                        o1 = torch.randperm(len(x1), generator=torch.Generator().manual_seed(_key(c["seed"], epoch, "s")))
                        o2 = torch.randperm(len(x2), generator=torch.Generator().manual_seed(_key(c["seed"], epoch, "t")))
                        sums: dict[str, float] = {}
                        count = 0
                        for b, (i1, i2) in enumerate(zip(o1.split(c["batch_size"]), o2.split(c["batch_size"]))):
                            k = min(len(i1), len(i2))  # the authors' assert_batch_size_equal
                            terms = self.loss_terms(x1[i1[:k]], x2[i2[:k]], features)
                            if not bool(torch.isfinite(terms["loss"])):
                                raise InputError(f"epoch {epoch}, batch {b}: the C3LT loss is not finite")
                            optimizer.zero_grad(set_to_none=True)
                            terms["loss"].backward()
                            optimizer.step()
                            for name, v in terms.items():
                                sums[name] = sums.get(name, 0.0) + float(v.detach()) * k
                            count += k
                            bar.update(1)
                            bar.set_postfix_str(f"epoch {epoch}/{epochs} loss {float(terms['loss'].detach()):.3f}", refresh=False)
                            if callback is not None:
                                callback("batch", {"epoch": epoch, "batch": b, "loss": float(terms["loss"].detach())})
                        row = {"epoch": epoch, **{k: v / max(count, 1) for k, v in sums.items()},
                               "lr": optimizer.param_groups[0]["lr"]}
                        scheduler.step()
                        row["seconds"] = time.perf_counter() - t0
                        history.append(row)
                        if run_dir is not None:
                            path = run_dir / CHECKPOINTS / f"epoch_{epoch:04d}.pt"
                            _atomic_save({"format": FORMAT, "epoch": epoch, "g": self.g.state_dict(),
                                          "h": self.h.state_dict(), "optimizer": optimizer.state_dict(),
                                          "scheduler": scheduler.state_dict(), "rng": _rng_state(device),
                                          "history": history, "config": config}, path)
                            _atomic_text(json.dumps({"config": config, "history": history}, indent=1),
                                         run_dir / "history.json")
                            for old in _checkpoints(run_dir)[:-keep_checkpoints]:
                                old.unlink()
                        if callback is not None:
                            callback("epoch", dict(row))
            finally:
                bar.close()
                self.g.eval()
                self.h.eval()
        self.history = history
        return history

    # -- explaining --------------------------------------------------------------------------
    def explain(self, x: torch.Tensor, *, direction: str = "forward", batch_size: int = 256) -> Counterfactuals:
        """Counterfactuals of `x`: with g (source -> target, "forward") or h (target -> source, "backward")."""
        x = self._check_images(x, "x")
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ConfigError(f"batch_size must be an integer >= 1, got {batch_size!r}")
        if direction not in ("forward", "backward"):
            raise ConfigError(f"direction must be 'forward' (source -> target) or 'backward', got {direction!r}")
        if self.g is None:
            raise ConfigError("C3LT is not trained: call fit(...) or load(...) first")
        fn = self.g if direction == "forward" else self.h
        target = self.target if direction == "forward" else self.source
        source = self.source if direction == "forward" else self.target
        device = model_device(self.generator)
        fn.to(device)  # maps loaded from a file live on the CPU
        parts: dict[str, list] = {}
        with torch.no_grad(), self._frozen():
            for xb in x.split(batch_size):
                xb = xb.to(device)
                z = self.encoder(xb)
                path = latent_step(z, fn, self.config["n_steps"])
                imgs = [self.generator(p) for p in path]
                out = {"images": imgs[-1], "masks": change_mask(xb, imgs[-1], "abs"),
                       "probabilities": self.classifier(imgs[-1]).softmax(1),
                       "query_probabilities": self.classifier(xb).softmax(1), "reconstructions": imgs[0],
                       "latents": z, "latents_cf": path[-1], "path": torch.stack(imgs[1:], 1)}
                for k, v in out.items():
                    parts.setdefault(k, []).append(v.detach().cpu())
        cat = {k: torch.cat(v) for k, v in parts.items()}
        path = list(cat.pop("path").unbind(1))
        return Counterfactuals(**cat, source=source, target=target, path=path)

    # -- saving ------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        if self.g is None:
            raise ConfigError("C3LT is not trained: nothing to save")
        return {"format": FORMAT, "g": self.g.state_dict(), "h": self.h.state_dict(), "config": self.config,
                "history": self.history}

    def load_state_dict(self, blob: dict) -> "C3LT":
        if not isinstance(blob, dict) or "g" not in blob:
            raise InputError("not a C3LT state (expected the dict of C3LT.state_dict or a checkpoint)")
        saved = blob.get("config") or {}
        diff = [k for k in ("source", "target", "n_steps") if k in saved and saved[k] != self.config[k]]
        if diff:  # the maps would run under the wrong labels or step count
            raise ConfigError("the state was trained with other settings (" + ", ".join(
                f"{k} {saved[k]!r}, here {self.config[k]!r}" for k in diff) + "); build C3LT with those")
        w = blob["g"]["T1.0.weight"]
        self.g = LatentMap(w.shape[0], conv=w.dim() == 4)
        self.h = LatentMap(w.shape[0], conv=w.dim() == 4)
        self.g.load_state_dict(blob["g"])
        self.h.load_state_dict(blob["h"])
        self.g.eval()
        self.h.eval()
        self.history = list(blob.get("history", []))
        return self


@contextlib.contextmanager
def _restore(numpy_state, python_state):
    try:
        yield
    finally:
        np.random.set_state(numpy_state)
        random.setstate(python_state)


def _fingerprint(x: torch.Tensor) -> dict:
    import hashlib

    return {"n": int(x.shape[0]), "shape": list(x.shape[1:]),
            "sha1": hashlib.sha1(x.detach().cpu().contiguous().numpy().tobytes()).hexdigest()[:16]}


