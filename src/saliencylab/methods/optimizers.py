"""Element-wise optimizer pieces shared by the optimisation methods (I-GOS, iGOS++, extremal perturbation).

Every piece works on a batch of independent problems, one per row (an image, or an image and an area
level): a row's step size, acceptance and momentum never depend on another row, so an image's result
does not depend on the batch it is in.

- `armijo_search`: the backtracking (Armijo) line search of I-GOS / iGOS++, per row. Which pass
  evaluates a candidate (forward only, or forward+backward whose gradient the next iteration reuses,
  or the AAAI code's clean deletion score) is the caller's `evaluate`; the loop is the same, and its
  stopping rule is both codes': a candidate whose step fell below `step_min` is taken unchecked.
- `momentum_step`: heavy-ball SGD with dampening, exactly `torch.optim.SGD(momentum=m, dampening=d)`,
  written out so the state is an explicit tensor (TorchRay's extremal perturbation uses it).
- `nesterov_step`: the I-GOS authors' accelerated gradient ("nag") step.
- `Adam`, `RMSprop`: torch.optim's update rules, element-wise (the IBA family's bottleneck, readout and
  InputIBA stages).
"""

from __future__ import annotations

import math
from typing import Callable

import torch

__all__ = ["armijo_search", "momentum_step", "nesterov_step", "Adam", "RMSprop"]

# evaluate(rows, steps, attempt) -> (values (n,), extra tensors with n leading rows)
Evaluate = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], tuple]


def armijo_search(loss: torch.Tensor, slope: torch.Tensor, step: torch.Tensor, evaluate: Evaluate, *,
                  decay: float, step_min: float):
    """Per-row backtracking line search.

    loss (B,): the objective at the current point; slope (B,): the Armijo slope `c |g|^2`;
    step (B,): each row's first trial step. `evaluate(rows, steps, attempt)` evaluates the candidates
    of the rows still searching (`rows` (n,) indices, their `steps` (n,), `attempt` (n,) how many
    candidates each row has tried before) and returns `(values (n,), extras)`, extras a tuple of
    tensors with n leading rows (e.g. the candidate's score and gradient, to reuse when accepted).

    A row accepts its step when `value <= loss - step * slope`, or once the step has fallen below
    `step_min` (then the last candidate is accepted, as in the authors' code); otherwise its step is
    multiplied by `decay` and it tries again. Rows search independently; all rows still searching are
    evaluated together. Returns `(steps (B,), tried (B,) long, accepted extras, each (B, ...))`.
    """
    B = loss.shape[0]
    a = step.clone()
    tried = torch.zeros(B, dtype=torch.long, device=loss.device)
    pending = torch.ones(B, dtype=torch.bool, device=loss.device)
    accepted: list = []
    while pending.any():
        rows = pending.nonzero()[:, 0]
        values, extras = evaluate(rows, a[rows], tried[rows])
        tried[rows] += 1
        fail = (values > loss[rows] - a[rows] * slope[rows]) & (a[rows] >= step_min)
        ok = rows[~fail]
        if not accepted:
            accepted = [e.new_zeros((B, *e.shape[1:])) for e in extras]
        for store, e in zip(accepted, extras):
            store[ok] = e[~fail]
        pending[:] = False
        pending[rows[fail]] = True
        a[rows[fail]] *= decay
    return a, tried, tuple(accepted)


def momentum_step(params: torch.Tensor, grad: torch.Tensor, buf: torch.Tensor | None, *, lr: float,
                  momentum: float, dampening: float = 0.0):
    """One SGD step with momentum, as torch.optim.SGD (first step: buf = grad, undampened).

    Returns (new params, new momentum buffer); clamping or projecting is the caller's."""
    buf = grad.clone() if buf is None else momentum * buf + (1 - dampening) * grad
    return params - lr * buf, buf


def nesterov_step(params: torch.Tensor, grad: torch.Tensor, theta_prev: torch.Tensor | None, *, lr: float,
                  iteration: int):
    """The I-GOS authors' accelerated step: theta = P - lr g; P' = theta + it/(it+3) (theta - theta_prev).

    Returns (new params before projection, theta)."""
    theta = params - lr * grad
    if theta_prev is None:
        return theta, theta
    e = iteration / (iteration + 3)
    return theta + e * (theta - theta_prev), theta


class Adam:
    """torch.optim.Adam's update rule (defaults, no weight decay/amsgrad), element-wise.

    Kept local because constructing a torch.optim optimizer imports torch._dynamo, which costs seconds
    on a small CPU for a ten-step optimisation. Element-wise state means one Adam over a stacked
    (B, ...) tensor is exactly B independent optimisers.
    """

    def __init__(self, params, lr: float = 1e-3, betas=(0.9, 0.999), eps: float = 1e-8):
        self.params = [p for p in params]
        self.lrs = [lr] * len(self.params)
        self.betas, self.eps, self.t = betas, eps, 0
        self.m = [torch.zeros_like(p) for p in self.params]
        self.v = [torch.zeros_like(p) for p in self.params]

    @torch.no_grad()
    def step(self, grads=None) -> None:
        grads = [p.grad for p in self.params] if grads is None else list(grads)
        self.t += 1
        b1, b2 = self.betas
        c1, c2 = 1 - b1**self.t, math.sqrt(1 - b2**self.t)
        for p, g, m, v, lr in zip(self.params, grads, self.m, self.v, self.lrs):
            if g is None:
                continue
            m.lerp_(g, 1 - b1)
            v.mul_(b2).addcmul_(g, g, value=1 - b2)
            p.addcdiv_(m, (v.sqrt() / c2).add_(self.eps), value=-lr / c1)


class RMSprop:
    """torch.optim.RMSprop's update rule (alpha 0.99, eps 1e-8, no momentum), with a learning rate per
    parameter (the InputIBA generator's parameter groups)."""

    def __init__(self, params, lrs, alpha: float = 0.99, eps: float = 1e-8):
        self.params = list(params)
        self.lrs = list(lrs) if isinstance(lrs, (list, tuple)) else [lrs] * len(self.params)
        self.alpha, self.eps = alpha, eps
        self.sq = [torch.zeros_like(p) for p in self.params]

    @torch.no_grad()
    def step(self, grads=None) -> None:
        grads = [p.grad for p in self.params] if grads is None else list(grads)
        for p, g, sq, lr in zip(self.params, grads, self.sq, self.lrs):
            if g is None:
                continue
            sq.mul_(self.alpha).addcmul_(g, g, value=1 - self.alpha)
            p.addcdiv_(g, sq.sqrt().add_(self.eps), value=-lr)
