"""XNN: an explanation network at a named layer (Qi, Khorram, Li Fuxin, "Embedding deep networks into
visual explanations", Artificial Intelligence 2021, arXiv 1709.05360).

An XNN embeds a layer's activation vector z into a few *concepts* (the paper's "x-features")
e(z) >= 0 with a Sparse Reconstruction Autoencoder (SRAE) and predicts the network's output from them
with a linear head, y_hat = W e(z) + b. Trained with

    L = a_f * L_faith + a_r * L_recon + a_p * L_pull + a_s * L_sparse

- faithfulness: mean squared error between y_hat and the network's own outputs (logits) y;
- sparse reconstruction: mean_j log(1 + q * mean_n (z_hat_nj - z_nj)^2), a log penalty per feature
  dimension, so that only *part* of the feature space must be reconstructed (the "sparse" of SRAE);
- pull-away term (EBGAN's): for each explained output o, the vectors v = e * W[o] + 1e-8 (concept
  contributions), normalised, and the mean squared cosine between different ones; `pull_away="images"`
  compares the images of a batch (rows, the authors' default), "concepts" the concepts (columns);
- sparsity: mean |e| (an L1 term on the concepts; weight 0 by default, see below).

`fit_xnn(model, layer, data)` trains one; `explain_concepts(model, xnn, x)` returns, per image, the
top-k concepts by their contribution to the target logit, contribution_i = W[t, i] * e_i(x) (the
authors' "activation * weight" of an x-feature; the contributions plus the head's bias are the XNN's
prediction of the logit), and one saliency map per concept: a registered method (default "gradient",
the gradient of the concept's activation w.r.t. the input) run on the network cut at the layer with the
XNN's encoder on top.

Source. The paper's text was not available offline; the terms, architecture and defaults follow the
authors' group code (Zhongang Qi's `autoencoder.py` and `util.py`, in viv92/xAI-VisualConcepts, no
licence: formulas and semantics only, nothing copied): `autoencoder.SRAE` (encoder in -> 800 -> 100 ->
k, ReLU after each layer, dropout 0.02 after the first; the mirrored decoder, ReLU after each layer;
`classifier` Linear(k, outputs)), `autoencoder.SRAE_Optim` (the loss `alpha_pred * MSE + alpha_recons *
recons + alpha_pull_away * pt`, Adam lr 1e-3 with weight decay 1e-4, batch 50), `util.logpenaltyFC`
(the sparse reconstruction loss), `util.PT_loss` / `util.PT_loss_true` (pull-away along the images /
along the concepts, on `encoder * classifier.weight[o] + 1e-8`, summed over outputs), and
`Main1_TrainXNN.py` (5 x-features; `autoParam = [1, 100, 1, 10, 10]` with the pull-away along images:
sparse reconstruction on, q = 100, weights 1 / 10 / 10). The explained output y is the network's score
of one class (one-vs-all, one XNN per class, `SparseRAE_CUB.SparseRAE_multi`).

Differences, all deliberate:
- (not a difference) `pretrain=1`, the default, initialises as the authors: each encoder layer trained
  as a one-layer autoencoder, then the head by regression, one pass each (`pretrain=0`: PyTorch's
  default initialisation; without pretraining most concepts die in our runs);
- `fit_xnn` reads the layer once and trains on the stored features, on the CPU (move the XNN with
  `.to(device)` to explain a model on a GPU);
- `steps` of minibatches (reshuffled every pass, keyed by (seed, pass)) instead of epochs with the
  learning rate divided by 10 every 40 epochs (`adjust_lr`); `fit_xnn` trains once: the authors'
  re-training loop (`Main1_TrainXNN.py`: up to 5 rounds, the reconstruction weight x1.2 and the
  pull-away weight x0.8 each round, until two x-features have a positive mean contribution and the
  second is >= 0.3 of the first) is `saliencylab.runs.xnn_claims.fit_accepted(..., retries=4)`;
- `classes=None` (our default) explains all logits with one XNN (a multi-output head, as the authors'
  `len(label_ind)` outputs); `classes=[c]` is the authors' one-vs-all XNN;
- the decoder's last ReLU is kept only if the layer's features are non-negative on the first batch
  (the authors' features are post-ReLU; a layer with negative values could not be reconstructed);
- the sparsity term (L1 on the concepts, weight `sparsity`, default 0) is not in the authors' code;
  the paper's sparsity is the log-penalty reconstruction above and the small number of concepts;
- concept saliency maps: the authors visualise x-features with excitation backprop (later I-GOS); we
  run any registered method, default the plain gradient of the concept activation;
- a conv layer's output is flattened (`pool="flatten"`, the authors' fully connected SRAE on the whole
  activation vector) or averaged over space (`pool="avg"`).
"""

from __future__ import annotations

import hashlib
import math
import operator
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Sequence

import torch
from torch import nn

from ..core.errors import ConfigError, InputError

__all__ = ["XNN", "ConceptExplanation", "ConceptNet", "fit_xnn", "explain_concepts", "layer_features",
           "faithfulness_loss", "sparse_reconstruction_loss", "pull_away_loss", "concept_sparsity_loss",
           "xnn_losses", "concept_contributions", "save_xnn", "load_xnn", "DEFAULT_WEIGHTS"]

#: the authors' weights (Main1_TrainXNN.py, PT_inverse = 1: autoParam = [1, 100, 1, 10, 10]) plus our L1 term
DEFAULT_WEIGHTS = {"faithfulness": 1.0, "reconstruction": 10.0, "pull_away": 10.0, "sparsity": 0.0}
PULL_AWAY = ("images", "concepts")
POOLS = ("flatten", "avg")
FORMAT = 1  # XNN checkpoint layout version
CHECKPOINT = "xnn_checkpoint.pt"


# -- the network -------------------------------------------------------------------------------------
class XNN(nn.Module):
    """The SRAE: encoder (ReLU MLP to `concepts` non-negative activations), mirrored decoder, linear head.

    forward(features (B, D)) -> (concepts (B, K), reconstruction (B, D), prediction (B, outputs)).
    Attributes describing where it sits: `layer` (dotted name), `classes` (the explained logits; None:
    all), `pool`, `history` (training rows), `config`.
    """

    def __init__(self, in_features: int, concepts: int = 5, outputs: int = 1, hidden: Sequence[int] = (800, 100),
                 dropout: float = 0.02, nonnegative: bool = True):
        super().__init__()
        sizes = [int(in_features), *[int(h) for h in hidden], int(concepts)]
        enc: list[nn.Module] = []
        for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
            enc += [nn.Linear(a, b), nn.ReLU()]
            if i == 0 and dropout > 0 and len(sizes) > 2:  # the authors' dropout after the first layer
                enc.append(nn.Dropout(dropout))
        dec: list[nn.Module] = []
        back = sizes[::-1]
        for i, (a, b) in enumerate(zip(back[:-1], back[1:])):
            dec.append(nn.Linear(a, b))
            if i < len(back) - 2 or nonnegative:
                dec.append(nn.ReLU())
        self.encoder = nn.Sequential(*enc)
        self.decoder = nn.Sequential(*dec)
        self.head = nn.Linear(int(concepts), int(outputs))
        self.layer: str | None = None
        self.classes: list[int] | None = None
        self.pool = "flatten"
        self.history: list[dict] = []
        self.config = {"in_features": int(in_features), "concepts": int(concepts), "outputs": int(outputs),
                       "hidden": [int(h) for h in hidden], "dropout": float(dropout), "nonnegative": bool(nonnegative)}

    @property
    def num_concepts(self) -> int:
        return self.head.in_features

    def encode(self, features: torch.Tensor) -> torch.Tensor:
        return self.encoder(features)

    def forward(self, features: torch.Tensor):
        e = self.encoder(features)
        return e, self.decoder(e), self.head(e)


# -- loss terms --------------------------------------------------------------------------------------
def faithfulness_loss(prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean squared error between the XNN's prediction and the network's outputs (`SRAE_Optim` predict_loss)."""
    return ((prediction - target) ** 2).mean()


def sparse_reconstruction_loss(reconstruction: torch.Tensor, features: torch.Tensor, q: float | None = 100.0) -> torch.Tensor:
    """mean_j log(1 + q * mean_n (rec_nj - f_nj)^2) (`util.logpenaltyFC`); q None or 0: the plain MSE."""
    sq = (reconstruction - features) ** 2
    if not q:
        return sq.mean()
    return torch.log1p(q * sq.mean(0)).mean()


def pull_away_loss(concepts: torch.Tensor, weight: torch.Tensor, along: str = "images", eps: float = 1e-8) -> torch.Tensor:
    """Sum over outputs o of the pull-away term of v = concepts * weight[o] + eps (`util.PT_loss`).

    along="images": cosines between the rows (images) of v, (B, B); "concepts": between its columns,
    (K, K) (`util.PT_loss_true`). Each: the sum of squared off-diagonal cosines / (n (n - 1)).
    All outputs in one batched product.
    """
    if along not in PULL_AWAY:
        raise ConfigError(f"pull_away must be one of {', '.join(PULL_AWAY)}, got {along!r}")
    v = concepts[None] * weight[:, None, :] + eps           # (O, B, K)
    if along == "concepts":
        v = v.transpose(1, 2)                               # (O, K, B)
    n = v.shape[1]
    if n < 2:
        return concepts.new_zeros(())
    u = v / v.norm(dim=2, keepdim=True)
    cos = u @ u.transpose(1, 2)
    off = cos * (1 - torch.eye(n, dtype=cos.dtype, device=cos.device))
    return (off ** 2).sum() / (n * (n - 1))


def concept_sparsity_loss(concepts: torch.Tensor) -> torch.Tensor:
    """Mean absolute concept activation (an L1 term; not in the authors' code)."""
    return concepts.abs().mean()


def xnn_losses(xnn: XNN, features: torch.Tensor, target: torch.Tensor, *, weights: dict | None = None,
               q: float | None = 100.0, pull_away: str = "images") -> tuple[torch.Tensor, dict]:
    """(total loss, {term: unweighted value}) of `xnn` on a batch of features and the network's outputs."""
    w = _weights(weights)
    e, rec, pred = xnn(features)
    terms = {"faithfulness": faithfulness_loss(pred, target),
             "reconstruction": sparse_reconstruction_loss(rec, features, q),
             "pull_away": pull_away_loss(e, xnn.head.weight, pull_away),
             "sparsity": concept_sparsity_loss(e)}
    total = sum(w[k] * terms[k] for k in terms)
    return total, terms


def _weights(weights) -> dict:
    w = dict(DEFAULT_WEIGHTS)
    if weights is None:
        return w
    if not isinstance(weights, dict):
        raise ConfigError(f"weights must be a dict with keys among {', '.join(DEFAULT_WEIGHTS)}, got {weights!r}")
    unknown = sorted(set(weights) - set(DEFAULT_WEIGHTS))
    if unknown:
        raise ConfigError(f"unknown loss weight(s) {', '.join(unknown)}; choose among {', '.join(DEFAULT_WEIGHTS)}")
    for k, v in weights.items():
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
            raise ConfigError(f"the weight of {k} must be a number >= 0, got {v!r}")
        w[k] = float(v)
    return w


# -- features ----------------------------------------------------------------------------------------
def _pool(out: torch.Tensor, pool: str) -> torch.Tensor:
    if pool == "avg" and out.dim() > 2:
        return out.flatten(2).mean(2)
    return out.flatten(1)


def layer_features(model: nn.Module, layer, x: torch.Tensor, pool: str = "flatten") -> tuple[torch.Tensor, torch.Tensor]:
    """(features (B, D), logits (B, C)) of `model` on `x`, the layer read through a session hook.

    The model is left as it was (mode, hooks, requires_grad): the session undoes its edits at exit.
    """
    from ..core.layers import resolve_layers
    from ..core.session import ModelSession

    name, module = resolve_layers(model, layer)[0]
    with ModelSession(model) as session, torch.no_grad():
        store = session.capture({name: module}, make_differentiable=False)
        logits = session.forward(x)
    if name not in store:
        raise InputError(f"layer '{name}' did not produce a tensor in the forward pass")
    if logits.dim() != 2:
        raise InputError(f"the model must return (B, classes) logits, got shape {tuple(logits.shape)}")
    return _pool(store[name], pool).detach(), logits.detach()


def _batches(data, batch_size: int) -> Iterable[torch.Tensor]:
    if isinstance(data, torch.Tensor):
        if data.dim() != 4:
            raise InputError(f"data must be images (N, C, H, W), got shape {tuple(data.shape)}")
        if data.shape[0] == 0:
            raise InputError("data holds no images")
        yield from data.split(batch_size)
        return
    if hasattr(data, "images") and isinstance(getattr(data, "images"), torch.Tensor):
        yield from _batches(data.images, batch_size)
        return
    try:
        it = iter(data)
    except TypeError:
        raise InputError(f"data must be an image tensor (N, C, H, W) or an iterable of batches, got "
                         f"{type(data).__name__}") from None
    for i, item in enumerate(it):
        x = item[0] if isinstance(item, (tuple, list)) else item
        if not isinstance(x, torch.Tensor) or x.dim() != 4:
            raise InputError(f"batch {i} of data must be images (B, C, H, W) or a tuple starting with them, "
                             f"got {type(x).__name__}{'' if not isinstance(x, torch.Tensor) else ' of shape ' + str(tuple(x.shape))}")
        yield x


def _collect(model, layer, data, pool, batch_size) -> tuple[torch.Tensor, torch.Tensor]:
    feats, logits = [], []
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    for x in _batches(data, batch_size):
        f, y = layer_features(model, layer, x.to(device).float(), pool)
        feats.append(f.cpu())
        logits.append(y.cpu())
    if not feats:
        raise InputError("data holds no images")
    return torch.cat(feats), torch.cat(logits)


# -- training ----------------------------------------------------------------------------------------
def _check_int(value, name, low):
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ConfigError(f"{name} must be an integer >= {low}, got {value!r}")
    return value


def _index(value) -> int | None:
    """An integer class index (Python, numpy or 0-d tensor), else None."""
    if isinstance(value, bool):
        return None
    try:
        return operator.index(value)
    except TypeError:
        return None


def _digest(*tensors) -> str:
    h = hashlib.sha1()
    for t in tensors:
        h.update(t.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def fit_xnn(model: nn.Module, layer, data, *, concepts: int = 5, steps: int = 1000, seed: int = 0, out_dir=None,
            classes: Sequence[int] | int | None = None, hidden: Sequence[int] = (800, 100), batch_size: int = 50,
            lr: float = 1e-3, weight_decay: float = 1e-4, weights: dict | None = None, q: float | None = 100.0,
            pull_away: str = "images", pool: str = "flatten", dropout: float = 0.02, pretrain: int = 1,
            checkpoint_every: int = 100,
            log_every: int = 50, progress: bool = True, resume: bool = True) -> XNN:
    """Train an XNN on `model`'s `layer` (a dotted name or a module) over `data`.

    data: images (N, C, H, W), an object with `.images`, or an iterable of batches (tensors, or tuples
    whose first item is the images); read once: the layer's features and the logits are computed
    through a session hook (the model is not changed) and kept in memory.
    classes: the explained logits (an int or list: one-vs-all as the authors with one class; None: all).
    weights: {faithfulness, reconstruction, pull_away, sparsity} (defaults `DEFAULT_WEIGHTS`); q: the
    log penalty of the sparse reconstruction (None: plain MSE); pull_away: "images" or "concepts".
    pretrain: passes of the authors' layer-wise pretraining before the SRAE is trained (0: none).
    out_dir: a checkpoint (XNN, optimiser, step, history; written to a temporary file, then renamed)
    every `checkpoint_every` steps and at the end; calling again with the same out_dir resumes from it
    (settings and data must match; `steps` may grow) and gives the same XNN, to the bit, as one run:
    minibatches and dropout are keyed by (seed, step). `resume=False` starts over.
    Returns the XNN in eval mode, with `history` (a row every `log_every` steps and the last).
    """
    from ..core import progress as _progress
    from ..core.layers import resolve_layers
    from ..training.loop import _atomic_save, _key, _number

    from tqdm.auto import tqdm

    if not isinstance(model, nn.Module):
        raise InputError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    name, _ = resolve_layers(model, layer)[0]
    _check_int(concepts, "concepts", 1)
    _check_int(steps, "steps", 0)
    _check_int(seed, "seed", 0)
    _check_int(batch_size, "batch_size", 1)
    _check_int(checkpoint_every, "checkpoint_every", 1)
    _check_int(log_every, "log_every", 1)
    _check_int(pretrain, "pretrain", 0)
    _number(lr, "lr", positive=True)
    _number(weight_decay, "weight_decay", low=0)
    _number(dropout, "dropout", low=0)
    if dropout >= 1:
        raise ConfigError(f"dropout must be in [0, 1), got {dropout!r}")
    if q is not None:
        _number(q, "q", low=0)
    if pull_away not in PULL_AWAY:
        raise ConfigError(f"pull_away must be one of {', '.join(PULL_AWAY)}, got {pull_away!r}")
    if pool not in POOLS:
        raise ConfigError(f"pool must be one of {', '.join(POOLS)}, got {pool!r}")
    hidden = [_check_int(h, "hidden sizes", 1) for h in hidden]
    w = _weights(weights)

    feats, logits = _collect(model, layer, data, pool, 256)
    n, d = feats.shape
    if classes is not None:
        cls = [classes] if not isinstance(classes, (list, tuple, torch.Tensor)) and not hasattr(classes, "__len__") \
            else list(classes)
        cls = [_index(c) for c in cls]
        bad = [c for c in cls if c is None or not 0 <= c < logits.shape[1]]
        if not cls or bad:
            raise ConfigError(f"classes must be class indices in [0, {logits.shape[1]}), got {classes!r}")
        target = logits[:, cls]
    else:
        cls = None
        target = logits
    nonnegative = bool((feats[: min(n, batch_size)] >= 0).all())
    config = {"layer": name, "classes": cls, "concepts": concepts, "hidden": hidden, "batch_size": batch_size,
              "lr": lr, "weight_decay": weight_decay, "weights": w, "q": q, "pull_away": pull_away, "pool": pool,
              "dropout": dropout, "pretrain": pretrain, "log_every": log_every, "seed": seed, "data": {"n": n, "features": d, "sha1": _digest(feats, target)}}

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(_key(seed, "init"))
        xnn = XNN(d, concepts, target.shape[1], hidden, dropout, nonnegative)
        if pretrain:
            _pretrain(xnn, feats, target, seed, pretrain, batch_size, lr)
    optimizer = torch.optim.Adam(xnn.parameters(), lr=lr, weight_decay=weight_decay)
    history: list[dict] = []
    start = 0
    sums: dict[str, float] = {}  # the terms summed since the last history row (kept in checkpoints)
    count = 0
    run_dir = Path(out_dir) if out_dir is not None else None
    if run_dir is not None:
        try:
            run_dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise InputError(f"cannot create output folder '{run_dir}': {exc.strerror or exc}") from None
        path = run_dir / CHECKPOINT
        if not resume:
            path.unlink(missing_ok=True)
        elif path.is_file():
            try:
                blob = torch.load(path, map_location="cpu", weights_only=False)
            except Exception as exc:  # noqa: BLE001 - an unreadable file is one line
                raise InputError(f"cannot read the XNN checkpoint '{path}': {exc}") from None
            if not isinstance(blob, dict) or blob.get("format") != FORMAT:
                raise InputError(f"'{path}' is not an XNN checkpoint of this version; resume=False starts over")
            diff = [k for k in sorted(set(blob["config"]) | set(config)) if blob["config"].get(k) != config.get(k)]
            if diff:
                raise ConfigError(f"'{run_dir}' holds an XNN trained with other settings ({', '.join(diff)} differ); "
                                  "resume=False starts over, or use another folder")
            if blob["step"] > steps:
                raise ConfigError(f"'{run_dir}' already holds {blob['step']} steps, more than the {steps} asked for")
            xnn.load_state_dict(blob["xnn"])
            optimizer.load_state_dict(blob["optimizer"])
            history = list(blob["history"])
            start = int(blob["step"])
            sums, count = dict(blob["partial"]["sums"]), int(blob["partial"]["count"])
            if history and history[-1]["step"] % log_every:  # the previous call's last row, off the grid
                history.pop()

    def save(step):
        if run_dir is not None:
            _atomic_save({"format": FORMAT, "step": step, "xnn": xnn.state_dict(), "optimizer": optimizer.state_dict(),
                          "history": history, "partial": {"sums": dict(sums), "count": count}, "config": config},
                         run_dir / CHECKPOINT)

    per_pass = math.ceil(n / batch_size)
    order, order_pass = None, -1
    t0 = time.perf_counter()
    show = progress and _progress._enabled
    bar = tqdm(total=steps - start, desc="xnn", unit="step", delay=1.0, leave=False,
               disable=None if show else True, dynamic_ncols=True)
    xnn.train()
    try:
        with torch.random.fork_rng(devices=[]):
            for step in range(start, steps):
                p, b = divmod(step, per_pass)
                if p != order_pass:
                    order = torch.randperm(n, generator=torch.Generator().manual_seed(_key(seed, p, "shuffle")))
                    order_pass = p
                idx = order[b * batch_size:(b + 1) * batch_size]
                torch.manual_seed(_key(seed, step, "dropout"))
                loss, terms = xnn_losses(xnn, feats[idx], target[idx], weights=w, q=q, pull_away=pull_away)
                if not bool(torch.isfinite(loss)):
                    raise InputError(f"step {step}: the XNN loss is not finite ({float(loss)}); lower lr or the weights")
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                sums["loss"] = sums.get("loss", 0.0) + float(loss.detach())
                for k, v in terms.items():
                    sums[k] = sums.get(k, 0.0) + float(v.detach())
                count += 1
                done = step + 1
                if done % log_every == 0 or done == steps:
                    history.append({"step": done, **{k: v / count for k, v in sums.items()},
                                    "seconds": time.perf_counter() - t0})
                    if done % log_every == 0:  # a last row off the grid keeps its sums: a resumed run redoes it
                        sums, count = {}, 0
                if done % checkpoint_every == 0 or done == steps:
                    save(done)
                bar.update(1)
    finally:
        bar.close()
    if steps == start and run_dir is not None and not (run_dir / CHECKPOINT).is_file():
        save(steps)
    xnn.eval()
    xnn.layer, xnn.classes, xnn.pool, xnn.history = name, cls, pool, history
    xnn.config.update({k: config[k] for k in ("layer", "classes", "pool", "weights", "q", "pull_away", "seed")})
    return xnn


def _pretrain(xnn: XNN, feats: torch.Tensor, target: torch.Tensor, seed: int, epochs: int, batch_size: int,
              lr: float) -> None:
    """The authors' initialisation (`SparseRAE_CUB.SparseRAE_multi`): each encoder layer trained as a
    one-layer autoencoder (Linear-ReLU, Linear-ReLU; MSE, Adam, `autoencoder.AutoencoderOptim`) on the
    previous layer's codes, its decoder becoming the SRAE's mirrored decoder layer; then the head by
    linear regression of the outputs on the concepts (MSE, Adam, `autoencoder.LR_Optim`). Minibatches are
    keyed by (seed, layer, epoch)."""
    from ..training.loop import _key

    enc = [m for m in xnn.encoder if isinstance(m, nn.Linear)]
    dec = [m for m in xnn.decoder if isinstance(m, nn.Linear)][::-1]  # dec[i] maps layer i + 1 back to layer i
    h = feats
    n = len(feats)

    def batches(*tag):
        for epoch in range(epochs):
            order = torch.randperm(n, generator=torch.Generator().manual_seed(_key(seed, "pretrain", *tag, epoch)))
            yield from order.split(batch_size)

    for i, (e_lin, d_lin) in enumerate(zip(enc, dec)):
        relu_out = i > 0 or xnn.config["nonnegative"]
        opt = torch.optim.Adam([*e_lin.parameters(), *d_lin.parameters()], lr=lr)
        for idx in batches(i):
            r = d_lin(torch.relu(e_lin(h[idx])))
            loss = ((torch.relu(r) if relu_out else r) - h[idx]).pow(2).mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        with torch.no_grad():
            h = torch.relu(e_lin(h))
    opt = torch.optim.Adam(xnn.head.parameters(), lr=lr)
    for idx in batches("head"):
        loss = (xnn.head(h[idx]) - target[idx]).pow(2).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()


def save_xnn(xnn: XNN, path) -> Path:
    """Weights and settings (`load_xnn` rebuilds it)."""
    from ..training.loop import _atomic_save

    path = Path(path)
    _atomic_save({"format": FORMAT, "xnn": xnn.state_dict(), "config": dict(xnn.config), "layer": xnn.layer,
                  "classes": xnn.classes, "pool": xnn.pool, "history": xnn.history}, path)
    return path


def load_xnn(path) -> XNN:
    path = Path(path)
    try:
        blob = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:  # noqa: BLE001
        raise InputError(f"cannot read XNN file '{path}': {exc}") from None
    if not isinstance(blob, dict) or "xnn" not in blob:
        raise InputError(f"'{path}' is not an XNN file")
    if "in_features" not in blob["config"]:  # a training checkpoint: settings are in the run's config
        raise InputError(f"'{path}' is a training checkpoint; call fit_xnn with the same out_dir to get the XNN")
    c = blob["config"]
    xnn = XNN(c["in_features"], c["concepts"], c["outputs"], c["hidden"], c["dropout"], c["nonnegative"])
    xnn.load_state_dict(blob["xnn"])
    xnn.config.update(c)
    xnn.layer, xnn.classes, xnn.pool, xnn.history = blob["layer"], blob["classes"], blob["pool"], blob["history"]
    return xnn.eval()


# -- explanations ------------------------------------------------------------------------------------
class ConceptNet(nn.Module):
    """The network cut at the XNN's layer with the XNN's encoder on top: x -> concepts (B, K).

    The layer is read by a forward hook registered for the call and removed after it; the model's
    output is computed and discarded (the layers after the cut still run).
    """

    def __init__(self, model: nn.Module, xnn: XNN):
        super().__init__()
        from ..core.layers import resolve_layers

        self.model = model
        self.xnn = xnn
        self._module = resolve_layers(model, xnn.layer)[0][1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        store = {}

        def hook(module, args, output):
            store["z"] = output

        handle = self._module.register_forward_hook(hook)
        try:
            self.model(x)
        finally:
            handle.remove()
        z = _pool(store["z"], self.xnn.pool)
        return self.xnn.encode(z.to(next(self.xnn.parameters()).device))


@dataclass
class ConceptExplanation:
    """Per image: the top-k concepts by contribution to the target logit, and a map per concept.

    concepts (B, k) concept indices, most contributing first; contributions (B, k) = W[t, i] * e_i(x);
    activations (B, k) = e_i(x); maps (B, k, H, W); targets (B,) explained class; prediction (B,) the
    XNN's estimate of the logit (all contributions + bias); logits (B,) the network's logit;
    all_contributions (B, K).
    """

    concepts: torch.Tensor
    contributions: torch.Tensor
    activations: torch.Tensor
    maps: torch.Tensor
    targets: torch.Tensor
    prediction: torch.Tensor
    logits: torch.Tensor
    all_contributions: torch.Tensor
    method: str = "gradient"
    extras: dict = field(default_factory=dict)


def concept_contributions(xnn: XNN, concepts: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """(B, K) contributions W[row_b, i] * e_bi of each concept to head output `rows` (B,)."""
    return concepts * xnn.head.weight[rows]


def _head_rows(xnn: XNN, target, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(classes (B,), head rows (B,)) for the target spec."""
    b, c = logits.shape
    if target is None:
        if xnn.classes is not None and len(xnn.classes) == 1:
            classes = torch.full((b,), xnn.classes[0], dtype=torch.long)
        else:
            classes = logits.argmax(1).cpu()
            if xnn.classes is not None:  # the predicted class among the explained ones
                sub = torch.tensor(xnn.classes)
                classes = sub[logits[:, sub].argmax(1).cpu()]
    else:
        t = torch.as_tensor(target).long().cpu()
        if t.dim() == 0:
            t = t.expand(b)
        if t.shape != (b,):
            raise InputError(f"target must be None, an int or one class per image ({b}), got shape {tuple(t.shape)}")
        classes = t.clone()
    if bool(((classes < 0) | (classes >= c)).any()):
        raise InputError(f"target classes must be in [0, {c}), got {classes.tolist()}")
    if xnn.classes is None:
        return classes, classes
    lookup = {cl: i for i, cl in enumerate(xnn.classes)}
    missing = sorted({int(v) for v in classes.tolist()} - set(lookup))
    if missing:
        raise InputError(f"this XNN explains classes {xnn.classes}, not {missing}")
    return classes, torch.tensor([lookup[int(v)] for v in classes.tolist()], dtype=torch.long)


def explain_concepts(model: nn.Module, xnn: XNN, x: torch.Tensor, target=None, k: int = 3, *,
                     method: str = "gradient", **method_params) -> ConceptExplanation:
    """The top-k concepts of each image by contribution to the target logit, with a saliency map each.

    target: None (the predicted class; with a one-class XNN, that class), an int, or one per image.
    contribution_i = W[t, i] * e_i(x), W the XNN head's weights (their sum plus the bias is the XNN's
    prediction of the logit). maps (B, k, H, W): `method` (a registered name, default "gradient")
    explaining concept i's activation on `ConceptNet(model, xnn)`; one batched call per rank.
    The model and the XNN are left as they were.
    """
    import saliencylab as sl

    if not isinstance(xnn, XNN) or xnn.layer is None:
        raise InputError("xnn must be an XNN returned by fit_xnn (or load_xnn)")
    if not isinstance(x, torch.Tensor) or x.dim() != 4:
        raise InputError(f"x must be images (B, C, H, W), got {type(x).__name__}"
                         f"{' of shape ' + str(tuple(x.shape)) if isinstance(x, torch.Tensor) else ''}")
    _check_int(k, "k", 1)
    if k > xnn.num_concepts:
        raise ConfigError(f"k = {k} is more than the XNN's {xnn.num_concepts} concepts")
    was = xnn.training
    xnn.eval()
    try:
        feats, logits = layer_features(model, xnn.layer, x, xnn.pool)
        classes, rows = _head_rows(xnn, target, logits)
        with torch.no_grad():
            e, _, pred = xnn(feats.to(next(xnn.parameters()).device))
        rows_d = rows.to(e.device)
        contrib = concept_contributions(xnn, e, rows_d).detach()
        order = contrib.argsort(dim=1, descending=True, stable=True)[:, :k]
        net = ConceptNet(model, xnn)
        maps = [sl.explain(net, x, method, target=order[:, r], **method_params).maps.detach() for r in range(k)]
    finally:
        xnn.train(was)
    return ConceptExplanation(
        concepts=order.cpu(), contributions=contrib.gather(1, order).cpu(), activations=e.gather(1, order).cpu(),
        maps=torch.stack(maps, 1), targets=classes, prediction=pred.gather(1, rows_d[:, None])[:, 0].detach().cpu(),
        logits=logits.gather(1, classes.to(logits.device)[:, None])[:, 0].cpu(), all_contributions=contrib.cpu(),
        method=method)
