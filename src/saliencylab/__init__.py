"""saliencylab: explain PyTorch vision models and measure whether the explanations are faithful.

`import saliencylab as sl` gives `sl.explain`, `sl.evaluate` and the packages `sl.methods`,
`sl.metrics`, `sl.baselines`, and on first use `sl.models`, `sl.images`, `sl.envs`, `sl.features`.
"""

import importlib

from .core.progress import set_progress
from .api import evaluate, explain
from .core.errors import ConfigError, InputError, SaliencyLabError
from .core.explanation import Explanation
from .core.session import Cost, ModelSession
from . import baselines, methods, metrics

__version__ = "0.1.0"

# Imported on first use: they load weights, photos or environments that `import saliencylab` need not pay for.
_LAZY = ("models", "images", "envs", "features", "evaluation", "report", "runs")


def __getattr__(name):
    if name in _LAZY:
        return importlib.import_module(f".{name}", __name__)
    raise AttributeError(f"module 'saliencylab' has no attribute '{name}'")


def __dir__():
    return sorted(list(globals()) + list(_LAZY))


__all__ = [
    "explain", "evaluate", "Explanation", "ModelSession", "Cost", "methods", "metrics", "baselines", "set_progress",
    "SaliencyLabError", "InputError", "ConfigError", "__version__", *_LAZY,
]
