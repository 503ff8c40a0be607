"""Occlusion against captum.attr.Occlusion, its pass count, chunking and a model with a known answer."""

import warnings

import pytest
import torch
from torch import nn

import saliencylab as sl
from conftest import make_small_cnn
from saliencylab.methods.occlusion import occlusion_masks, window_offsets
from zoo import PatchMeanModel as PatchModel

captum_attr = pytest.importorskip("captum.attr")
warnings.filterwarnings("ignore", module="captum")

TARGETS = [0, 1, 2]


def n_windows(size, window, stride):
    return len(window_offsets(size[0], window[0], stride[0])) * len(window_offsets(size[1], window[1], stride[1]))


# (4, 2): the stride divides 12 - 4; (5, 3): it does not (12 - 5 = 7), so the last window is cut by
# the border; ((5, 4), (3, 2)): rectangular windows and strides, neither divides.
@pytest.mark.parametrize("window,stride", [((4, 4), (2, 2)), ((5, 5), (3, 3)), ((5, 4), (3, 2))])
def test_occlusion_matches_captum(model64, x64, window, stride):
    ref = captum_attr.Occlusion(model64).attribute(x64, sliding_window_shapes=(3, *window), strides=(3, *stride),
                                                   baselines=0, target=TARGETS)
    ours = sl.explain(model64, x64, "occlusion", target=TARGETS, window=window, stride=stride, channels=True)
    # Captum divides in float32 at the end; everything else is float64.
    torch.testing.assert_close(ours.maps, ref.to(torch.float64), atol=1e-5, rtol=0)
    assert (ours.maps - ref.to(torch.float64)).abs().max() < 1e-6
    windows = n_windows((12, 12), window, stride)
    assert ours.cost.forward_images == 3 * (1 + windows)  # one clean forward + one per window, per image
    assert ours.cost.backward_images == 0 and ours.cost.backward_calls == 0
    # the channel-summed map is the sum of Captum's (identical) channels
    summed = sl.explain(model64, x64, "occlusion", target=TARGETS, window=window, stride=stride).maps
    torch.testing.assert_close(summed, ref.to(torch.float64).sum(1), atol=1e-5, rtol=0)


def test_window_larger_than_image_is_clamped(model64, x64):
    ref = captum_attr.Occlusion(model64).attribute(x64, sliding_window_shapes=(3, 12, 12), strides=(3, 8, 8),
                                                   baselines=0, target=TARGETS)
    ours = sl.explain(model64, x64, "occlusion", target=TARGETS, window=16, stride=8, channels=True)
    torch.testing.assert_close(ours.maps, ref.to(torch.float64), atol=1e-5, rtol=0)
    assert ours.cost.forward_images == 3 * 2


def test_chunking_does_not_change_the_map(model64, x64):
    one = sl.explain(model64, x64, "occlusion", target=TARGETS, window=5, stride=3, batch_size=1)
    big = sl.explain(model64, x64, "occlusion", target=TARGETS, window=5, stride=3, batch_size=500)
    torch.testing.assert_close(one.maps, big.maps, atol=1e-12, rtol=0)
    assert one.cost.forward_images == big.cost.forward_images == 3 * (1 + 16)
    assert one.cost.forward_calls == 1 + 3 * 16 and big.cost.forward_calls == 2


def test_border_windows_are_cut_not_moved():
    tops = window_offsets(12, 5, 3)
    assert tops.tolist() == [0, 3, 6, 9]  # Captum: ceil((12 - 5) / 3) + 1 starts; the last covers rows 9..11
    keep = occlusion_masks(tops[3:], torch.tensor([0]), (5, 5), (12, 12))[0, 0]
    assert (~keep).sum() == 3 * 5 and (~keep[9:, :5]).all()


def test_bad_parameters():
    model = make_small_cnn()
    with pytest.raises(sl.ConfigError, match="stride"):
        sl.methods.build("occlusion", model, window=4, stride=5)
    with pytest.raises(sl.ConfigError, match="window"):
        sl.methods.build("occlusion", model, window=0)
    with pytest.raises(sl.ConfigError, match="score"):
        sl.methods.build("occlusion", model, score="probability")




def test_maximum_inside_the_relevant_patch():
    torch.manual_seed(0)
    x = torch.rand(2, 3, 16, 16) + 0.5
    maps = sl.explain(PatchModel(), x, "occlusion", target=0, window=4, stride=2, score="softmax").maps
    for m in maps:
        r, c = divmod(int(m.argmax()), 16)
        assert 9 <= r < 13 and 3 <= c < 7
