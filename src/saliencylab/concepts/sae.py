"""A bias-free top-k sparse autoencoder (SAE) and its training loop, as in FaCT.

Parchami-Araghi, Rao, Fischer, Schiele, "FaCT: Faithful Concept Traces for Explaining Neural Network
Decisions" (NeurIPS 2025), m-parchami/FaCT (Apache-2.0), which builds on saprmarks/dictionary_learning
(MIT). Adapted, with attribution, from:
- `fact/training/saes.py`, `MyBiasFreeTopKSAE`: the top-k SAE of dictionary_learning's `AutoEncoderTopK`
  (`dictionary_learning/trainers/top_k.py`) with every bias removed (no encoder bias, `b_dec` = 0), so
  the concept code f(h) = TopK(ReLU(E h)) and the reconstruction D f are positively homogeneous and
  D f is linear in f: the concept contributions of a B-cos network then sum exactly to the logit;
- initialisation (`AutoEncoderTopK.__init__`): a default `nn.Linear` decoder with unit-norm columns
  (`set_decoder_norm_to_unit_norm`), the encoder its transpose;
- training (`MyTopKTrainer.update` / `.loss`, `fact/utils/utils.py` `SAETrainer.fit` and `train_sae`):
  loss = ||h - D f||^2 (summed over the feature, mean over rows) + auxk_alpha (1/32) x the auxiliary
  loss of the dead latents (`TopKTrainer.get_auxiliary_loss`: the top `min(256, #dead)` pre-activations
  of latents not fired for `n_rows / 2` rows reconstruct the residual, normalised by its variance);
  Adam (0.9, 0.999); the decoder gradient's component along each (unit) decoder column removed, the
  gradient norm clipped to 1, the decoder columns renormalised after each step; learning rate
  warm-up over the first epoch and cosine decay from the start of the third (`my_lr_schedule`);
  rows divided by the norm factor sqrt(mean ||h||^2) (`normalize_activations=True`,
  dictionary_learning `get_norm_factor`): the SAE has no bias, so the trained weights serve the raw
  features unchanged (their `scale_biases` is a no-op for it, ours needs none either).

Deliberate differences (see docs/differences.md):
- CPU-sized defaults (64 concepts, k 4, batch 1024; the authors' `train.sh` trains 1024 concepts, k 8,
  batch 32786 for 16 epochs on ~170 GB of ImageNet features, and `analysis.sh` evaluates a 16384-concept,
  k 16 model): `concepts`, `k`, `epochs`, `batch_size` are arguments; 16 epochs and lr 1e-3 as theirs.
- The norm factor is computed over all rows (theirs: the first 550 batches).
- Each epoch's shuffle is keyed by (seed, epoch) and every epoch writes a checkpoint (model, Adam,
  step, dead-latent counters, history) to `out_dir`; calling again resumes with the identical result.
  Theirs saves three snapshots and cannot resume.
- Every planned step is taken (their loop increments the step before the stop test and so skips the
  last one; the first step there runs at learning rate 0, ours too, as the warm-up starts at 0).
- No weights & biases logging, no periodic accuracy evaluation of the spliced network (the CLI
  reports it once at the end); the history records loss, fraction of variance explained, L0, dead latents.
"""

from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ..core.errors import ConfigError, InputError

__all__ = ["TopKSAE", "SAETrainResult", "train_sae", "lr_factor"]

TOP_K_AUX = 256          # FaCT's MyTopKTrainer: top_k_aux = 256
AUXK_ALPHA = 1 / 32      # FaCT's SAETrainer.fit: auxk_alpha = 1/32


class TopKSAE(nn.Module):
    """Bias-free top-k SAE: f = TopK_k(ReLU(E h)), h_hat = D f; D's columns have unit norm.

    `encode` / `decode` act on rows (N, dim); `encode_map` / `decode_map` on feature maps (B, dim, H, W)
    (every spatial position is one row, as FaCT's hook flattens them)."""

    def __init__(self, dim: int, concepts: int, k: int, seed: int | None = 0):
        super().__init__()
        for name, v in (("dim", dim), ("concepts", concepts), ("k", k)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ConfigError(f"{name} must be a positive integer, got {v!r}")
        if k > concepts:
            raise ConfigError(f"k (active concepts per position, {k}) must not exceed the number of concepts ({concepts})")
        self.dim, self.concepts = dim, concepts
        self.register_buffer("k", torch.tensor(k, dtype=torch.int64))
        # seeded: drawn in a forked random state (the caller's is left alone); unseeded: from the caller's
        with torch.random.fork_rng(devices=[]) if seed is not None else contextlib.nullcontext():
            if seed is not None:
                torch.manual_seed(seed)
            self.decoder = nn.Linear(concepts, dim, bias=False)
            self.encoder = nn.Linear(dim, concepts, bias=False)  # its draw is overwritten below
        with torch.no_grad():
            self.decoder.weight.copy_(_unit_columns(self.decoder.weight))
            self.encoder.weight.copy_(self.decoder.weight.T)

    def pre_activations(self, x: torch.Tensor) -> torch.Tensor:
        """ReLU(E x), before the top-k."""
        return F.relu(self.encoder(x))

    def encode(self, x: torch.Tensor, return_pre: bool = False):
        """(N, dim) -> (N, concepts): the k largest of ReLU(E x) per row kept, the rest zero.
        return_pre=True: (codes, ReLU(E x), the kept indices (N, k))."""
        pre = self.pre_activations(x)
        top = pre.topk(int(self.k), dim=-1, sorted=False)
        codes = torch.zeros_like(pre).scatter(-1, top.indices, top.values)
        return (codes, pre, top.indices) if return_pre else codes

    def decode(self, f: torch.Tensor) -> torch.Tensor:
        return self.decoder(f)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decode(self.encode(x))

    def encode_map(self, h: torch.Tensor) -> torch.Tensor:
        """(B, dim, H, W) -> (B, concepts, H, W)."""
        self._check_map(h)
        return self.encode(h.movedim(1, -1)).movedim(-1, 1)

    def decode_map(self, f: torch.Tensor) -> torch.Tensor:
        """(B, concepts, H, W) -> (B, dim, H, W)."""
        return self.decode(f.movedim(1, -1)).movedim(-1, 1)

    def _check_map(self, h: torch.Tensor) -> None:
        if h.dim() != 4 or h.shape[1] != self.dim:
            raise InputError(f"the SAE expects (B, {self.dim}, H, W) feature maps, got shape {tuple(h.shape)}")

    def extra_repr(self) -> str:
        return f"dim={self.dim}, concepts={self.concepts}, k={int(self.k)}, bias=False"


def _unit_columns(w: torch.Tensor) -> torch.Tensor:
    """dictionary_learning's set_decoder_norm_to_unit_norm: columns of the (dim, concepts) decoder / (norm + eps)."""
    return w / (w.norm(dim=0, keepdim=True) + torch.finfo(w.dtype).eps)


@torch.no_grad()
def _remove_parallel_gradient(w: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    """dictionary_learning's remove_gradient_parallel_to_decoder_directions."""
    unit = w / (w.norm(dim=0, keepdim=True) + 1e-6)
    return grad - (grad * unit).sum(0, keepdim=True) * unit


def lr_factor(step: int, total: int, warmup: int, decay_start: int | None) -> float:
    """FaCT's my_lr_schedule: linear warm-up from 0, constant, cosine decay to 0 from `decay_start`."""
    if step < warmup:
        return step / warmup
    if decay_start is not None and step >= decay_start:
        t = 1 - (total - step) / (total - decay_start)
        return 0.5 * (1 + math.cos(math.pi * t))
    return 1.0


@dataclass
class SAETrainResult:
    sae: TopKSAE
    history: list = field(default_factory=list)
    run_dir: Path | None = None
    resumed_from: int | None = None
    norm_factor: float = 1.0
    seconds: float = 0.0


def _fingerprint(x: torch.Tensor) -> dict:
    import hashlib

    digest = hashlib.sha1(x.detach().cpu().contiguous().numpy().tobytes()).hexdigest()[:16]
    return {"n": int(x.shape[0]), "dim": int(x.shape[1]), "sha1": digest}


def train_sae(features: torch.Tensor, *, concepts: int = 64, k: int = 4, epochs: int = 16, lr: float = 1e-3,
              batch_size: int = 1024, seed: int = 0, auxk_alpha: float = AUXK_ALPHA, out_dir=None,
              resume: bool = True, progress: bool = True, callback=None) -> SAETrainResult:
    """Train a `TopKSAE` on feature rows (N, dim) (see the module docstring for the recipe).

    out_dir: a checkpoint per epoch under `out_dir/checkpoints` (written to a temporary file, then
    renamed); calling again with the same folder continues from the newest one (`resume=False` starts
    over), to the bit the result of an uninterrupted run. `callback("epoch", row)` after every epoch:
    an exception there stops the run, which a later call resumes. The history's row 0 is the
    initial SAE."""
    from tqdm.auto import tqdm

    from ..core import progress as _progress
    from ..training.loop import FORMAT, _atomic_save, _key, open_run_dir

    t0 = time.perf_counter()
    if not isinstance(features, torch.Tensor) or features.dim() != 2 or not features.is_floating_point():
        raise InputError("features must be a float tensor of rows (N, dim), got "
                         + (f"shape {tuple(features.shape)}" if isinstance(features, torch.Tensor) else type(features).__name__))
    if features.shape[0] < 2 or not bool(torch.isfinite(features).all()):
        raise InputError("features need at least 2 rows, all finite")
    for name, v in (("epochs", epochs), ("batch_size", batch_size)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ConfigError(f"{name} must be a positive integer, got {v!r}")
    if not (isinstance(lr, (int, float)) and lr > 0):
        raise ConfigError(f"lr must be positive, got {lr!r}")
    x_all = features.detach().float().cpu()
    n, dim = x_all.shape
    sae = TopKSAE(dim, concepts, k, seed=seed)
    norm_factor = float(x_all.pow(2).sum(1).mean().sqrt().clamp_min(1e-12))
    steps_per_epoch = math.ceil(n / batch_size)
    total = epochs * steps_per_epoch
    warmup = steps_per_epoch if epochs >= 2 else 0
    decay_start = 2 * steps_per_epoch if epochs >= 3 else None
    dead_threshold = max(n // 2, 1)  # FaCT's train_sae: n_feats_per_epoch // 2
    optimizer = torch.optim.Adam(sae.parameters(), lr=lr, betas=(0.9, 0.999))
    since_fired = torch.zeros(concepts, dtype=torch.long)
    # the schedule depends on `epochs`: a resumed run must ask for the same number
    config = {"kind": "topk_sae", "concepts": concepts, "k": k, "lr": float(lr), "batch_size": batch_size,
              "seed": seed, "auxk_alpha": float(auxk_alpha), "epochs": epochs, "data": _fingerprint(x_all)}
    run_dir = Path(out_dir) if out_dir is not None else None
    history: list[dict] = []
    start = 0
    resumed_from = None
    step = 0
    if run_dir is not None:
        _, blob = open_run_dir(run_dir, config, resume)
        if blob is not None:
            sae.load_state_dict(blob["model"])
            optimizer.load_state_dict(blob["optimizer"])
            since_fired = blob["since_fired"].clone()
            history = list(blob["history"])
            start = resumed_from = int(blob["epoch"])
            step = int(blob["step"])
    xs = x_all / norm_factor

    if not history:
        history.append({"epoch": 0, **_stats(sae, xs), "dead": None, "loss": None, "lr": 0.0, "seconds": 0.0})
        if run_dir is not None:
            _save(run_dir, 0, step, sae, optimizer, since_fired, history, config, FORMAT, _atomic_save)

    show = progress and _progress._enabled
    bar = tqdm(total=(epochs - start) * steps_per_epoch, desc="sae", unit="batch", delay=1.0, leave=False,
               disable=None if show else True, dynamic_ncols=True)
    try:
        for epoch in range(start + 1, epochs + 1):
            te = time.perf_counter()
            order = torch.randperm(n, generator=torch.Generator().manual_seed(_key(seed, epoch, "sae-shuffle")))
            loss_sum = 0.0
            for idx in order.split(batch_size):
                x = xs[idx]
                for group in optimizer.param_groups:
                    group["lr"] = lr * lr_factor(step, total, warmup, decay_start)
                codes, pre, kept = sae.encode(x, return_pre=True)
                residual = x - sae.decode(codes)
                loss = residual.pow(2).sum(-1).mean()
                # dictionary_learning counts every top-k index as fired (even at value 0)
                fired = torch.zeros(concepts, dtype=torch.bool)
                fired[kept.flatten()] = True
                since_fired += len(idx)
                since_fired[fired] = 0
                if auxk_alpha > 0:
                    loss = loss + auxk_alpha * _auxk_loss(sae, residual.detach(), pre, since_fired >= dead_threshold)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                w = sae.decoder.weight
                w.grad = _remove_parallel_gradient(w.detach(), w.grad)
                torch.nn.utils.clip_grad_norm_(sae.parameters(), 1.0)
                optimizer.step()
                with torch.no_grad():
                    w.copy_(_unit_columns(w))
                step += 1
                loss_sum += float(loss.detach()) * len(idx)
                bar.update(1)
            row = {"epoch": epoch, **_stats(sae, xs), "dead": int((since_fired >= dead_threshold).sum()),
                   "loss": loss_sum / n, "lr": lr * lr_factor(step - 1, total, warmup, decay_start),
                   "seconds": time.perf_counter() - te}
            history.append(row)
            if run_dir is not None:
                _save(run_dir, epoch, step, sae, optimizer, since_fired, history, config, FORMAT, _atomic_save)
            if callback is not None:
                callback("epoch", dict(row))
    finally:
        bar.close()
    sae.eval()
    return SAETrainResult(sae, history, run_dir, resumed_from, norm_factor, time.perf_counter() - t0)


def _auxk_loss(sae: TopKSAE, residual: torch.Tensor, pre: torch.Tensor, dead: torch.Tensor) -> torch.Tensor:
    """dictionary_learning TopKTrainer.get_auxiliary_loss (FaCT: top_k_aux = 256)."""
    n_dead = int(dead.sum())
    if n_dead == 0:
        return residual.new_zeros(())
    k_aux = min(TOP_K_AUX, n_dead)
    masked = torch.where(dead[None], pre, torch.full_like(pre, -math.inf))
    top = masked.topk(k_aux, dim=-1, sorted=False)
    aux_codes = torch.zeros_like(pre).scatter(-1, top.indices, top.values)
    l2_aux = (residual - sae.decoder(aux_codes)).pow(2).sum(-1).mean()
    denom = (residual - residual.mean(0, keepdim=True)).pow(2).sum(-1).mean()
    return (l2_aux / denom).nan_to_num(0.0)


@torch.no_grad()
def _stats(sae: TopKSAE, xs: torch.Tensor) -> dict:
    """Fraction of variance explained (FaCT's log_stats), mean squared error and L0 on all rows."""
    codes = sae.encode(xs)
    err = xs - sae.decode(codes)
    total = xs.var(0).sum()
    return {"fve": float(1 - err.var(0).sum() / total) if total > 0 else None,
            "mse": float(err.pow(2).sum(-1).mean()), "l0": float((codes != 0).sum(-1).float().mean())}


def _save(run_dir, epoch, step, sae, optimizer, since_fired, history, config, fmt, atomic_save):
    folder = run_dir / "checkpoints"
    folder.mkdir(exist_ok=True)
    atomic_save({"format": fmt, "epoch": epoch, "step": step, "model": sae.state_dict(),
                 "optimizer": optimizer.state_dict(), "since_fired": since_fired.clone(), "history": history,
                 "config": config}, folder / f"epoch_{epoch:03d}.pt")
