"""The presets table: every name a registered method or metric, every parameter one it takes."""

from __future__ import annotations

import pytest

from saliencylab import methods, metrics, presets
from saliencylab.core.errors import ConfigError


def test_presets_table_is_complete():
    assert presets.names() == ["demo", "quick", "small-image", "photo", "full"]
    registered = set(methods.available())
    for preset in presets.names():
        table = presets.get(preset)
        assert set(table) <= registered, (preset, set(table) - registered)
        for method, params in table.items():
            known = methods.parameters(method)
            assert set(params) <= set(known), (preset, method, set(params) - set(known))
            for key, value in params.items():  # same kind of value as the default (ints stay ints)
                default = known[key]
                if default is not None and not isinstance(default, tuple):
                    assert isinstance(value, type(default)) or (isinstance(default, float) and
                                                                isinstance(value, int)), (preset, method, key)
    for preset, table in presets.METRIC_PRESETS.items():
        assert preset in presets.names()
        for metric, params in table.items():
            assert set(params) <= set(metrics.parameters(metric)), (preset, metric)


def test_demo_preset_covers_the_demo():
    assert set(presets.DEMO_METHODS) <= set(methods.available())
    # the costly defaults of the demo's methods are lowered
    for method, key in [("integrated_gradients", "steps"), ("smoothgrad", "samples"), ("igos", "iterations")]:
        assert presets.params("demo", method)[key] < methods.parameters(method)[key]
    # every method the quick preset lowers runs with fewer steps than at its defaults
    for method, params in presets.get("quick").items():
        defaults = methods.parameters(method)
        for key in ("steps", "samples", "masks", "epochs", "iterations"):
            if key in params:
                assert params[key] < defaults[key], (method, key)


def test_get_and_params_are_copies_and_names_are_checked():
    presets.get("demo")["igos"]["steps"] = 999
    presets.params("demo", "igos")["steps"] = 999
    assert presets.params("demo", "igos")["steps"] != 999
    assert presets.params("demo", "gradient") == {}  # not listed: the method's defaults
    assert presets.metric_params("quick", "deletion") == {"protocol": "igos", "steps": 2}
    assert presets.metric_params("photo", "deletion") == {}
    with pytest.raises(ConfigError, match="did you mean small-image"):
        presets.get("small_image")
    with pytest.raises(ConfigError, match="unknown preset"):
        presets.params("nope", "gradient")
