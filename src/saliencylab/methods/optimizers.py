"""Element-wise optimizer pieces shared by the optimisation methods (I-GOS, iGOS++, extremal perturbation).

Every piece works on a batch of independent problems, one per row (an image, or an image and an area
level): a row's step size, acceptance and momentum never depend on another row, so an image's result
does not depend on the batch it is in.

- `armijo_search`: the backtracking (Armijo) line search of I-GOS / iGOS++, per row. Which pass
  evaluates a candidate (forward only, or forward+backward whose gradient the next iteration reuses)
  is the caller's `evaluate`; the loop is the same.
- `momentum_step`: heavy-ball SGD with dampening, exactly `torch.optim.SGD(momentum=m, dampening=d)`,
  written out so the state is an explicit tensor (TorchRay's extremal perturbation uses it).
- `nesterov_step`: the I-GOS authors' accelerated gradient ("nag") step.
"""

from __future__ import annotations

from typing import Callable

import torch

__all__ = ["armijo_search", "momentum_step", "nesterov_step"]

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

