"""InputIBA (Zhang et al. 2021, "Fine-Grained Neural Network Explanation by Identifying Input Features with
Predictive Information"; CAMP-eXplain-AI/InputIBA).

Three stages, following the authors' code (configs/vgg_imagenet.py for the defaults):

1. Feature bottleneck: per-sample IBA at `layer` (beta 20, 10 steps, 10 copies). The authors' attributor
   sets the feature bottleneck's sigma to None before estimation, so this stage is unsmoothed by
   default (`feature_sigma=None`).
2. Generative stage: a Wasserstein GAN fits an input mask. The generator's parameters are an input mask
   (initialised from stage 1's capacity map: channel sum in bits, scaled, resized, as the authors) and a
   per-channel noise mean/scale; it produces features of sigmoid(mask) * x + (1 - sigmoid(mask)) *
   (scale * z + mean), z ~ N(0, 1), read at `layer`. "Real" features are
   feature_mask * R + (1 - feature_mask) * noise, with noise N(m_k, s_k^2), m_k ~ U(-2, 2), s_k ~ U(0, 5)
   fixed per sub-dataset of 20 items (200 items). The critic is the authors' (conv 4x4/2 -> 2C, 4x4/2 ->
   4C, 3x3 -> C with batch norm and LeakyReLU 0.2, then 512-256-1 linear), RMSprop lr 5e-5, weights
   clipped at 0.01; the generator uses RMSprop with lr 0.003 (mask), 0.1 (mean), 0.05 (scale) and
   steps every `critic_iter` (5) critic batches; 20 epochs of batches of 32.
   The authors pass the stage-1 capacity (nats) as `feature_mask` (with a TODO asking whether it should
   be sigmoid(alpha)); that is the default here, `feature_mask="lambda"` uses the bottleneck's lambda.
3. Input bottleneck: alpha of the input's shape (1 x C x H x W per image, init 5, smoothed, sigma 1),
   Z = lambda * x + (1 - lambda) * eps with eps ~ N(0, 1) in the model's normalised input space, and the
   capacity measured against the GAN mask m as prior:
   r = x (1 - m) / (1 - m lambda), var = (1 - lambda)^2 / (1 - m lambda)^2,
   C = -1/2 [1 + log var - (lambda r)^2 - var]; loss CE + beta mean(C), beta 20, 60 Adam steps (lr 1),
   10 copies. The map is sigmoid(alpha) averaged over channels (not a capacity), in [0, 1].

Batched over images: every stage keeps per-image parameters and optimiser state; the classifier passes
(noisy copies, generated batches of all images) share forward/backward passes of at most `batch_size`
rows. The generator only needs the features at `layer`, so its passes stop there (the authors run the
whole classifier). Critic gradients for the generator step are taken with respect to the generated
features first, then pushed through the classifier chunk by chunk, which bounds memory by
`batch_size`. Each image has its own critic (batch norm sees only that image's batch), initialised
from `seed`. Every random draw (the sub-datasets' noise parameters, the shuffles, the real features'
noise, the generator's z, the input bottleneck's noise) is keyed by (seed, purpose, image key, draw
index) through `session.random`, so results do not depend on the other images in the call, on
`batch_size` or on sharding. Where we differ from the authors: they draw from the global torch
generator for their single image.

`explain` returns extras "layer" (the feature layer), "result" (stage 1's BottleneckResult),
"feature_map" ((B, h, w) stage-1 capacity map in bits), "gan_mask" ((B, C, H, W) the generator's input
mask) and "mask" ((B, C, H, W) sigmoid(alpha) of stage 3); the map (and lowres) is "mask" averaged over
channels.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .. import features as _features
from ..core.progress import progress
from ..core.errors import ConfigError
from ..core.explanation import Explanation
from ..perturbation import auto_batch_size
from .base import Param, clean_outputs, register
from .iba import Adam, PerSampleIBA, RMSprop, capacity_map, model_loss_fn, optimize_bottleneck, smooth
from .iba.methods import _check_int, _check_number

FEATURE_MASKS = ("capacity", "lambda")


class Critic(nn.Module):
    """The authors' VisionDiscriminator for (C, h, w) feature maps."""

    def __init__(self, channels: int, size):
        super().__init__()
        C = channels
        self.main = nn.Sequential(
            nn.Conv2d(C, 2 * C, 4, 2, 1), nn.BatchNorm2d(2 * C), nn.LeakyReLU(0.2),
            nn.Conv2d(2 * C, 4 * C, 4, 2, 1), nn.BatchNorm2d(4 * C), nn.LeakyReLU(0.2),
            nn.Conv2d(4 * C, C, 3, 1, 1), nn.BatchNorm2d(C), nn.LeakyReLU(0.2))
        h, w = (int(s) for s in size)
        for _ in range(2):
            h, w = (h - 2) // 2 + 1, (w - 2) // 2 + 1
        if h < 1 or w < 1:
            raise ConfigError(f"input_iba's critic needs feature maps of at least 2x2, got {tuple(size)}")
        self.out = nn.Sequential(nn.Linear(C * h * w, 512), nn.LeakyReLU(0.2), nn.Linear(512, 256),
                                 nn.LeakyReLU(0.2), nn.Linear(256, 1))

    def forward(self, f: torch.Tensor) -> torch.Tensor:
        return self.out(self.main(f).flatten(1))


class GroupedCritics:
    """B independent copies of `Critic` evaluated as one network: grouped convolutions (one group per
    image), batch norm per channel (so each image's statistics are its own batch's, as with separate
    critics in training mode) and batched linear layers. Every copy starts from the same `Critic`
    initialisation; parameters are stacked, so element-wise optimisers and weight clipping act on each
    copy exactly as on separate critics."""

    def __init__(self, reference: Critic, copies: int):
        B = copies
        convs = [m for m in reference.main if isinstance(m, nn.Conv2d)]
        bns = [m for m in reference.main if isinstance(m, nn.BatchNorm2d)]
        lins = [m for m in reference.out if isinstance(m, nn.Linear)]
        self.B, self.C = B, convs[0].in_channels
        self.eps = bns[0].eps
        self.conv_spec = [(c.stride, c.padding) for c in convs]
        p = []
        for c, bn in zip(convs, bns):
            p += [c.weight.detach().repeat(B, 1, 1, 1), c.bias.detach().repeat(B),
                  bn.weight.detach().repeat(B), bn.bias.detach().repeat(B)]
        for lin in lins:
            p += [lin.weight.detach().t().expand(B, -1, -1), lin.bias.detach().view(1, 1, -1).expand(B, 1, -1)]
        self.params = [t.clone().requires_grad_(True) for t in p]

    def __call__(self, f: torch.Tensor) -> torch.Tensor:
        """f: (B, n, C, h, w) features, image-major -> (B, n) critic values."""
        B, n = f.shape[:2]
        h = f.transpose(0, 1).reshape(n, B * self.C, *f.shape[-2:])
        for k, (stride, padding) in enumerate(self.conv_spec):
            w, b, g, beta = self.params[4 * k:4 * k + 4]
            h = F.conv2d(h, w, b, stride=stride, padding=padding, groups=B)
            h = F.leaky_relu(F.batch_norm(h, None, None, g, beta, training=True, eps=self.eps), 0.2)
        h = h.reshape(n, B, -1).transpose(0, 1)  # (B, n, features)
        lin = self.params[12:]
        for k in range(0, len(lin), 2):
            h = torch.baddbmm(lin[k + 1], h, lin[k])
            if k + 2 < len(lin):
                h = F.leaky_relu(h, 0.2)
        return h[..., 0]


def input_capacity(x, m, lam, mean: float = 0.0, std: float = 1.0) -> torch.Tensor:
    """InputIBA's KL against the GAN-mask prior (base_input_iba.kl_div), per element, in nats."""
    denom = 1 - m * lam
    r = (x - mean + m * (mean - x)) / (denom * std)
    var = (1 - lam) ** 2 / denom**2
    log_var = torch.log(var.clamp_min(torch.finfo(var.dtype).tiny))
    return -0.5 * (1 + log_var - (r * lam) ** 2 - var)


def _generated_features(session, x, image, z, params, layer, batch_size, grad: bool):
    """Features at `layer` of the generator's masked inputs for rows (image, z), in chunks."""
    mask_param, gmean, gscale = params
    out = []
    for start in range(0, len(image), batch_size):
        img = image[start:start + batch_size]
        s = torch.sigmoid(mask_param[img])
        inp = s * x[img] + (1 - s) * (gscale[img] * z[start:start + batch_size] + gmean[img])
        out.append(_features.capture(session, inp, [layer], grad=grad)[layer])
    return out


def train_gan(session, x, layer, R, feature_mask, init_map, *, epochs, size, subset, batch, lr, clip,
              critic_iter, seed, batch_size, desc="input_iba gan"):
    """Stage 2: the generator's input mask sigmoid(param), (B, C_in, H, W)."""
    B, Cin, H, W = x.shape
    C, h, w = R.shape[1:]
    dev, dt = x.device, x.dtype
    mask_param = init_map[:, None].expand(B, Cin, H, W).clone().requires_grad_(True)
    gmean = torch.zeros((B, Cin, 1, 1), device=dev, dtype=dt, requires_grad=True)
    gscale = torch.ones((B, Cin, 1, 1), device=dev, dtype=dt, requires_grad=True)
    gparams = [mask_param, gmean, gscale]
    g_opt = RMSprop(gparams, [0.003, 0.1, 0.05])
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(seed))
        reference = Critic(C, (h, w)).to(dev, dt)
    critics = GroupedCritics(reference, B)
    c_opt = RMSprop(critics.params, lr)
    images = torch.arange(B)
    n_sub = max(1, size // subset)
    # each image's sub-datasets: std ~ U(0, 5), mean ~ U(-2, 2), fixed for the whole training
    subsets = session.random(seed, "input_iba gan subsets").uniform(images, torch.zeros(B, dtype=torch.long),
                                                                   (2, n_sub), device=dev, dtype=dt)
    sub_std, sub_mean = subsets[:, 0] * 5, subsets[:, 1] * 4 - 2
    shuffle = session.random(seed, "input_iba gan shuffle")
    real_noise = session.random(seed, "input_iba gan real noise")
    fake_z = session.random(seed, "input_iba gan z")
    n_batches = math.ceil(size / batch)
    for epoch in progress(range(epochs), desc=desc, total=epochs):
        perms = [shuffle.permutation(b, epoch, size, device=dev) for b in range(B)]
        for i in range(n_batches):
            idx = torch.stack([p[i * batch:(i + 1) * batch] for p in perms])  # (B, nb)
            nb = idx.shape[1]
            draw = torch.full((B,), epoch * n_batches + i, dtype=torch.long)
            sub = (idx // subset).clamp_max(n_sub - 1)
            noise = real_noise.normal(images, draw, (nb, C, h, w), device=dev, dtype=dt)
            noise = (noise * sub_std.gather(1, sub)[..., None, None, None]
                     + sub_mean.gather(1, sub)[..., None, None, None])
            real = feature_mask[:, None] * R[:, None] + (1 - feature_mask[:, None]) * noise  # (B, nb, C, h, w)
            z = fake_z.normal(images, draw, (nb, Cin, H, W), device=dev, dtype=dt).flatten(0, 1)
            image = torch.arange(B, device=dev).repeat_interleave(nb)
            with torch.no_grad():
                fake = torch.cat(_generated_features(session, x, image, z, gparams, layer, batch_size, False))
            fake = fake.view(B, nb, C, h, w)
            # critic step: the sum over images of each critic's loss, -mean D(real) + mean D(fake)
            loss_c = (-critics(real).mean(1) + critics(fake).mean(1)).sum()
            c_opt.step(torch.autograd.grad(loss_c, critics.params))
            with torch.no_grad():
                for p in critics.params:
                    p.clamp_(-clip, clip)
            if i % critic_iter == 0:  # generator step: d(-critic)/d features, then through the classifier
                f = fake.detach().requires_grad_(True)
                feat_grads = torch.autograd.grad(-critics(f).mean(1).sum(), f)[0].flatten(0, 1)
                grads = [torch.zeros_like(p) for p in gparams]
                for start in range(0, len(image), batch_size):
                    sl = slice(start, start + batch_size)
                    (feats,) = _generated_features(session, x, image[sl], z[sl], gparams, layer, batch_size, True)
                    score = (feats * feat_grads[sl]).flatten(1).sum(1)
                    for acc, g in zip(grads, session.grad(score, gparams)):
                        acc += g
                g_opt.step(grads)
    return torch.sigmoid(mask_param.detach())


def input_bottleneck(session, x, gen_mask, model_loss, *, steps, samples, lr, beta, sigma, initial_alpha,
                     batch_size, seed, desc="input_iba input"):
    """Stage 3: per-image alpha at the input; returns sigmoid(alpha) (B, C, H, W)."""
    B = x.shape[0]
    dev, dt = x.device, x.dtype
    alpha = torch.full(x.shape, float(initial_alpha), device=dev, dtype=dt, requires_grad=True)
    optimizer = Adam([alpha], lr=lr)
    rng = session.random(seed, "input_iba input")
    total = B * samples
    for step in progress(range(steps), desc=desc, total=steps):
        grad = torch.zeros_like(alpha)
        for start in range(0, total, batch_size):
            rows = torch.arange(start, min(start + batch_size, total), device=dev)
            image, sample = rows // samples, rows % samples
            uimg, local = torch.unique_consecutive(image, return_inverse=True)
            lam = smooth(torch.sigmoid(alpha[uimg]), sigma)[local]
            xr = x[image]
            noise = rng.normal(image, step * samples + sample, x.shape[1:], device=dev, dtype=dt)
            z = lam * xr + (1 - lam) * noise
            cap = input_capacity(xr, gen_mask[image], lam)
            out = session.forward(z)
            per_row = (model_loss(out, image) + beta * cap.flatten(1).mean(1)) / samples
            grad += session.grad(per_row, alpha, rows=len(rows))
        optimizer.step([grad])
    return torch.sigmoid(alpha.detach())


@register
class InputIBA(PerSampleIBA):
    """InputIBA; see the module docstring. Shares iba's parameters; beta (20), steps (60, the input
    bottleneck's) and batch_size (32) differ, the rest is its own."""

    name = "input_iba"
    description = "InputIBA: feature bottleneck, a GAN-fitted input mask as prior, then a bottleneck at the input."
    beta = Param(20.0, "weight of the capacity term (feature and input bottlenecks)")
    steps = Param(60, "steps of the input bottleneck")
    batch_size = Param(32, "rows per forward/backward pass (None: chosen for the device); results do not depend on it")
    feature_steps = Param(10, "steps of the feature bottleneck (stage 1)")
    feature_sigma = Param(None, "smoothing of the feature bottleneck's lambda (None: none, as the authors)")
    feature_mask = Param("capacity", "what masks the real features of the GAN: 'capacity' (authors) or 'lambda'")
    gan_epochs = Param(20, "GAN training epochs (0: the input mask is stage 1's map)")
    gan_size = Param(200, "items per GAN epoch")
    gan_subset = Param(20, "items per sub-dataset (one noise distribution each)")
    gan_batch = Param(32, "GAN batch size")
    gan_lr = Param(5e-5, "critic learning rate (RMSprop)")
    gan_clip = Param(0.01, "critic weight clipping")
    critic_iter = Param(5, "critic batches per generator step")

    def check(self) -> None:
        super().check()
        for name in ("feature_steps", "gan_size", "gan_subset", "gan_batch", "critic_iter"):
            _check_int(name, getattr(self, name))
        _check_int("gan_epochs", self.gan_epochs, 0)
        _check_number("gan_lr", self.gan_lr, 0.0, strict=True)
        _check_number("gan_clip", self.gan_clip, 0.0, strict=True)
        if self.feature_sigma is not None:
            _check_number("feature_sigma", self.feature_sigma, 0.0)
        if self.feature_mask not in FEATURE_MASKS:
            raise ConfigError(f"unknown feature_mask '{self.feature_mask}'; choose one of {', '.join(FEATURE_MASKS)}")
        if isinstance(self.layer, (list, tuple)) or (isinstance(self.layer, str) and "," in self.layer):
            raise ConfigError("input_iba takes one feature layer")

    def compute(self, session, x, target) -> Explanation:
        batch_size = self.batch_size
        if batch_size is None:  # a pass size only: every stage sums its chunks' gradients
            batch_size = auto_batch_size(session.device, backward=True, pixels=x.shape[-2] * x.shape[-1])
        (layer,), _ = self._layers(session, x)
        stats = self._stats(session, x, [layer])[layer]
        resolved, outputs = clean_outputs(session, x, target)
        loss = model_loss_fn(target, resolved, outputs)
        hw = x.shape[-2:]
        feat = optimize_bottleneck(session, x, layer, stats, loss, **self._bottleneck_params(
            steps=self.feature_steps, sigma=self.feature_sigma), purpose="input_iba feature",
            desc=f"{self.name} feature")
        if len(stats.shape) != 3:
            raise ConfigError(f"input_iba needs a feature layer with a (C, h, w) output; '{layer}' gives {stats.shape}")
        with torch.no_grad():
            R = torch.cat([_features.capture(session, x[s:s + batch_size], [layer])[layer]
                           for s in range(0, len(x), batch_size)])
        fmask = feat.capacity if self.feature_mask == "capacity" else feat.lam
        feature_map = capacity_map(feat.capacity, hw)
        init = F.interpolate(feature_map[:, None], size=tuple(hw), mode="bilinear", align_corners=False)[:, 0]
        gen_mask = train_gan(session, x, layer, R, fmask, init, epochs=self.gan_epochs, size=self.gan_size,
                             subset=self.gan_subset, batch=self.gan_batch, lr=self.gan_lr, clip=self.gan_clip,
                             critic_iter=self.critic_iter, seed=self.seed, batch_size=batch_size)
        mask = input_bottleneck(session, x, gen_mask, loss, steps=self.steps, samples=self.samples, lr=self.lr,
                                beta=self.beta, sigma=self.sigma, initial_alpha=self.initial_alpha,
                                batch_size=batch_size, seed=self.seed)
        lowres = mask.mean(1)
        return Explanation(maps=lowres, targets=resolved.classes, outputs=outputs, lowres=lowres,
                           extras={"layer": layer, "result": feat, "feature_map": feature_map, "gan_mask": gen_mask,
                                   "mask": mask})
