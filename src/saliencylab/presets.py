"""Named cost presets: one table of method (and demo metric) parameters per use.

A preset maps a method name to the parameters it is built with; a method a preset does not list runs
at its defaults. Only cost knobs (steps, samples, masks, windows, epochs) and the sizes that must
follow the image size live here; data sources are not parameters of a preset (the demo passes
`features.sample_crops(...)` to the methods that take `data=`).

- "demo": `saliencylab demo` (and `make demo`): the full settings, with a shorter I-GOS, so the
  default method list runs on 3 photos in well under 3 minutes on a 2-core CPU.
- "quick": a smoke run of every method (a few steps and samples; the maps are rough).
- "small-image": the 32x32 ground-truth environments (small windows, cells and masks).
- "photo": 224x224 photos at a few hundred passes per image (the leaderboard's photo suites).
- "full": `saliencylab demo --full` and the leaderboard's `--full`: meaningful maps at a bounded cost.

>>> from saliencylab import presets
>>> presets.params("demo", "integrated_gradients")
{'steps': 16}
>>> methods.build("rise", model, **presets.params("photo", "rise"))
"""

from __future__ import annotations

import copy

from .core.errors import unknown_name

__all__ = ["PRESETS", "METRIC_PRESETS", "DEMO_METHODS", "DEMO_PHOTOS", "DEMO_DATA_SIZE", "names", "get", "params",
           "metric_params"]

# 224x224 photos, the demo's "full" settings: the sampling methods at 16 draws, the optimisations at
# a fraction of the authors' iterations (see README, Speed, for the passes per image).
_FULL = {
    "integrated_gradients": {"steps": 16},
    "smoothgrad": {"samples": 16},
    "vargrad": {"samples": 16},
    "squaregrad": {"samples": 16},
    "occlusion": {"window": 32, "stride": 16},
    "rise": {"masks": 500},
    "igos": {"steps": 8, "iterations": 10},
    "igos_plus_plus": {"steps": 8, "iterations": 5},
    "extremal_perturbation": {"steps": 200},
    "input_iba": {"steps": 20, "samples": 5, "gan_epochs": 2, "gan_size": 32, "gan_subset": 8, "gan_batch": 16},
    "structured_attention_graph": {"steps": 8},
    "score_cam": {"top_channels": 128},  # the 128 most varying of the head's 1280 channels
}

_IBA_QUICK = {"steps": 2, "samples": 2}

PRESETS: dict[str, dict[str, dict]] = {
    # I-GOS at 5 iterations of 8 integration steps: about a third of "full"'s passes; its deletion
    # score stays close, the mask is coarser.
    "demo": {**_FULL, "igos": {"steps": 8, "iterations": 5}},
    "quick": {
        "integrated_gradients": {"steps": 4},
        "smoothgrad": {"samples": 4},
        "vargrad": {"samples": 4},
        "squaregrad": {"samples": 4},
        "occlusion": {"window": 56, "stride": 56},
        "rise": {"masks": 8},
        "iba": _IBA_QUICK,
        "inverse_iba": _IBA_QUICK,
        "multilayer_iba": {"steps": 2, "samples": 1},
        "readout_iba": {"epochs": 1},
        "input_iba": {"feature_steps": 1, "steps": 2, "samples": 1, "gan_epochs": 1, "gan_size": 4, "gan_subset": 4,
                      "gan_batch": 4, "critic_iter": 1},
        "igos": {"steps": 2, "iterations": 2},
        "igos_plus_plus": {"steps": 2, "iterations": 1},
        "extremal_perturbation": {"steps": 4},
        "structured_attention_graph": {"steps": 2, "iterations": 1, "beam_width": 1, "candidates": 3,
                                       "max_patches": 2, "roots": 1, "depth": 1},
        "score_cam": {"top_channels": 16},  # one forward per channel (1280 at the embedded model's head)
        "prune_int": {"steps": 1},
    },
    "small-image": {
        "occlusion": {"window": 4, "stride": 2},
        "rise": {"masks": 1000, "cell": 4},
        "igos": {"size": 8},
        "igos_plus_plus": {"size": 8},
        "extremal_perturbation": {"step": 2, "sigma": 3.0, "steps": 300},
        "structured_attention_graph": {"size": 4},
    },
    "photo": {
        "integrated_gradients": {"steps": 16},
        "smoothgrad": {"samples": 16},
        "occlusion": {"window": 32, "stride": 32},
        "rise": {"masks": 128},
        "iba": {"samples": 5},
        "igos": {"steps": 4, "iterations": 5},
        "igos_plus_plus": {"steps": 4, "iterations": 3},
        "extremal_perturbation": {"steps": 100},
        "input_iba": {"steps": 10, "samples": 5, "gan_epochs": 1, "gan_size": 16, "gan_subset": 4, "gan_batch": 16},
    },
    "full": _FULL,
}

# The demo's deletion/insertion: the I-GOS protocol (28x28 ranking upsampled bilinearly, blurred baseline)
# at 31 cells per step (the authors: 15), for time; the leaderboard's "full" preset uses theirs.
_IGOS_25 = {"protocol": "igos", "steps": 25}
METRIC_PRESETS: dict[str, dict[str, dict]] = {
    "demo": {"deletion": _IGOS_25, "insertion": _IGOS_25},
    "quick": {"deletion": {"protocol": "igos", "steps": 2}, "insertion": {"protocol": "igos", "steps": 2}},
    "full": {"deletion": _IGOS_25, "insertion": _IGOS_25},
}

# `saliencylab demo` without --full: one or two methods per family, on the photos that have an ImageNet class.
DEMO_METHODS = ("gradient", "integrated_gradients", "smoothgrad", "gradcam", "occlusion", "iba", "igos")
DEMO_PHOTOS = ("chelsea", "coffee", "rocket")
# Crops of the bundled photos for the methods that estimate feature statistics (`data=`): 64 crops
# estimate one layer's mean and std in a few seconds (then cached on disk).
DEMO_DATA_SIZE = 64


def names() -> list[str]:
    """The preset names."""
    return list(PRESETS)


def get(name: str) -> dict[str, dict]:
    """A preset's table, method name -> parameters (a copy: changing it changes nothing here)."""
    if name not in PRESETS:
        raise unknown_name("preset", name, PRESETS)
    return copy.deepcopy(PRESETS[name])


def params(preset: str, method: str) -> dict:
    """The parameters `preset` gives `method` ({} when the method runs at its defaults)."""
    return get(preset).get(method, {})


def metric_params(preset: str, metric: str) -> dict:
    """The demo's parameters for a metric under `preset` ({}: the metric's defaults)."""
    if preset not in PRESETS:
        raise unknown_name("preset", preset, PRESETS)
    return copy.deepcopy(METRIC_PRESETS.get(preset, {}).get(metric, {}))
