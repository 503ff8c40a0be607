"""B-cos explanations: the contributions W(x) * x of a B-cos network's dynamic linear map.

Boehle, Fritz, Schiele (CVPR 2022; TPAMI 2024, B-cos v2). In explanation mode every B-cos layer's
dynamic scale |cos|^(b - 1) is held fixed for the input gradient, so the network is linear in its
input, logit = W(x) . x + bias, and input x gradient gives the contributions W(x) * x. As the authors
(B-cos v2 `bcos/common.py`, `BcosUtilMixin.explain`): the gradient is taken w.r.t. the *encoded* input
(the output of `AddInverse`, 6 channels (r, g, b, 1-r, 1-g, 1-b)), and the contribution map is the sum
of encoded input x W(x) over those 6 channels, (B, H, W). The sum over all pixels and channels equals
the target logit minus the model's constant logit bias, to float precision (nothing is approximated).

Channels: with `channels=True` the maps are (B, 3, H, W), each colour channel's contribution plus its
inverse's (x_c W_c + (1 - x_c) W_{c+3}); their sum over channels is the authors' map. A model without
an `AddInverse` module (its input already encoded) is explained w.r.t. that input, channels unfolded.
`return_weights=True` puts W(x) in `extras["weights"]` and the encoded input in `extras["encoded"]`
((B, 6, H, W) each, detached; `saliencylab.models.bcos.gradient_to_image` colours them).

Deliberate differences from the authors:
- Explanation mode is a session edit (each layer's `detach` flag set through the ModelSession,
  undone at exit), not the authors' persistent `explanation_mode()` switch; the user's model is
  unchanged afterwards. Models built from the authors' own layers (v1 or v2, with a `detach` flag)
  are explained the same way.
- Batched (one forward and backward per `batch_size` images, any targets); the authors' `explain`
  takes one image.
- create_graph=True: on our layers the maps carry their true gradient w.r.t. the parameters: a first
  forward records every layer's input x, a second applies each layer's linear map W(x) to the
  encoded input (`forward_linearised`), so the scales are fixed for the input gradient but stay
  differentiable in the parameters (two forwards, one backward). The authors' detach (used here for
  their own layers) would cut the parameters' gradient through the scales.
  Rao et al.'s model-guidance code (sukrutrao/Model-Guidance `attribution_methods.py`,
  `BCosAttributor`) takes the gradient of a forward run outside explanation mode, i.e. plain
  input x gradient of the 6-channel input; that is not what this method computes.
- Exactness holds for logit targets (the default); a callable target's score is explained the same
  way but is not a sum of contributions unless it is linear in the logits.
"""

from __future__ import annotations

from typing import ClassVar

import torch

from ..core.errors import ConfigError
from ..core.explanation import Explanation
from ..core.targets import resolve_target, slice_target
from ..models.bcos import AddInverse, is_bcos_module
from .base import Method, Param, check_batch_size, register

__all__ = ["Bcos", "is_bcos_model", "find_encoder"]


def is_bcos_model(model: torch.nn.Module) -> bool:
    """Whether `model` has B-cos layers (modules with an explanation-mode `detach` flag)."""
    return any(is_bcos_module(m) for m in model.modules())


def find_encoder(model: torch.nn.Module) -> tuple[str, torch.nn.Module] | None:
    """The first (x, 1 - x) input encoding module of `model` (ours, or any class named AddInverse)."""
    for name, module in model.named_modules():
        if isinstance(module, AddInverse) or type(module).__name__ == "AddInverse":
            return name, module
    return None


@register
class Bcos(Method):
    name = "bcos"
    description = ("B-cos contributions W(x) * x of a B-cos network (explanation mode, exact: they sum to "
                   "the target logit minus the logit bias); B-cos models only.")
    differentiable = True
    # The model this method needs (the contract tests build one; other methods need none).
    requires: ClassVar[str | None] = "bcos_model"

    batch_size = Param(32, "images per forward+backward pass")
    return_weights = Param(False, "put W(x) and the encoded input (B, 6, H, W) in extras['weights'] / ['encoded']")

    def check(self):
        check_batch_size(self.batch_size)
        if not isinstance(self.return_weights, bool):
            raise ConfigError(f"return_weights must be True or False, got {self.return_weights!r}")
        if not is_bcos_model(self.model):
            raise ConfigError(
                f"method 'bcos' needs a B-cos network (B-cos layers such as saliencylab.models.bcos.BcosConv2d, "
                f"e.g. BcosCNN); {type(self.model).__name__} has none")

    def compute(self, session, x, target):
        with torch.enable_grad():  # the input gradient is the explanation, even under torch.no_grad()
            return self._compute(session, x, target)

    def _compute(self, session, x, target):
        layers = [m for m in self.model.modules() if is_bcos_module(m)]
        # create_graph=True: our layers replay W(x) z (the scales differentiable in the parameters);
        # otherwise (and for layers without `forward_linearised`) the authors' detached scales.
        replay = [m for m in layers if session.differentiable and callable(getattr(m, "forward_linearised", None))]
        for module in layers:
            if module not in replay:
                session.set_attr(module, "detach", True)  # explanation mode, undone at the session's exit
        encoder = find_encoder(self.model)
        maps, weights, encoded, outputs, classes = [], [], [], [], []
        for start in range(0, x.shape[0], self.batch_size):
            inputs = x[start:start + self.batch_size].detach()
            with session.scope():  # the edits of this chunk's passes end with it
                if replay:
                    values = self._record(session, replay, inputs)
                store = session.capture({"encoded": encoder[1]}) if encoder is not None else None
                if store is None:
                    inputs.requires_grad_(True)
                out = session.forward(inputs)
            resolved = resolve_target(slice_target(target, start, start + len(inputs), len(x)),
                                      values if replay else out)
            enc = inputs if store is None else store.get("encoded")
            if enc is None or not enc.requires_grad:
                raise ConfigError(f"the model's {type(encoder[1]).__name__} module was not called on the input")
            w = session.grad(resolved(out), enc)  # W(x): the dynamic linear map's row for the target
            contributions = enc.detach() * w
            maps.append(self._fold(contributions, inputs) if store is not None else contributions)
            if self.return_weights:
                weights.append(w.detach())
                encoded.append(enc.detach())
            outputs.append(out.detach())
            classes.append(resolved.classes)
        extras = {"weights": torch.cat(weights), "encoded": torch.cat(encoded)} if self.return_weights else {}
        return Explanation(maps=torch.cat(maps), targets=None if classes[0] is None else torch.cat(classes),
                           outputs=torch.cat(outputs), extras=extras)

    @staticmethod
    def _record(session, layers, inputs):
        """A plain forward that records every layer's inputs (the values, with their graph), then
        each layer's forward becomes W(x) z at its recorded x for the next pass (session edits)."""
        recorded = {m: [] for m in layers}
        with session.scope():
            for m in layers:
                session.hook(m, lambda module, args, output: recorded[module].append(args[0]))
            values = session.forward(inputs)
        for m in layers:
            queue = recorded[m]
            session.set_attr(m, "forward", lambda z, m=m, queue=queue: m.forward_linearised(z, queue.pop(0)))
        return values

    @staticmethod
    def _fold(contributions: torch.Tensor, inputs: torch.Tensor) -> torch.Tensor:
        """(B, 2C, H, W) contributions of (x, 1 - x) -> (B, C, H, W): each channel plus its inverse."""
        C = inputs.shape[1]
        if contributions.shape[1] != 2 * C or contributions.shape[-2:] != inputs.shape[-2:]:
            raise ConfigError(f"the model's AddInverse gave {tuple(contributions.shape[1:])} for an input of "
                              f"{tuple(inputs.shape[1:])}; expected {2 * C} channels at the input's size")
        return contributions[:, :C] + contributions[:, C:]
