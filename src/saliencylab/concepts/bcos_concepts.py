"""Concept contributions and concept traces on B-cos networks (FaCT).

Parchami-Araghi, Rao, Fischer, Schiele, "FaCT: Faithful Concept Traces for Explaining Neural Network
Decisions" (NeurIPS 2025), m-parchami/FaCT (Apache-2.0; adapted with attribution). A bias-free top-k
SAE (`saliencylab.concepts.sae.TopKSAE`) is spliced in at a layer of a B-cos network: the layer's
output h (every spatial position a row) is replaced by its reconstruction D f, f = TopK(ReLU(E h)).
In explanation mode (every B-cos layer's dynamic scale detached) the network above the layer is a
*dynamic linear* map, so

- concept contribution (`concept_contributions`): c_j = sum over positions of (d logit / d f_j) x f_j,
  and sum_j c_j = logit - bias exactly, because D has no bias (FaCT `fact/utils/utils.py`,
  `features_and_weights_sae`: `p_contribs = (sae_acts.grad * sae_acts)` summed over positions, the
  logit minus `logit_layer.logit_bias`, checked there with `torch.allclose(..., 1e-2)`);
- concept presence (activation): a_j = sum over positions of f_j (`p_presence`); the top-activating
  images of a concept are the images with the largest a_j (`plot_inference.explain_concepts`:
  `all_p_presence.topk(k=16, dim=0)`);
- concept trace (`concept_traces`): the B-cos explanation of a_j, i.e. the dynamic linear map from the
  encoded input to a_j: W_j(x) = d a_j / d x (explanation mode), the map W_j(x) * x summed over the
  encoded channels; it sums to a_j exactly, since the network below the layer is dynamic linear and
  ReLU / top-k only select (`plot_inference.explain_images`: `act_to_explain = all_presence[...]`,
  backward to the image, then `gradient_to_image(image, grad, smooth=3)` for the colour picture).

Features for training the SAE (`collect_features`, FaCT `load_good_features`): per image, up to
`72 * 512 / C` positions of the layer's (B, C, H, W) output, sampled without replacement with
probability proportional to |the position's contribution to the predicted logit| (explanation mode);
on small maps (H W <= that number) every position is taken, as here for the small B-cos CNN.

The layer output h = D f + e. `splice="replace"` (FaCT, the default): the network runs on D f, its
logits change (the spliced model's accuracy is reported), the error e is dropped, and the
contributions sum to the spliced logit minus the bias. `splice="residual"` (ours): the network runs on
D f + e (e constant), the logits are the original model's, and the error's contribution e . d logit / d e
is reported separately (`error`): contributions + error = original logit - bias.

The bias is the target logit with the layer's output set to zero (`bias`): for a B-cos network
(no biases) only the constant logit bias is left (BcosCNN: -log(K - 1)), FaCT subtracts
`model.logit_layer.logit_bias` by name.

Deliberate differences (see docs/differences.md): batched traces (the images are repeated once per
traced concept, one forward and one backward; FaCT backpropagates one concept at a time over a
batch); explanation mode through `ModelSession` edits (the user's model is unchanged afterwards; FaCT
uses `model.explanation_mode()` and a hook left on the model); the target defaults to the predicted
class of the explained network (as FaCT: `force_label=False`); the `residual` splice and the bias by
zeroing the layer are ours; positions are sampled with keyed Gumbel top-k (the same distribution as
`torch.multinomial` without replacement, independent of batching).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..core.errors import ConfigError, InputError
from ..core.layers import get_layer
from ..core.session import ModelSession
from ..core.targets import resolve_target, slice_target
from ..models.bcos import BcosCNN, is_bcos_module
from .sae import SAETrainResult, TopKSAE, train_sae

__all__ = ["ConceptContributions", "ConceptTraces", "collect_features", "fit_concepts", "concept_contributions",
           "concept_traces", "top_activating", "trained_bcos_model", "domain_data", "DOMAIN", "RECIPE"]

SPLICES = ("replace", "residual")
RECIPE = "v1"  # bump when the domain, the network or its training changes: old cache files are ignored
# The generated domain the shipped network is trained on: four shapes on two textures, background
# independent of the class (bias 0.5), 32 px. 12 epochs of 1024 images reach ~100% test accuracy.
DOMAIN = {"foreground": "shapes", "classes": ("disc", "square", "triangle", "cross"), "size": 32, "bias": 0.5}
TRAIN = {"n": 1024, "epochs": 12, "lr": 1e-2, "batch_size": 32, "width": 16}
_MODELS: dict[tuple, dict] = {}


class _Stop(Exception):
    """Raised by a hook to end a forward pass once the layer's output is known."""


@dataclass
class ConceptContributions:
    """`contributions` (B, concepts): sum over positions of f_j x d logit / d f_j; `activations`
    (B, concepts): sum over positions of f_j; `error` (B,): the reconstruction error's contribution
    (zero with splice="replace"); `logits` (B, K): the explained network's (spliced: "replace");
    `original_logits` (B, K); `targets` (B,); `target_logits` (B,); `bias` (B,): the target logit at a
    zero layer output; `relative_error` (B,): ||h - D f|| / ||h||; `positions` (B, concepts, h, w): f."""

    contributions: torch.Tensor
    activations: torch.Tensor
    error: torch.Tensor
    logits: torch.Tensor
    original_logits: torch.Tensor
    targets: torch.Tensor
    target_logits: torch.Tensor
    bias: torch.Tensor
    relative_error: torch.Tensor
    positions: torch.Tensor | None = None
    splice: str = "replace"

    def completeness_gap(self) -> torch.Tensor:
        """(B,) sum of contributions + error - (target logit - bias): zero up to float rounding."""
        return self.contributions.sum(1) + self.error - (self.target_logits - self.bias)


@dataclass
class ConceptTraces:
    """`maps` (B, k, H, W): W_j(x) * x per pixel (each colour channel plus its inverse, summed);
    `concepts` (B, k) the traced concept indices; `activations` (B, k): a_j, which each map sums to;
    `weights` / `encoded` (B, k, 6, H, W) / (B, 6, H, W) with return_weights=True (for
    `saliencylab.models.bcos.gradient_to_image`)."""

    maps: torch.Tensor
    concepts: torch.Tensor
    activations: torch.Tensor
    weights: torch.Tensor | None = None
    encoded: torch.Tensor | None = None


# -- helpers -------------------------------------------------------------------------------------
def _check_model(model: nn.Module) -> list[nn.Module]:
    if not isinstance(model, nn.Module):
        raise InputError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    layers = [m for m in model.modules() if is_bcos_module(m)]
    if not layers:
        raise ConfigError(f"concept contributions need a B-cos network (B-cos layers, e.g. BcosCNN); "
                          f"{type(model).__name__} has none")
    return layers


def _explanation_mode(session: ModelSession, layers) -> None:
    for m in layers:
        session.set_attr(m, "detach", True)  # undone at the session's exit


def _check_images(x) -> torch.Tensor:
    if not isinstance(x, torch.Tensor) or x.dim() != 4 or not x.is_floating_point():
        raise InputError("images must be a float tensor (B, C, H, W), got "
                         + (f"shape {tuple(x.shape)}, {x.dtype}" if isinstance(x, torch.Tensor) else type(x).__name__))
    return x


def _check_batch(batch_size) -> int:
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ConfigError(f"batch_size must be a positive integer, got {batch_size!r}")
    return batch_size


def _layer_output(session: ModelSession, module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The layer's output for `x`, with its graph (the forward stops there)."""
    store = {}

    def hook(m, args, output):
        store["h"] = output
        raise _Stop

    with session.scope():
        session.hook(module, hook)
        try:
            session.forward(x)
        except _Stop:
            pass
    if "h" not in store:
        raise ConfigError(f"the layer {type(module).__name__} was not called in the model's forward")
    return _check_map(store["h"])


def _check_map(h) -> torch.Tensor:
    if not isinstance(h, torch.Tensor) or h.dim() != 4:
        raise ConfigError("the concept layer must output (B, C, H, W) feature maps, got "
                          + (f"shape {tuple(h.shape)}" if isinstance(h, torch.Tensor) else type(h).__name__))
    return h


def _check_sae(sae, h: torch.Tensor) -> None:
    if not isinstance(sae, TopKSAE):
        raise InputError(f"sae must be a saliencylab.concepts.sae.TopKSAE, got {type(sae).__name__}")
    if h.shape[1] != sae.dim:
        raise InputError(f"the SAE reads {sae.dim} channels, the layer gives {h.shape[1]}: train it at this layer")
    if sae.decoder.weight.device != h.device or sae.decoder.weight.dtype != h.dtype:
        raise InputError(f"the SAE is on {sae.decoder.weight.device} ({sae.decoder.weight.dtype}), the layer's output on "
                         f"{h.device} ({h.dtype}); move it with sae.to(...)")


def _find_encoder(model):
    from ..methods.bcos import find_encoder

    return find_encoder(model)


# -- features and SAE training -----------------------------------------------------------------
def collect_features(model: nn.Module, images: torch.Tensor, layer="features", *, samples_per_image: int | None = None,
                     seed: int = 0, batch_size: int = 64) -> torch.Tensor:
    """Feature rows (N, C) of `layer` for the SAE: per image `samples_per_image` positions (default
    FaCT's max(1, 72 * 512 // C)), sampled by |contribution to the predicted logit| when fewer than
    all (see the module docstring). Rows come image by image."""
    from ..core.randomness import KeyedRandom

    layers = _check_model(model)
    images = _check_images(images)
    _check_batch(batch_size)
    module = get_layer(model, layer)
    rows = []
    with ModelSession(model) as session:
        _explanation_mode(session, layers)
        for start in range(0, images.shape[0], batch_size):
            xb = images[start:start + batch_size].to(session.device)
            h = _layer_output(session, module, xb).detach()
            B, C, H, W = h.shape
            n = max(1, (72 * 512) // C) if samples_per_image is None else int(samples_per_image)
            if n < 1:
                raise ConfigError(f"samples_per_image must be >= 1, got {samples_per_image!r}")
            flat = h.flatten(2).transpose(1, 2)  # (B, HW, C)
            if n >= H * W:
                rows.append(flat.reshape(-1, C))
                continue
            weights = _position_contributions(session, module, xb).abs().flatten(1)  # (B, HW)
            noise = KeyedRandom(seed, "concepts.features").uniform(
                torch.arange(start, start + B), torch.zeros(B, dtype=torch.long), (H * W,)).to(weights.device)
            gumbel = -torch.log(-torch.log(noise.clamp(1e-12, 1 - 1e-7)))
            keys = torch.log(weights.clamp_min(1e-30)) + gumbel  # Gumbel top-k = sampling without replacement
            idx = keys.topk(n, dim=1).indices
            rows.append(flat.gather(1, idx[..., None].expand(-1, -1, C)).reshape(-1, C))
    return torch.cat(rows).detach().cpu()


def _position_contributions(session, module, xb) -> torch.Tensor:
    """(B, H, W): each position's contribution to the predicted logit (explanation mode)."""
    store = {}

    def hook(m, args, output):
        leaf = output.detach().requires_grad_(True)
        store["h"] = leaf
        return leaf

    with session.scope(), torch.enable_grad():
        session.hook(module, hook)
        out = session.forward(xb)
        score = out.gather(1, out.argmax(1, keepdim=True))
        g = session.grad(score, store["h"], create_graph=False)
    return (g * store["h"].detach()).sum(1)


def fit_concepts(model: nn.Module, images: torch.Tensor, layer="features", *, concepts: int = 64, k: int = 4,
                 epochs: int = 16, lr: float = 1e-3, batch_size: int = 1024, seed: int = 0, out_dir=None,
                 resume: bool = True, progress: bool = True, samples_per_image: int | None = None) -> SAETrainResult:
    """`collect_features` on `images`, then `train_sae` (checkpoints and resume with `out_dir`)."""
    feats = collect_features(model, images, layer, samples_per_image=samples_per_image, seed=seed)
    return train_sae(feats, concepts=concepts, k=k, epochs=epochs, lr=lr, batch_size=batch_size, seed=seed,
                     out_dir=out_dir, resume=resume, progress=progress)


# -- contributions -------------------------------------------------------------------------------
def concept_contributions(model: nn.Module, sae: TopKSAE, x: torch.Tensor, *, layer="features", target=None,
                          splice: str = "replace", batch_size: int = 64,
                          keep_positions: bool = False) -> ConceptContributions:
    """Concept contributions to the target logit (default: the explained network's predicted class);
    see the module docstring. Exact: `result.completeness_gap()` is zero up to float rounding."""
    layers = _check_model(model)
    x = _check_images(x)
    _check_batch(batch_size)
    if splice not in SPLICES:
        raise ConfigError(f"splice must be one of {', '.join(SPLICES)}, got {splice!r}")
    if callable(target) and not isinstance(target, torch.Tensor):
        raise ConfigError("concept contributions explain a class logit: give a class index or one per image")
    module = get_layer(model, layer)
    residual = splice == "residual"
    parts: dict[str, list] = {}
    with ModelSession(model) as session:
        _explanation_mode(session, layers)
        for start in range(0, x.shape[0], batch_size):
            xb = x[start:start + batch_size].to(session.device)
            store = {}

            def hook(m, args, output, store=store):
                h = _check_map(output).detach()
                _check_sae(sae, h)
                f = sae.encode_map(h).detach().requires_grad_(True)
                rec = sae.decode_map(f)
                store.update(h=h, f=f, rec=rec.detach())
                if residual:
                    store["err"] = (h - rec).detach().requires_grad_(True)
                    return rec + store["err"]
                return rec

            with torch.no_grad():
                original = session.forward(xb)
            with session.scope(), torch.enable_grad():
                session.hook(module, hook)
                out = session.forward(xb)
            resolved = resolve_target(slice_target(target, start, start + len(xb), len(x)), out.detach())
            score = resolved(out)
            inputs = [store["f"]] + ([store["err"]] if residual else [])
            grads = session.grad(score, inputs, create_graph=False)
            f = store["f"].detach()
            with session.scope(), torch.no_grad():
                session.hook(module, lambda m, a, o: torch.zeros_like(o))
                zero = session.forward(xb)
            h = store["h"]
            add = parts.setdefault
            add("contributions", []).append((grads[0] * f).sum((2, 3)))
            add("activations", []).append(f.sum((2, 3)))
            add("error", []).append((grads[1] * store["err"].detach()).sum((1, 2, 3)) if residual
                                    else torch.zeros(len(xb), dtype=f.dtype, device=f.device))
            add("logits", []).append(out.detach())
            add("original_logits", []).append(original)
            add("targets", []).append(resolved.classes)
            add("target_logits", []).append(score.detach())
            add("bias", []).append(zero.gather(1, resolved.classes[:, None].to(zero.device)).squeeze(1))
            add("relative_error", []).append((h - store["rec"]).flatten(1).norm(dim=1)
                                             / h.flatten(1).norm(dim=1).clamp_min(1e-12))
            if keep_positions:
                add("positions", []).append(f)
    out = {k: torch.cat(v).cpu() for k, v in parts.items()}
    return ConceptContributions(**out, splice=splice)


# -- traces -------------------------------------------------------------------------------------
def concept_traces(model: nn.Module, sae: TopKSAE, x: torch.Tensor, concepts, *, layer="features",
                   batch_size: int = 16, return_weights: bool = False) -> ConceptTraces:
    """Input traces of concepts: for every image and each of its k concepts, the contributions
    W_j(x) * x of the dynamic linear map from the input to the concept's presence a_j, folded over the
    (x, 1 - x) channel pairs and summed over colours: (B, k, H, W), each summing to a_j.

    concepts: (k,) indices (the same for every image) or (B, k) (per image)."""
    layers = _check_model(model)
    x = _check_images(x)
    _check_batch(batch_size)
    module = get_layer(model, layer)
    B = x.shape[0]
    if not isinstance(sae, TopKSAE):
        raise InputError(f"sae must be a saliencylab.concepts.sae.TopKSAE, got {type(sae).__name__}")
    c = torch.as_tensor(concepts)
    if c.is_floating_point() or c.is_complex() or c.dtype == torch.bool:
        raise InputError(f"concepts must be integer indices, got {c.dtype}")
    c = c.long()
    if c.dim() == 1:
        c = c[None].expand(B, -1)
    if c.dim() != 2 or c.shape[0] != B or c.shape[1] < 1:
        raise InputError(f"concepts must be (k,) or ({B}, k) indices, got shape {tuple(c.shape)}")
    if bool((c < 0).any()) or bool((c >= sae.concepts).any()):
        raise InputError(f"concept indices must lie in [0, {sae.concepts}), got {int(c.min())}..{int(c.max())}")
    k = c.shape[1]
    encoder = _find_encoder(model)
    maps, acts, weights, encoded = [], [], [], []
    with ModelSession(model) as session:
        _explanation_mode(session, layers)
        for start in range(0, B, batch_size):
            xb = x[start:start + batch_size].to(session.device)
            cb = c[start:start + batch_size].to(session.device).reshape(-1)
            xr = xb.repeat_interleave(k, 0).detach()  # one copy per traced concept: one backward
            with session.scope(), torch.enable_grad():
                store = session.capture({"encoded": encoder[1]}) if encoder is not None else None
                if store is None:
                    xr.requires_grad_(True)
                h = _layer_output(session, module, xr)
                _check_sae(sae, h)
                presence = sae.encode_map(h).sum((2, 3))
                a = presence.gather(1, cb[:, None]).squeeze(1)
                enc = xr if store is None else store.get("encoded")
                if enc is None or not enc.requires_grad:
                    raise ConfigError("the model's AddInverse module was not called on the input")
                w = session.grad(a, enc, create_graph=False)
            contrib = enc.detach() * w
            C = xb.shape[1]
            if store is not None and contrib.shape[1] == 2 * C:
                contrib = contrib[:, :C] + contrib[:, C:]
            maps.append(contrib.sum(1).reshape(len(xb), k, *contrib.shape[-2:]))
            acts.append(a.detach().reshape(len(xb), k))
            if return_weights:
                weights.append(w.detach().reshape(len(xb), k, *w.shape[1:]))
                encoded.append(enc.detach()[::k])
    return ConceptTraces(torch.cat(maps).cpu(), c.clone(), torch.cat(acts).cpu(),
                         torch.cat(weights).cpu() if return_weights else None,
                         torch.cat(encoded).cpu() if return_weights else None)


def top_activating(activations: torch.Tensor, n: int) -> torch.Tensor:
    """(n, concepts): per concept, the indices of the n images with the largest presence (FaCT's
    `all_p_presence.topk(k=16, dim=0)`), largest first."""
    if activations.dim() != 2:
        raise InputError(f"activations must be (N, concepts), got shape {tuple(activations.shape)}")
    return activations.topk(min(int(n), activations.shape[0]), dim=0).indices


# -- the shipped small B-cos network --------------------------------------------------------------
def domain_data(split: str = "train", n: int = 256, seed: int = 0):
    """ShortcutData of the generated concepts domain (`DOMAIN`: four shapes on two textures, 32 px)."""
    from ..envs.shortcut import shortcut_data

    d = DOMAIN
    return shortcut_data(split, n=n, size=d["size"], bias=d["bias"], seed=seed, foreground=d["foreground"],
                         classes=d["classes"])


def trained_bcos_model(*, n: int = TRAIN["n"], epochs: int = TRAIN["epochs"], seed: int = 0,
                       progress: bool = True) -> tuple[BcosCNN, dict]:
    """A BcosCNN (eval mode) trained on `domain_data("train", n)` with `saliencylab.training.fit`
    (Adam, lr 1e-2, batch 32), and {"accuracy" (on 256 test images), "class_names", "seconds"}.
    Cached in-process and under $SALIENCYLAB_CACHE/concepts (as `saliencylab.envs.trained`)."""
    from ..envs.trained import _load_disk, _save_disk, cache_dir
    from ..training.loop import fit

    key = (n, epochs, seed)
    record = _MODELS.get(key)
    folder = cache_dir()
    path = folder / "concepts" / f"bcos-shapes-n{n}-e{epochs}-seed{seed}-{RECIPE}.pt" if folder is not None else None
    if record is None and path is not None:
        record = _load_disk(path)
    model = _build(seed)
    if record is None:
        train = domain_data("train", n, seed)
        result = fit(model, train, None, epochs=epochs, lr=TRAIN["lr"], batch_size=TRAIN["batch_size"], seed=seed,
                     progress=progress, report=False)
        model.eval()
        test = domain_data("test", 256, seed)
        with torch.no_grad():
            acc = float((model(test.images).argmax(1) == test.labels).float().mean())
        record = {"state_dict": {k: v.detach().clone() for k, v in model.state_dict().items()}, "accuracy": acc,
                  "seconds": float(result.seconds)}
        if path is not None:
            _save_disk(path, record)
    _MODELS[key] = record
    model.load_state_dict(record["state_dict"])
    return model.eval(), {"accuracy": float(record["accuracy"]), "class_names": list(DOMAIN["classes"]),
                          "seconds": float(record.get("seconds", 0.0))}


def _build(seed: int) -> BcosCNN:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return BcosCNN(num_classes=len(DOMAIN["classes"]), width=TRAIN["width"])
