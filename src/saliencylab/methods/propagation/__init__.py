"""Propagation methods: layer-wise relevance propagation with rules, composites and canonizers.

- `rules`: how one layer passes relevance to its inputs (epsilon, z-plus, alpha-beta, gamma, flat,
  w-square, z-box); the pass rule for activations lives in `lrp`.
- `composites`: which rule each layer gets (named composites after Zennit, or a user dict).
- `canonizers`: revertible model edits that put a model in canonical form (BatchNorm merging).
- `lrp`: the method (`method="lrp"`).
"""

from .composites import COMPOSITES, Composite, make_composite  # noqa: F401
from .lrp import LRP  # noqa: F401
from .rules import AlphaBeta, Epsilon, Flat, Gamma, Rule, WSquare, ZBox, ZPlus  # noqa: F401
