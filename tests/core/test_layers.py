"""core.layers: the resolver, the probe, declared layouts and the default-layer policies."""

import pytest
import torch
from torch import nn

import saliencylab as sl
from saliencylab.core.errors import ConfigError
from saliencylab.core.layers import (DEFAULT_LAYER_POLICIES, LayerInfo, find_default_layer, get_layer,
                                     probe_layers, resolve_layers, to_grid)
from saliencylab.core.session import ModelSession


def net():
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(),
        nn.Sequential(nn.Conv2d(4, 4, 3, padding=1), nn.ReLU()),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3),
    ).double().eval()


def test_resolver_names_modules_and_lists():
    model = net()
    assert resolve_layers(model, "2.0") == [("2.0", model[2][0])]
    assert resolve_layers(model, model[2][1]) == [("2.1", model[2][1])]
    assert resolve_layers(model, ["0", model[5], "2"]) == [("0", model[0]), ("5", model[5]), ("2", model[2])]
    assert get_layer(model, "2.1") is model[2][1] and get_layer(model, model[0]) is model[0]
    with pytest.raises(ConfigError, match=r"no layer named '2\.3'; did you mean '2\.1', '2\.0'"):
        resolve_layers(model, "2.3")
    with pytest.raises(ConfigError, match="did you mean '2.0'"):
        resolve_layers(model, ["0", "2,0"])  # one misspelt name in a list
    with pytest.raises(ConfigError, match="not a submodule"):
        resolve_layers(model, nn.ReLU())  # a module of another model
    with pytest.raises(ConfigError, match="not a submodule"):
        resolve_layers(model, model)  # the whole model is not a layer
    with pytest.raises(ConfigError, match="dotted module name"):
        resolve_layers(model, 3)
    with pytest.raises(ConfigError, match="no layer given"):
        resolve_layers(model, [])


def test_probe_lists_calls_in_order_with_shapes_layouts_and_gradients():
    model = net()
    x = torch.randn(1, 3, 8, 8, dtype=torch.float64)
    with ModelSession(model) as session:
        plain = probe_layers(session, x)
        assert session.cost.backward_images == 0
        probed = probe_layers(session, x, 1)
        assert session.cost.forward_images == 2 and session.cost.backward_images == 1
    assert all(isinstance(i, LayerInfo) for i in plain)
    assert [i.name for i in plain] == ["0", "1", "2.0", "2.1", "2", "3", "4", "5"]
    assert plain[0].shape == (1, 4, 8, 8) and plain[0].layout == "nchw" and plain[0].module is model[0]
    assert [i.layout for i in plain[5:]] == [None, None, None]  # (1, 4, 1, 1), (1, 4), (1, 3): not spatial
    assert all(i.has_gradient is None for i in plain)
    assert [i.has_gradient for i in probed[:5]] == [True] * 5
    assert not any(m._forward_hooks for m in model.modules())  # the probe's hooks lived in a scope


def test_default_layer_policies():
    model = net()
    x = torch.randn(1, 3, 8, 8, dtype=torch.float64)
    with ModelSession(model) as session:
        assert find_default_layer(session, x, None) == "2"  # the block's output: last spatial call
        assert find_default_layer(session, x, 0, policy="last_spatial") == "2"
        with pytest.raises(ConfigError, match="did you mean last_spatial"):
            find_default_layer(session, x, 0, policy="last_spatal")
    assert set(DEFAULT_LAYER_POLICIES) >= {"last_spatial_with_gradient", "last_spatial"}


class TwoHeads(nn.Module):
    """Class 0 reads branch `a`, class 1 branch `b` (called later): the default layer depends on the target."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(1)
        self.a = nn.Conv2d(3, 2, 3, padding=1)
        self.b = nn.Conv2d(3, 2, 3, padding=1)

    def forward(self, x):
        return torch.stack([self.a(x).mean((1, 2, 3)), self.b(x).mean((1, 2, 3))], 1)


def test_default_layer_follows_each_calls_target():
    model = TwoHeads().double()
    x = torch.randn(2, 3, 6, 6, dtype=torch.float64)
    method = sl.methods.build("gradcam", model, relu=False)
    assert method.explain(x, 1).extras["layer"] == "b"
    assert method.explain(x, 0).extras["layer"] == "a"  # not the previous call's layer
    assert method.explain(x, 1).extras["layer"] == "b"
    assert sl.methods.build("gradcam", model, default_layer="last_spatial").explain(x, 0).extras["layer"] == "b"


class ChannelsLastStage(nn.Module):
    """A channels-last output (B, h, w, C) with fewer channels than rows: the shape heuristic reads it
    as (B, C, h, w); a declared layout reads it right."""

    def __init__(self, declare=None):
        super().__init__()
        torch.manual_seed(2)
        self.stem = nn.Conv2d(3, 2, 3, stride=3)  # 12x12 -> (B, 2, 4, 4)
        self.stage = Permute()
        if declare is not None:
            self.stage.saliency_layout = declare
        self.head = nn.Linear(2, 3)

    def forward(self, x):
        t = self.stage(self.stem(x))  # (B, 4, 4, 2)
        return self.head(torch.tanh(t).mean((1, 2)))


class Permute(nn.Module):
    def forward(self, x):
        return x.permute(0, 2, 3, 1)


def test_declared_layout_wins_over_the_heuristic():
    t = torch.randn(2, 4, 4, 2)
    assert to_grid(t, (12, 12)).shape == (2, 4, 4, 2)  # guessed: nchw with 4 channels (wrong here)
    assert torch.equal(to_grid(t, (12, 12), "nhwc"), t.permute(0, 3, 1, 2))
    m = Permute()
    m.saliency_layout = "nhwc"
    assert torch.equal(to_grid(t, (12, 12), module=m), t.permute(0, 3, 1, 2))
    assert to_grid(t, (12, 12), "nchw", module=m) is t  # the caller's layout first
    with pytest.raises(ConfigError, match="declared layout 'tokens'"):
        to_grid(t, (12, 12), "tokens")
    with pytest.raises(ConfigError, match="unknown layout"):
        to_grid(t, (12, 12), "hwc")

    x = torch.randn(3, 3, 12, 12, dtype=torch.float64)
    reference = sl.explain(ChannelsLastStage().double(), x, "layercam", layer="stem", target=1)
    declared = sl.explain(ChannelsLastStage("nhwc").double(), x, "layercam", layer="stage", target=1)
    passed = sl.explain(ChannelsLastStage().double(), x, "layercam", layer="stage", layout="nhwc", target=1)
    guessed = sl.explain(ChannelsLastStage().double(), x, "layercam", layer="stage", target=1)
    assert declared.lowres.shape == passed.lowres.shape == (3, 4, 4) and guessed.lowres.shape == (3, 4, 2)
    torch.testing.assert_close(declared.lowres, reference.lowres)
    torch.testing.assert_close(passed.lowres, reference.lowres)
    assert reference.lowres.abs().max() > 0
    with pytest.raises(ConfigError, match="unknown layout"):
        sl.methods.build("layercam", ChannelsLastStage(), layout="channels_last")
    with pytest.raises(ConfigError, match="unknown layout"):
        sl.explain(ChannelsLastStage("chw").double(), x, "layercam", layer="stage")
