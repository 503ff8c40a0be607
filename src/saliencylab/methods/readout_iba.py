"""Readout bottleneck (Schulz et al. 2020; BioroboticsLab/IBA IBA/pytorch_readout.py).

Instead of fitting alpha per image, a small network predicts it from the clean features at several
"readout" layers. As in the authors' code:
- readout features are normalised with their own statistics ((r - mean) / std; we floor std at
  `min_std` like the bottleneck's), fully connected outputs (B, D) are expanded over space, and every
  map is resized to the bottleneck's (h, w) bilinearly with align_corners=True, then concatenated;
- the network is three 1x1 convolutions (in -> in/2 -> 2C -> C, ReLU between), the last one
  initialised with bias 5 and weights x 1e-3 (alpha starts near the per-sample bottleneck's 5);
- training minimises CE(label) + beta * mean(C) (beta 10) with Adam on the readout network only, the
  model frozen, one noisy copy per image;
- alpha is clamped to [-5, 5] right after the last convolution, in training and at inference
  (`IBAReadout._generate_alpha`, `alpha = alpha.clamp(-self._alpha_bound, self._alpha_bound)` with
  `_alpha_bound = 5`, assigned since their commit 762d802 of 2020-05-31, their issue #19; before it
  the clamp's result was discarded). Where the network's output leaves [-5, 5] the clamp also stops
  its gradient, as in theirs. Per-sample IBA (`IBA/pytorch.py`) never clamps alpha, nor do we.

Our choices, documented: without labels in the data source, each training image is labelled with the
model's own prediction (the class a user would explain); the authors trained with lr 1e-5 for 10
ImageNet epochs, and for the small data sources this library is used with the default is lr 1e-3 for
10 epochs over `data`. The trained network is saved in the cache folder
(`readout/<hash of model, layers, data and settings>.pt`) and reused.

Inference is one clean forward pass per image: the capacity depends only on R and lambda, not on the
noise, so no noisy pass is needed. The readout map does not depend on `target` (the network sees
features, not a class); the target is still resolved and recorded.

`explain` returns extras "layer" (the bottleneck layer), "readout_layers" and "capacity" ((B, C, h, w)
nats); lowres is the (B, h, w) capacity map in bits. The trained network is kept in the cache folder
and, for a method built with `data=`, in an in-memory cache made at construction (keyed by layers and
image size); nothing else is stored on the instance during a call. With `data=None` the network is
trained on the explained batch (a rough stand-in, with a warning) and never reused.
"""

from __future__ import annotations

import hashlib
import math
import os

import torch
import torch.nn.functional as F
from torch import nn

from .. import features as _features
from ..core.progress import progress
from ..core.errors import ConfigError
from ..features import OUTPUT
from ..core.layers import to_grid
from ..core.explanation import Explanation
from ..core.targets import resolve_target
from .base import Param, register
from .iba import Adam, BottleneckHook, IBAMethod, capacity, capacity_map, is_nchw, smooth
from .iba.methods import _check_int, _check_number


ALPHA_BOUND = 5.0  # the authors' `_alpha_bound`: alpha is clamped to [-5, 5]


class ReadoutNet(nn.Module):
    """Three 1x1 convolutions from the stacked readout maps to alpha, clamped to [-ALPHA_BOUND,
    ALPHA_BOUND] (the authors' readout network and clamp, `IBAReadout._generate_alpha`)."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        mid = max(1, in_channels // 2)
        self.conv1 = nn.Conv2d(in_channels, mid, 1)
        self.conv2 = nn.Conv2d(mid, out_channels * 2, 1)
        self.conv3 = nn.Conv2d(out_channels * 2, out_channels, 1)
        with torch.no_grad():
            nn.init.constant_(self.conv3.bias, 5.0)
            self.conv3.weight.mul_(1e-3)

    def forward(self, readout: torch.Tensor) -> torch.Tensor:
        alpha = self.conv3(F.relu(self.conv2(F.relu(self.conv1(readout)))))
        return alpha.clamp(-ALPHA_BOUND, ALPHA_BOUND)  # keeps alpha (and lambda) in a useful range, as theirs


def readout_input(feats: dict, names, stats: dict, min_std: float, size, input_hw) -> torch.Tensor:
    """Normalised readout maps at the bottleneck's (h, w), stacked along channels."""
    maps = []
    for n in names:
        st = stats[n]
        r = (feats[n] - st.mean.to(feats[n])) / st.floored_std(min_std).to(feats[n])
        if r.dim() == 2:
            r = r[:, :, None, None].expand(-1, -1, *size)
        else:
            r = to_grid(r, tuple(input_hw))
        maps.append(F.interpolate(r, size=tuple(size), mode="bilinear", align_corners=True)
                    if tuple(r.shape[-2:]) != tuple(size) else r)
    return torch.cat(maps, dim=1)


def default_readout_layers(infos, layer: str, k: int = 3) -> list[str]:
    """The bottleneck layer, up to k evenly spaced later layers at its module depth with (C, h, w)
    outputs that run once, and the model's output (the authors read VGG16 features 10, 14, 18, 28 and
    the classifier for a bottleneck at features 10)."""
    names = [i.name for i in infos]
    depth = layer.count(".")
    start = names.index(layer) if layer in names else -1
    later = [i.name for i in infos[start + 1:] if i.nchw and i.calls == 1 and i.depth == depth]
    if len(later) > k:
        later = [later[round((len(later) - 1) * (j + 1) / k)] for j in range(k)]
    return [layer, *dict.fromkeys(later), OUTPUT]


@register
class ReadoutIBA(IBAMethod):
    name = "readout_iba"
    description = "Readout bottleneck (IBA): a network trained on data predicts the mask; one pass per image."

    readout_layers = Param(None, f"layers the readout network reads (None: the bottleneck layer, later ones, "
                                 f"'{OUTPUT}')")
    epochs = Param(10, "training epochs over data")
    lr = Param(1e-3, "learning rate of the readout network")
    batch_size = Param(32, "rows per pass, in training and at inference")

    def check(self) -> None:
        super().check()
        _check_int("epochs", self.epochs)
        _check_number("lr", self.lr, 0.0, strict=True)
        data, readout_layers = self.data, self.readout_layers
        if isinstance(data, _features.FeatureStats) or isinstance(data, dict):
            raise ConfigError("readout_iba trains its readout network on images: pass data= a folder, a tensor or "
                              "batches of images, not feature statistics")
        if _features.is_one_shot(data):
            raise ConfigError("readout_iba reads its data several times (statistics, then training epochs); pass a "
                              "tensor, a folder, a list of batches, a DataLoader or sample_crops(...), not a generator")
        if readout_layers is not None and (isinstance(readout_layers, str) or
                                           not all(isinstance(n, str) for n in readout_layers)):
            raise ConfigError(f"readout_layers must be a list of layer names (or '{OUTPUT}'), got {readout_layers!r}")
        self._net_memo: dict = {}  # trained networks for this method's data, by (layer, readout, size)

    def _train_source(self, x):
        if self.data is None:
            return [x]
        return _features.batches(self.data, size=tuple(x.shape[-2:]), model=self.model, batch_size=self.batch_size)

    def _net_path(self, session, x, layer, readout):
        if self.data is None or not self.cache:
            return None
        dkey = _features.data_key(self.data, size=tuple(x.shape[-2:]), model=session.model)
        if dkey is None:
            return None
        settings = (_features.model_fingerprint(session.model), layer, tuple(readout), dkey, self.beta, self.epochs,
                    self.lr, self.sigma, self.min_std, self.active_threshold, self.relu, self.seed, self.batch_size,
                    2)  # format 2: alpha clamped (networks trained unclamped are not reused)
        digest = hashlib.sha1(repr(settings).encode()).hexdigest()[:24]
        return _features.cache_dir() / "readout" / f"{digest}.pt"

    def compute(self, session, x, target) -> Explanation:
        names, infos = self._layers(session, x, probe=self.readout_layers is None)
        layer = names[0]
        readout = list(self.readout_layers) if self.readout_layers is not None else default_readout_layers(infos, layer)
        for n in readout:
            if n != OUTPUT:
                _features.module_for(session.model, n)  # unknown names fail with suggestions
        stat_names = list(dict.fromkeys([layer, *readout]))
        stats = self._stats(session, x, stat_names)
        shape = stats[layer].shape
        if not is_nchw(shape, x.shape[-2:]):
            raise ConfigError(f"readout_iba needs a bottleneck layer with a (C, h, w) output; '{layer}' gives {shape}")
        C, h, w = shape
        in_channels = sum(stats[n].shape[0] for n in readout)

        path = self._net_path(session, x, layer, readout)
        key = (layer, tuple(readout), tuple(x.shape[-2:]), x.dtype)
        net = self._net_memo.get(key) if self.data is not None else None
        if net is None:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(int(self.seed))
                net = ReadoutNet(in_channels, C).to(session.device, x.dtype)
            if path is not None and path.exists():
                net.load_state_dict(torch.load(path, map_location=session.device, weights_only=True))
            else:
                self._train(session, x, net, layer, readout, stats, (h, w))
                if path is not None:
                    path.parent.mkdir(parents=True, exist_ok=True)
                    tmp = path.with_suffix(f".tmp{os.getpid()}")  # concurrent trainers never share a file
                    torch.save(net.state_dict(), tmp)
                    tmp.replace(path)
            if self.data is not None:
                self._net_memo[key] = net

        mean = stats[layer].mean.to(x)
        std = stats[layer].floored_std(self.min_std).to(x)
        active = stats[layer].active(self.active_threshold).to(x)
        caps, outputs = [], []
        with torch.no_grad():
            for start in range(0, len(x), self.batch_size):
                chunk = x[start:start + self.batch_size]
                feats = _features.capture(session, chunk, [*stat_names, OUTPUT])
                alpha = net(readout_input(feats, readout, stats, self.min_std, (h, w), x.shape[-2:]))
                lam = smooth(torch.sigmoid(alpha), self.sigma)
                caps.append(capacity((feats[layer] - mean) / std, lam) * active)
                outputs.append(feats[OUTPUT])
        out = torch.cat(outputs)
        resolved = resolve_target(target, out)
        cap = torch.cat(caps)
        lowres = capacity_map(cap, x.shape[-2:])
        return Explanation(maps=lowres, targets=resolved.classes, outputs=out, lowres=lowres,
                           extras={"layer": layer, "readout_layers": readout, "capacity": cap})

    def _train(self, session, x, net, layer, readout, stats, size):
        st = stats[layer]
        hook = BottleneckHook(st.mean.to(x), st.floored_std(self.min_std).to(x),
                              st.active(self.active_threshold).to(x), relu=self.relu)
        params = list(net.parameters())
        optimizer = Adam(params, lr=self.lr)
        gen = torch.Generator(device=session.device).manual_seed(int(self.seed))
        capture_names = list(dict.fromkeys([layer, *readout, OUTPUT]))
        with session.scope():
            session.hook(_features.module_for(session.model, layer), hook, "forward")
            for _ in progress(range(self.epochs), desc=f"{self.name} training", total=self.epochs):
                seen = 0
                for batch in self._train_source(x):
                    batch = batch.to(session.device, x.dtype)
                    for start in range(0, len(batch), self.batch_size):
                        chunk = batch[start:start + self.batch_size]
                        with torch.no_grad():
                            feats = _features.capture(session, chunk, capture_names)
                        logits = feats[OUTPUT]
                        if logits.dim() != 2:
                            raise ConfigError("readout_iba trains on class outputs (B, K); the model returns "
                                              f"{tuple(logits.shape)}")
                        labels = logits.argmax(1)
                        alpha = net(readout_input(feats, readout, stats, self.min_std, size, x.shape[-2:]))
                        lam = smooth(torch.sigmoid(alpha), self.sigma)
                        noise = torch.randn(lam.shape, generator=gen, device=lam.device, dtype=lam.dtype)
                        hook.arm(lam, noise)
                        out = session.forward(chunk)
                        if hook.capacity is None:
                            raise ConfigError(f"layer '{layer}' did not run during the forward pass")
                        loss = F.cross_entropy(out, labels) + self.beta * hook.capacity.mean()
                        hook.disarm()
                        if not math.isfinite(float(loss.detach())):
                            raise ConfigError("readout training diverged (non-finite loss); lower lr")
                        grads = session.grad(loss.reshape(1), params, rows=len(chunk))
                        optimizer.step(grads)
                        seen += len(chunk)
                if seen == 0:
                    raise ConfigError("the data source yielded no images to train the readout network on")
