"""Composites: which rule each layer of a model gets.

A composite maps layers to rules by module name (a dotted path, most specific), by module type
(the first matching entry in order), and gives the first layer its own rule. Layers it does not
name get LRP-0 (`Epsilon(0)`), which in this implementation is the plain gradient of the layer
(see `lrp.py`). Named composites follow Zennit's of the same names (its composites.py):

- `epsilon_plus`: convolutions z-plus, dense layers epsilon.
- `epsilon_plus_flat`: the same, first layer flat.
- `epsilon_gamma_box`: first layer z-box (input bounds `low`, `high`), convolutions gamma (0.25), dense
  layers epsilon.
- `epsilon_alpha2_beta1`: convolutions alpha 2 beta 1, dense layers epsilon.
- `epsilon_alpha2_beta1_flat`: the same, first layer flat.
- `epsilon`: every layer epsilon; `zplus`: every layer z-plus.

Zennit's stabiliser default (epsilon 1e-6) is the default here. A user composite is a dict
{module type or dotted name or "first": rule or rule name}, or a `Composite`.
"""

from __future__ import annotations

from torch import nn

from ...core.errors import ConfigError
from .rules import AlphaBeta, Epsilon, Flat, Gamma, Rule, ZBox, ZPlus, make_rule

CONVOLUTIONS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
LINEAR_LAYERS = CONVOLUTIONS + (nn.Linear,)


class Composite:
    """`rules`: {module type or dotted module name: rule}; `first`: the first layer's rule (None: its
    ordinary rule). Names win over types; among types the first match in order wins."""

    def __init__(self, rules: dict | None = None, first: Rule | str | None = None, name: str = "custom"):
        self.name = name
        self.by_name: dict[str, Rule] = {}
        self.by_type: list[tuple[type, Rule]] = []
        for key, rule in (rules or {}).items():
            if key == "first":
                first = rule
            elif isinstance(key, str):
                self.by_name[key] = make_rule(rule)
            elif isinstance(key, type) and issubclass(key, nn.Module):
                self.by_type.append((key, make_rule(rule)))
            else:
                raise ConfigError(f"composite keys are module types, dotted module names or 'first'; got {key!r}")
        self.first = None if first is None else make_rule(first)

    def rule_for(self, name: str, module: nn.Module) -> Rule:
        if name in self.by_name:
            return self.by_name[name]
        for kind, rule in self.by_type:
            if isinstance(module, kind):
                return rule
        return Epsilon(0.0)

    def check_names(self, names) -> None:
        unknown = sorted(set(self.by_name) - set(names))
        if unknown:
            raise ConfigError(f"composite names layers the model does not have: {', '.join(unknown)}")

    def __repr__(self) -> str:
        return f"Composite({self.name})"


def epsilon_plus(epsilon=1e-6, **_):
    return Composite({**{c: ZPlus() for c in CONVOLUTIONS}, nn.Linear: Epsilon(epsilon)}, name="epsilon_plus")


def epsilon_plus_flat(epsilon=1e-6, **_):
    c = epsilon_plus(epsilon)
    c.first, c.name = Flat(), "epsilon_plus_flat"
    return c


def epsilon_gamma_box(epsilon=1e-6, gamma=0.25, low=None, high=None, **_):
    if low is None or high is None:
        raise ConfigError("the epsilon_gamma_box composite needs the input bounds low= and high= (the lowest and "
                          "highest pixel values in the model's input space, numbers or per-channel tensors)")
    return Composite({**{c: Gamma(gamma) for c in CONVOLUTIONS}, nn.Linear: Epsilon(epsilon)},
                     first=ZBox(low, high), name="epsilon_gamma_box")


def epsilon_alpha2_beta1(epsilon=1e-6, **_):
    return Composite({**{c: AlphaBeta(2.0, 1.0) for c in CONVOLUTIONS}, nn.Linear: Epsilon(epsilon)},
                     name="epsilon_alpha2_beta1")


def epsilon_alpha2_beta1_flat(epsilon=1e-6, **_):
    c = epsilon_alpha2_beta1(epsilon)
    c.first, c.name = Flat(), "epsilon_alpha2_beta1_flat"
    return c


def epsilon_only(epsilon=1e-6, **_):
    return Composite({nn.Module: Epsilon(epsilon)}, name="epsilon")


def zplus_only(**_):
    return Composite({nn.Module: ZPlus()}, name="zplus")


COMPOSITES = {
    "epsilon_plus": epsilon_plus,
    "epsilon_plus_flat": epsilon_plus_flat,
    "epsilon_gamma_box": epsilon_gamma_box,
    "epsilon_alpha2_beta1": epsilon_alpha2_beta1,
    "epsilon_alpha2_beta1_flat": epsilon_alpha2_beta1_flat,
    "epsilon": epsilon_only,
    "zplus": zplus_only,
}


def make_composite(spec, **settings) -> Composite:
    """A Composite from a name (built with `settings`: epsilon, gamma, low, high), a dict or a Composite."""
    if isinstance(spec, Composite):
        return spec
    if isinstance(spec, dict):
        return Composite(spec)
    if isinstance(spec, str) and spec in COMPOSITES:
        return COMPOSITES[spec](**settings)
    raise ConfigError(f"unknown composite {spec!r}; use one of {', '.join(COMPOSITES)}, a dict "
                      "{module type or name: rule} or a Composite")
