"""saliencylab: explain PyTorch vision models and measure whether the explanations are faithful."""

from ._progress import set_progress
from .api import explain
from .errors import ConfigError, InputError, SaliencyLabError
from .explanation import Explanation
from .session import Cost, ModelSession
from . import baselines, methods

__version__ = "0.1.0"

__all__ = [
    "explain", "Explanation", "ModelSession", "Cost", "methods", "baselines", "set_progress",
    "SaliencyLabError", "InputError", "ConfigError", "__version__",
]
