"""Evaluation metrics, registered by name: faithfulness, sanity, localization, complexity, ground truth.

>>> from saliencylab import metrics
>>> metrics.available()
>>> scores = saliencylab.evaluate(model, x, maps, metric="deletion", steps=50)
"""

from .base import CATEGORIES, Metric, available, build, describe, get, parameters, register  # noqa: F401

for _family in ("faithfulness", "road", "soundness", "sensitivity", "sanity", "localization", "complexity", "groundtruth"):
    try:  # families register themselves once their module exists
        __import__(f"{__name__}.{_family}")
    except ModuleNotFoundError as _e:
        if _e.name != f"{__name__}.{_family}":
            raise
