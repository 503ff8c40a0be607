"""Environments whose relevant pixels are known by construction (the AttributionLab idea: data and
weights designed by hand), plus trained variants of the same data.

>>> from saliencylab import envs
>>> envs.available()
['dominant_colour', 'null_player', 'pattern_at_location']
>>> env = envs.load("dominant_colour")           # designed weights; trained=True fits a small CNN
>>> batch = env.sample(16, seed=0)
>>> ex = saliencylab.explain(env.model, batch.x, "integrated_gradients", target=batch.target)
>>> saliencylab.evaluate(None, batch.x, ex, "gt_precision", truth=batch.truth)
"""

from .base import Design, EnvBatch, Environment, available, describe, get, load, register, registry  # noqa: F401
from . import designed  # noqa: F401  (registers the designed environments)
from .shortcut import ShortcutData, group_accuracies, shortcut_data, worst_group_accuracy  # noqa: F401
