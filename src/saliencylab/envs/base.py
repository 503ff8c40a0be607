"""The environment contract and registry.

An environment is data whose relevant pixels are known by construction, plus a model that uses
them: `Design` subclasses describe the data (`sample`) and hand-set the weights (`designed_model`);
`load(name, trained=...)` wraps one in an `Environment`, with either the designed network or a
small CNN trained on the same data (see `envs.trained`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import torch
from torch import nn

from ..core.errors import ConfigError
from ..core.registry import Registry


DESIGNED_NOTE = ("designed weights: the network provably uses exactly the ground-truth pixels "
                 "(the tests check it by perturbation)")
TRAINED_NOTE = ("trained network: the truth maps are the designed, data-defined ones, and the trained "
                "network may not use exactly the designed features")


@dataclass
class EnvBatch:
    """A seeded batch with its ground truth for the target logit.

    `truth` (n, S, S) is signed: > 0 raises the target logit, < 0 lowers it, 0 contributes nothing
    at the pixel's current value. `null` marks pixels the network provably ignores (changing them to
    any value changes no logit); a background pixel has truth 0 but is only null where the network
    cannot see it. `relevant` and `negative` are derived from `truth`.
    """

    x: torch.Tensor          # (n, 3, S, S) float32 in [0, 1]
    labels: torch.Tensor     # (n,) long: the class by design
    truth: torch.Tensor      # (n, S, S) float32, signed
    null: torch.Tensor       # (n, S, S) bool
    target: torch.Tensor | None = None   # (n,) long: the class explained; defaults to labels
    relevant: torch.Tensor = field(init=False)
    negative: torch.Tensor = field(init=False)

    def __post_init__(self):
        if self.target is None:
            self.target = self.labels
        self.relevant = self.truth > 0
        self.negative = self.truth < 0

    def __len__(self) -> int:
        return self.x.shape[0]

    def to(self, device) -> "EnvBatch":
        return EnvBatch(x=self.x.to(device), labels=self.labels.to(device), truth=self.truth.to(device),
                        null=self.null.to(device), target=self.target.to(device))


class Design:
    """Base class: data with known relevant pixels and hand-set weights that use exactly them.

    Subclasses set the metadata and implement `_sample(n, generator) -> EnvBatch` (vectorized, all
    randomness from `generator`) and `designed_model() -> nn.Module`.
    """

    name: ClassVar[str] = ""
    description: ClassVar[str] = ""
    image_size: ClassVar[int] = 32
    num_classes: ClassVar[int] = 0
    class_names: ClassVar[tuple[str, ...]] = ()

    def sample(self, n: int, seed: int = 0) -> EnvBatch:
        if not isinstance(n, int) or isinstance(n, bool) or n < 1:
            raise ConfigError(f"n must be a positive int, got {n!r}")
        if not isinstance(seed, int) or isinstance(seed, bool):
            raise ConfigError(f"seed must be an int, got {seed!r}")
        return self._sample(n, torch.Generator().manual_seed(seed))

    def _sample(self, n: int, generator: torch.Generator) -> EnvBatch:
        raise NotImplementedError

    def designed_model(self) -> nn.Module:
        raise NotImplementedError


@dataclass
class Environment:
    """A design with its model. `accuracy` is 1.0 for designed models (by construction) and the
    held-out accuracy for trained ones."""

    name: str
    description: str
    image_size: int
    num_classes: int
    model: nn.Module
    design: Design = field(repr=False)
    trained: bool = False
    note: str = DESIGNED_NOTE
    accuracy: float = 1.0
    seed: int = 0
    class_names: tuple[str, ...] = ()

    def sample(self, n: int, seed: int = 0) -> EnvBatch:
        """n images with their ground truth; the same seed gives the same batch."""
        return self.design.sample(n, seed)


def _check_design(cls) -> None:
    if cls.num_classes < 2:
        raise TypeError(f"{cls.__name__} needs num_classes >= 2")


registry: Registry = Registry("environment", base=Design, skip=1, check=_check_design)
register = registry.register
get = registry.get
describe = registry.describe


def available() -> list[str]:
    return registry.available()


def load(name: str, trained: bool = False, seed: int = 0, model: str = "cnn") -> Environment:
    """The environment `name` with its designed network, or (trained=True) a small network trained on
    the same data from `seed` (cached in-process and on disk, see `envs.trained`): the CNN, or with
    model="vit" a small ViT (designed networks are CNNs: a ViT is always trained)."""
    if model != "cnn":
        from .trained import trained_environment

        return trained_environment(name, seed, model)
    design = get(name)()
    if not isinstance(seed, int) or isinstance(seed, bool):
        raise ConfigError(f"seed must be an int, got {seed!r}")
    common = dict(name=design.name, description=design.description, image_size=design.image_size,
                  num_classes=design.num_classes, design=design, seed=seed, class_names=design.class_names)
    if not trained:
        return Environment(model=design.designed_model().eval(), **common)
    from .trained import trained_model

    model, accuracy = trained_model(design, seed)
    return Environment(model=model, trained=True, note=TRAINED_NOTE, accuracy=accuracy, **common)
