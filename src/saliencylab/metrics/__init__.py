"""Evaluation metrics, registered by name: faithfulness, sanity, localization, complexity, ground truth.

>>> from saliencylab import metrics
>>> metrics.available()
>>> scores = saliencylab.evaluate(model, x, maps, metric="deletion", steps=50)
"""

from .base import (CATEGORIES, Measurement, Metric, Param, available, build, describe, get,  # noqa: F401
                   missing_requirements, parameters, register, registry, requirements)

# Importing the family modules registers their metrics.
from . import faithfulness, road, soundness, sensitivity, sanity, localization, complexity, groundtruth  # noqa: F401,E402
from . import counterfactual  # noqa: F401,E402
