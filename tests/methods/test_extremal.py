"""Extremal perturbation: smooth mask generator, area levels, batching, pass counts, known region, baselines.

The comparison with TorchRay's semantics is in test_extremal_reference.py."""

import pytest
import torch
from torch import nn

import saliencylab as sl
from saliencylab.core.errors import ConfigError, InputError
from saliencylab.methods import build
from saliencylab.methods.extremal import SmoothMaskGenerator, area_reference
from zoo import PatchModel, RegionModel
from zoo import sequential_cnn


pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_cnn(seed=0):
    return sequential_cnn(seed, batchnorm=False, pool=2, classes=4, dtype=torch.float64)




def test_generator_is_smooth_and_local():
    gen = SmoothMaskGenerator((24, 24), step=4, sigma=6.0, dtype=torch.float64)
    assert gen.shape_in == (6, 6)
    ones = gen(torch.ones(1, 1, 6, 6, dtype=torch.float64))
    assert (ones[..., :-2, :-2] > 0.95).all()  # the soft max of kernels is slightly below 1 between nodes
    p = torch.zeros(1, 1, 6, 6, dtype=torch.float64)
    p[0, 0, 2, 3] = 1.0
    m = gen(p)[0, 0]
    assert 0 <= m.min() and m.max() <= 1
    ys = torch.arange(24, dtype=torch.float64)
    cy, cx = float((m.sum(1) * ys).sum() / m.sum()), float((m.sum(0) * ys).sum() / m.sum())
    assert abs(cy - 8) < 0.5 and abs(cx - 12) < 0.5  # node (2, 3) sits at (2*4, 3*4), as in TorchRay
    assert m[7:10, 11:14].min() > 0.99  # a flat top within sigma/2 of the node
    assert m[0, 0] < 1e-4 and m[23, 23] < 1e-4
    assert (m.diff(dim=0).abs().max() < 0.35) and (m.diff(dim=1).abs().max() < 0.35)  # no hard edges


def test_area_reference():
    ref = area_reference((0.25, 0.5), 8)
    assert ref.tolist() == [[0, 0, 0, 0, 0, 0, 1, 1], [0, 0, 0, 0, 1, 1, 1, 1]]


def stripes_model(rows, cols, size=32):
    """Class 0's logit = 0.1 x the match of channel 0 with horizontal stripes (+1/-1 by row) on
    rows x cols: blur erases the pattern, so only that region keeps the score. The stripes do not
    change under a horizontal flip and cols is centred, so TorchRay's jitter (flips) is harmless."""
    sign = (-1.0) ** torch.arange(size, dtype=torch.float32)[:, None].expand(size, size)
    relevant = torch.zeros(size, size, dtype=torch.bool)
    relevant[rows, cols] = True
    w = torch.zeros(3, size, size)
    w[0] = 0.1 * sign * relevant
    return PatchModel(w), sign * relevant, relevant


def test_default_parameters_find_the_region_on_a_small_image():
    """On 32x32 the defaults scale (step 1, sigma 3, max blur 2.9): most of the mask is on the 10x10
    region that decides the class. The 224-pixel values (step 7, sigma 21, blur 20) put 11% there."""
    model, pattern, relevant = stripes_model(slice(3, 13), slice(11, 21))
    torch.manual_seed(0)
    x = 0.3 * torch.randn(1, 3, 32, 32)
    x[:, 0] += pattern
    e = build("extremal_perturbation", model).explain(x, target=0)
    share = (e.maps * relevant).sum((1, 2)) / e.maps.sum((1, 2))
    assert (share > 0.5).all(), share  # the region is 10% of the image
    assert e.lowres.shape == (1, 32, 32) and e.extras["params"].shape == (1, 1, 32, 32)
    # area 0.1 of the canvas (38 x 38 at this size): 144 pixels, 14% of the image
    area = e.extras["masks"].mean((2, 3))
    assert torch.allclose(area, torch.full_like(area, 0.141), atol=0.03), area


def test_mask_finds_the_relevant_region_with_explicit_geometry():
    model, pattern, relevant = stripes_model(slice(4, 14), slice(16, 26))
    model = model.double()
    torch.manual_seed(0)
    x = 0.3 * torch.randn(2, 3, 32, 32, dtype=torch.float64)
    x[:, 0] += pattern * torch.tensor([1.0, 0.9], dtype=torch.float64).view(2, 1, 1)
    # jitter off: the region is off-centre, the flipped image has it elsewhere
    method = build("extremal_perturbation", model, areas=(0.1,), steps=200, step=4, sigma=6.0, jitter=False)
    e = method.explain(x, target=0)
    share = (e.maps * relevant).sum((1, 2)) / e.maps.sum((1, 2))
    inside = (e.maps * relevant).sum((1, 2)) / relevant.sum()
    # the soft mask spills over the region's edges (and, near the border, onto the canvas margin)
    assert (share > 0.4).all() and (inside > 0.8).all(), (share, inside)
    assert e.lowres.shape == (2, 8, 8) and e.extras["params"].shape == (2, 1, 8, 8)


def test_per_image_baseline_tensor():
    model = tiny_cnn()
    torch.manual_seed(4)
    x = torch.randn(2, 3, 12, 12, dtype=torch.float64)
    base = torch.randn(2, 3, 12, 12, dtype=torch.float64)
    kw = dict(steps=5, step=3, sigma=4.0, areas=(0.2,))
    both = build("extremal_perturbation", model, baseline=base, **kw).explain(x, target=1)
    for j in range(2):
        one = build("extremal_perturbation", model, baseline=base[j:j + 1], **kw).explain(x[j:j + 1], target=1)
        assert torch.allclose(both.maps[j], one.maps[0], atol=1e-10)
    swapped = build("extremal_perturbation", model, baseline=base.flip(0), **kw).explain(x, target=1)
    assert not torch.allclose(both.maps, swapped.maps, atol=1e-4)
    with pytest.raises(InputError, match="baseline"):
        build("extremal_perturbation", model, baseline=base[:, :, :5], **kw).explain(x)


@pytest.mark.parametrize("variant", ["preserve", "delete", "dual"])
def test_batched_over_images_and_areas_matches_separate_runs(variant):
    model = tiny_cnn()
    torch.manual_seed(1)
    x = torch.randn(2, 3, 12, 12, dtype=torch.float64)
    kw = dict(steps=6, step=3, sigma=4.0, variant=variant)
    both = build("extremal_perturbation", model, areas=(0.1, 0.3), batch_size=5, **kw).explain(x)
    for j in range(2):
        for a, area in enumerate((0.1, 0.3)):
            one = build("extremal_perturbation", model, areas=(area,), batch_size=1, **kw).explain(x[j:j + 1])
            assert torch.allclose(both.extras["masks"][j, a], one.extras["masks"][0, 0], atol=1e-10)
    auto = build("extremal_perturbation", model, areas=(0.1, 0.3), batch_size=None, **kw).explain(x)
    assert torch.allclose(auto.maps, both.maps, atol=1e-10)


@pytest.mark.parametrize("variant,sides", [("preserve", 1), ("dual", 2)])
def test_pass_counts(variant, sides):
    model = tiny_cnn()
    x = torch.randn(3, 3, 12, 12, dtype=torch.float64)
    e = sl.explain(model, x, "extremal_perturbation", areas=(0.1, 0.2), steps=4, variant=variant)
    rows = 3 * 2 * sides * 4
    assert e.cost.backward_images == rows
    assert e.cost.forward_images == 3 + rows
    assert e.maps.shape == (3, 12, 12)


def test_bad_parameters():
    model = tiny_cnn()
    with pytest.raises(ConfigError, match="areas"):
        build("extremal_perturbation", model, areas=(0.0,))
    with pytest.raises(ConfigError, match="variant"):
        build("extremal_perturbation", model, variant="both")
    with pytest.raises(ConfigError, match="sigma"):
        build("extremal_perturbation", model, sigma=0)
    with pytest.raises(ConfigError, match="max_blur"):
        build("extremal_perturbation", model, max_blur=-1.0)
    with pytest.raises(ConfigError, match="levels"):
        build("extremal_perturbation", model, levels=1)


def test_params_keep_the_constructor_input():
    model = tiny_cnn()
    m = build("extremal_perturbation", model, areas=0.2, steps=3)
    assert m.params == {"areas": 0.2, "steps": 3} and m.areas == (0.2,)
    again = type(m)(model, **m.params)
    assert again.areas == (0.2,) and again.steps == 3
