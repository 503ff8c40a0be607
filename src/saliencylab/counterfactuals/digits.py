"""The shipped counterfactual domain: scikit-learn's digits (8x8, 1797 images) upsampled to 32 px, with a
generator (latent -> image), an encoder (image -> latent), a discriminator and a classifier, all trained
here once, deterministically, on one CPU thread.

`digits_domain(seed=0)` returns a `DigitsDomain`: the four networks (eval mode) and the images split
into a training part and a held-out part (a seeded permutation; `held_out` of them, default 30%).
Images are in [-1, 1] (the authors' MNIST transform `Normalize((0.5,), (0.5,))` and their DCGAN's
Tanh output), one channel, 32 x 32.

How the networks are trained (the authors use a pretrained DCGAN (pytorch/examples) plus an encoder
trained to invert it, `models/gans/dcgan.py`, `models/encoders/encoder_dcgan.py`; we have no MNIST and
about a minute of one CPU thread (measured: 60 s of CPU time, 196-280 s wall on a busy machine), so we train an
autoencoder and then fine-tune it adversarially):
1. classifier: a small CNN in the layout of the authors' `MnistNet` (`models/classifiers/mnist.py`:
   layer1 = conv 5x5 / ReLU / max-pool, layer2 = the same, then two linear layers), cross-entropy,
   Adam; it returns logits (theirs returns log-probabilities; C3LT's NLL loss on log-probabilities is
   our cross-entropy on logits, since log_softmax is idempotent).
2. encoder + generator as an autoencoder: DCGAN-shaped (strided convolutions, LeakyReLU in the
   encoder; transposed convolutions, ReLU, Tanh in the generator; no BatchNorm, so that training and
   evaluation compute the same function), latent (B, latent_dim, 1, 1) as the authors' encoder
   output, L1 reconstruction loss plus a small penalty on the latent's mean square (keeps the codes
   near the unit ball, where a norm-preserving walk stays meaningful).
3. adversarial fine-tuning: a DCGAN discriminator (sigmoid output, BCE, as the authors') learns real
   images against reconstructions, while the encoder and generator keep the reconstruction loss plus
   `adv_weight` x the generator's BCE. The discriminator is the one C3LT's adversarial term uses.

Cached like `envs.trained`: in-process by (seed, settings) and on disk under $SALIENCYLAB_CACHE
(`counterfactuals/digits-seed{seed}-{RECIPE}-{digest}.pt`), loaded with `torch.load(weights_only=True)`;
bump RECIPE when the architecture or the training changes. `digits_domain(seed, **settings)` accepts
smaller settings (tests use a tiny recipe; its networks are poor).
"""

from __future__ import annotations

import functools
import hashlib
import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ..core.threads import threads
from ..envs.trained import _load_disk, _save_disk, cache_dir

__all__ = ["DigitsDomain", "digits_domain", "load_digits_images", "DigitsClassifier", "DigitsGenerator",
           "DigitsEncoder", "DigitsDiscriminator", "RECIPE", "DEFAULTS", "clear_cache"]

RECIPE = "v1"
DEFAULTS = dict(latent_dim=32, width=32, held_out=0.3, batch_size=64, classifier_epochs=12, classifier_lr=1e-3,
                ae_epochs=25, ae_lr=2e-3, latent_penalty=1e-3, adv_epochs=8, adv_lr=2e-4, adv_weight=0.01,
                train_limit=None)
IMAGE_SIZE = 32
PERCEPTUAL_LAYERS = ("layer1.1", "layer2.1")  # the ReLU outputs of layer1 / layer2, as the authors' MNISTFeatureExtractor

_CACHE: dict[tuple, dict] = {}


def clear_cache() -> None:
    """Forget the in-process cache (the disk cache stays)."""
    _CACHE.clear()


# -- networks ------------------------------------------------------------------------------------
class DigitsClassifier(nn.Module):
    """MnistNet's layout (conv 5x5, ReLU, max-pool; twice; linear, ReLU, linear) at 32 px; logits out."""

    def __init__(self, width: int = 32, num_classes: int = 10):
        super().__init__()
        self.layer1 = nn.Sequential(nn.Conv2d(1, width // 2, 5, padding=2), nn.ReLU(), nn.MaxPool2d(2))
        self.layer2 = nn.Sequential(nn.Conv2d(width // 2, width, 5, padding=2), nn.ReLU(), nn.MaxPool2d(2))
        self.classifier = nn.Sequential(nn.Linear(width * 8 * 8, 128), nn.ReLU(), nn.Linear(128, num_classes))

    def forward(self, x):
        return self.classifier(self.layer2(self.layer1(x)).flatten(1))


class DigitsEncoder(nn.Module):
    """Image (B, 1, 32, 32) -> latent (B, latent_dim, 1, 1): strided 4x4 convolutions, LeakyReLU 0.2."""

    def __init__(self, latent_dim: int = 32, width: int = 32):
        super().__init__()
        self.main = nn.Sequential(
            nn.Conv2d(1, width, 4, 2, 1), nn.LeakyReLU(0.2),                   # 16
            nn.Conv2d(width, 2 * width, 4, 2, 1), nn.LeakyReLU(0.2),           # 8
            nn.Conv2d(2 * width, 4 * width, 4, 2, 1), nn.LeakyReLU(0.2),       # 4
            nn.Conv2d(4 * width, latent_dim, 4, 1, 0))                          # 1

    def forward(self, x):
        return self.main(x)


class DigitsGenerator(nn.Module):
    """Latent (B, latent_dim, 1, 1) -> image (B, 1, 32, 32) in [-1, 1]: transposed convolutions, ReLU, Tanh."""

    def __init__(self, latent_dim: int = 32, width: int = 32):
        super().__init__()
        self.main = nn.Sequential(
            nn.ConvTranspose2d(latent_dim, 4 * width, 4, 1, 0), nn.ReLU(),     # 4
            nn.ConvTranspose2d(4 * width, 2 * width, 4, 2, 1), nn.ReLU(),      # 8
            nn.ConvTranspose2d(2 * width, width, 4, 2, 1), nn.ReLU(),          # 16
            nn.ConvTranspose2d(width, 1, 4, 2, 1), nn.Tanh())                  # 32

    def forward(self, z):
        if z.dim() == 2:
            z = z[:, :, None, None]
        return self.main(z)


class DigitsDiscriminator(nn.Module):
    """Image -> probability of being real, (B,): the authors' DCGAN discriminator layout (sigmoid output)."""

    def __init__(self, width: int = 32):
        super().__init__()
        self.main = nn.Sequential(
            nn.Conv2d(1, width, 4, 2, 1), nn.LeakyReLU(0.2),
            nn.Conv2d(width, 2 * width, 4, 2, 1), nn.LeakyReLU(0.2),
            nn.Conv2d(2 * width, 4 * width, 4, 2, 1), nn.LeakyReLU(0.2),
            nn.Conv2d(4 * width, 1, 4, 1, 0), nn.Sigmoid())

    def forward(self, x):
        return self.main(x).flatten()


# -- data ----------------------------------------------------------------------------------------
def load_digits_images(size: int = IMAGE_SIZE) -> tuple[torch.Tensor, torch.Tensor]:
    """All 1797 digits as (N, 1, size, size) floats in [-1, 1] (bilinear upsampling of the 8x8 images,
    whose values are 0..16) and their labels (N,)."""
    x, y = _load_digits(size)
    return x.clone(), y.clone()


@functools.lru_cache(maxsize=2)
def _load_digits(size: int) -> tuple[torch.Tensor, torch.Tensor]:
    images, labels = _digits_arrays()
    x = torch.as_tensor(images, dtype=torch.float32).reshape(-1, 1, 8, 8) / 16.0
    x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False).clamp(0, 1)
    return x * 2 - 1, torch.as_tensor(labels, dtype=torch.long)


def _digits_arrays():
    """scikit-learn's digits.csv.gz read directly (importing sklearn takes seconds); load_digits otherwise."""
    import importlib.util

    import numpy as np

    spec = importlib.util.find_spec("sklearn")  # locates the package without importing it
    if spec is not None and spec.submodule_search_locations:
        path = Path(list(spec.submodule_search_locations)[0]) / "datasets" / "data" / "digits.csv.gz"
        if path.is_file():
            data = np.loadtxt(path, delimiter=",")
            return data[:, :-1], data[:, -1].astype(np.int64)
    from sklearn.datasets import load_digits

    d = load_digits()
    return d.data, d.target


def _split(n: int, held_out: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    order = torch.randperm(n, generator=torch.Generator().manual_seed(10_007 + seed))
    k = int(round(n * held_out))
    return order[k:].sort().values, order[:k].sort().values


@dataclass
class DigitsDomain:
    """The trained networks (eval mode) and the data; images in [-1, 1], (N, 1, 32, 32)."""

    generator: nn.Module
    encoder: nn.Module
    discriminator: nn.Module
    classifier: nn.Module
    train_images: torch.Tensor
    train_labels: torch.Tensor
    test_images: torch.Tensor
    test_labels: torch.Tensor
    seed: int = 0
    settings: dict = field(default_factory=dict)
    info: dict = field(default_factory=dict)      # accuracy, reconstruction error, seconds
    perceptual_layers: tuple = PERCEPTUAL_LAYERS

    def images(self, digit: int, split: str = "test") -> torch.Tensor:
        """The images of one digit from "train" or "test" (held out)."""
        if split not in ("train", "test"):
            from ..core.errors import ConfigError

            raise ConfigError(f"split must be 'train' or 'test', got {split!r}")
        x, y = (self.train_images, self.train_labels) if split == "train" else (self.test_images, self.test_labels)
        return x[y == int(digit)]


# -- training ------------------------------------------------------------------------------------
def _settings(overrides: dict) -> dict:
    unknown = set(overrides) - set(DEFAULTS)
    if unknown:
        from ..core.errors import ConfigError

        raise ConfigError(f"unknown digits-domain setting(s): {', '.join(sorted(unknown))}; "
                          f"known: {', '.join(DEFAULTS)}")
    return {**DEFAULTS, **overrides}


def _digest(settings: dict) -> str:
    kept = {k: v for k, v in settings.items() if v is not None}  # an unset option does not change the key
    return hashlib.sha1(json.dumps(kept, sort_keys=True).encode()).hexdigest()[:10]


def _build(s: dict, seed: int) -> dict[str, nn.Module]:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return {"classifier": DigitsClassifier(s["width"]), "encoder": DigitsEncoder(s["latent_dim"], s["width"]),
                "generator": DigitsGenerator(s["latent_dim"], s["width"]),
                "discriminator": DigitsDiscriminator(s["width"])}


def _batches(n: int, batch_size: int, seed: int, phase: str, epoch: int):
    from ..training.loop import _key

    return torch.randperm(n, generator=torch.Generator().manual_seed(_key(seed, phase, epoch))).split(batch_size)


def train_domain(seed: int = 0, **overrides) -> dict:
    """Train the four networks; returns {"state_dicts", "info"} (see the module docstring)."""
    s = _settings(overrides)
    x_all, y_all = load_digits_images()
    train_idx, test_idx = _split(len(y_all), s["held_out"], seed)
    x, y = x_all[train_idx], y_all[train_idx]
    if s["train_limit"] is not None:  # tiny recipes (tests): the first images of the training part
        x, y = x[: s["train_limit"]], y[: s["train_limit"]]
    nets = _build(s, seed)
    clf, enc, gen, disc = nets["classifier"], nets["encoder"], nets["generator"], nets["discriminator"]
    start = time.perf_counter()
    bs = s["batch_size"]
    with threads(1), torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        opt = torch.optim.Adam(clf.parameters(), lr=s["classifier_lr"])
        for epoch in range(s["classifier_epochs"]):
            for idx in _batches(len(y), bs, seed, "classifier", epoch):
                loss = F.cross_entropy(clf(x[idx]), y[idx])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
        ae_params = list(enc.parameters()) + list(gen.parameters())
        opt = torch.optim.Adam(ae_params, lr=s["ae_lr"], betas=(0.5, 0.999))
        for epoch in range(s["ae_epochs"]):
            for idx in _batches(len(y), bs, seed, "ae", epoch):
                z = enc(x[idx])
                loss = F.l1_loss(gen(z), x[idx]) + s["latent_penalty"] * z.pow(2).mean()
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
        # adversarial fine-tuning (DCGAN's alternating updates, reals against reconstructions)
        opt_g = torch.optim.Adam(ae_params, lr=s["adv_lr"], betas=(0.5, 0.999))
        opt_d = torch.optim.Adam(disc.parameters(), lr=s["adv_lr"], betas=(0.5, 0.999))
        for epoch in range(s["adv_epochs"]):
            for idx in _batches(len(y), bs, seed, "adv", epoch):
                real = x[idx]
                z = enc(real)
                fake = gen(z)
                d_real, d_fake = disc(real), disc(fake.detach())
                loss_d = F.binary_cross_entropy(d_real, torch.ones_like(d_real)) + \
                    F.binary_cross_entropy(d_fake, torch.zeros_like(d_fake))
                opt_d.zero_grad(set_to_none=True)
                loss_d.backward()
                opt_d.step()
                d_gen = disc(fake)
                loss_g = F.l1_loss(fake, real) + s["latent_penalty"] * z.pow(2).mean() + \
                    s["adv_weight"] * F.binary_cross_entropy(d_gen, torch.ones_like(d_gen))
                opt_g.zero_grad(set_to_none=True)
                loss_g.backward()
                opt_g.step()
        seconds = time.perf_counter() - start
        for m in nets.values():
            m.eval()
        with torch.no_grad():
            xt, yt = x_all[test_idx], y_all[test_idx]
            zt = enc(xt)
            recon = gen(zt)
            info = {"accuracy": float((clf(xt).argmax(1) == yt).double().mean()),
                    "reconstruction_accuracy": float((clf(recon).argmax(1) == yt).double().mean()),
                    "reconstruction_l1": float((recon - xt).abs().mean()),
                    "latent_norm": float(zt.flatten(1).norm(dim=1).mean()),
                    "discriminator_real": float(disc(xt).mean()), "discriminator_recon": float(disc(recon).mean()),
                    "seconds": seconds, "n_train": len(train_idx), "n_test": len(test_idx)}
    state = {k: {n: v.detach().clone() for n, v in m.state_dict().items()} for k, m in nets.items()}
    return {"state_dicts": state, "info": info}


def digits_domain(seed: int = 0, **overrides) -> DigitsDomain:
    """The shipped domain for `seed` (trained once, then cached in-process and on disk).

    overrides: any of DEFAULTS (e.g. tiny epochs in tests); they change the cache key."""
    s = _settings(overrides)
    key = (seed, _digest(s))
    record = _CACHE.get(key)
    folder = cache_dir()
    path = folder / "counterfactuals" / f"digits-seed{seed}-{RECIPE}-{key[1]}.pt" if folder is not None else None
    if record is None and path is not None:
        record = _load_disk(path)
    if record is None:
        record = train_domain(seed, **overrides)
        if path is not None:
            _save_disk(path, {"state_dict": record["state_dicts"], "accuracy": record["info"]["accuracy"],
                              "info": record["info"]})
    else:
        if "state_dicts" not in record:  # the disk layout (envs.trained's loader wants "state_dict")
            record = {"state_dicts": record["state_dict"], "info": record["info"]}
    _CACHE[key] = record
    nets = _build(s, seed)
    for name, m in nets.items():
        m.load_state_dict(record["state_dicts"][name])
        m.eval()
    x_all, y_all = load_digits_images()
    train_idx, test_idx = _split(len(y_all), s["held_out"], seed)
    return DigitsDomain(nets["generator"], nets["encoder"], nets["discriminator"], nets["classifier"],
                        x_all[train_idx], y_all[train_idx], x_all[test_idx], y_all[test_idx], seed=seed,
                        settings=s, info=dict(record["info"]))
