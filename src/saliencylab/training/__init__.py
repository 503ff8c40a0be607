"""Training with explanations: losses on a model's explanations for the caller's own training loop.

- `guidance_loss` (model guidance, Rao et al. ICCV 2023): pulls the explanation of each image's class
  into its annotated boxes; losses `GUIDANCE_LOSSES` = energy, l1, rrr, ppce.
- `distillation_loss` (explanation-enhanced distillation, Parchami-Araghi et al. ECCV 2024):
  cross-entropy + T^2 KL(teacher || student) + (1 - cosine(student map, teacher map)).

Both return a scalar that backpropagates to the trained model's parameters; the explanation is any
differentiable method (`saliencylab.methods.available(differentiable=True)`).

>>> import torch
>>> from torch import nn
>>> from saliencylab.training import guidance_loss, distillation_loss
>>> torch.manual_seed(0)  # doctest: +ELLIPSIS
<...>
>>> net = lambda: nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 4, 3, padding=1),
...                             nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 2))
>>> model, teacher = net(), net()
>>> x, y = torch.rand(4, 3, 16, 16), torch.tensor([0, 1, 1, 0])
>>> boxes = torch.tensor([[2, 2, 10, 10]] * 4)              # (x0, y0, x1, y1) pixels, x1/y1 exclusive
>>> opt = torch.optim.SGD(model.parameters(), lr=0.1)
>>> loss = nn.functional.cross_entropy(model(x), y) + 1e-2 * guidance_loss(model, x, y, boxes=boxes)
>>> loss.backward(); opt.step(); opt.zero_grad()
>>> guide, logits = guidance_loss(model, x, y, boxes=boxes, with_logits=True)   # one forward pass
>>> (nn.functional.cross_entropy(logits, y) + 1e-2 * guide).backward(); opt.step(); opt.zero_grad()
>>> loss = distillation_loss(model, teacher, x, y, method="gradcam", student_layer="2", teacher_layer="2")
>>> loss.backward(); opt.step(); opt.zero_grad()
"""

from .distillation import distillation_loss, teacher_targets
from .guidance import GUIDANCE_LOSSES, guidance_loss

__all__ = ["guidance_loss", "distillation_loss", "teacher_targets", "GUIDANCE_LOSSES"]
