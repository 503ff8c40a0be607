"""saliencylab: explain PyTorch vision models and measure whether the explanations are faithful."""

from ._progress import set_progress
from .api import evaluate, explain
from .errors import ConfigError, InputError, SaliencyLabError
from .explanation import Explanation
from .session import Cost, ModelSession
from . import baselines, methods, metrics

__version__ = "0.1.0"

__all__ = [
    "explain", "evaluate", "Explanation", "ModelSession", "Cost", "methods", "metrics", "baselines", "set_progress",
    "SaliencyLabError", "InputError", "ConfigError", "__version__",
]
