"""Extremal perturbation: smooth mask generator, area levels, batching, pass counts, known region."""

import pytest
import torch
from torch import nn

import saliencylab as sl
from saliencylab.core.errors import ConfigError
from saliencylab.methods import build
from saliencylab.methods.extremal import SmoothMaskGenerator, area_reference
from zoo import RegionModel
from zoo import sequential_cnn


@pytest.fixture(autouse=True)
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def tiny_cnn(seed=0):
    return sequential_cnn(seed, batchnorm=False, pool=2, classes=4, dtype=torch.float64)




def test_generator_is_smooth_and_local():
    gen = SmoothMaskGenerator((24, 24), step=4, sigma=6.0, dtype=torch.float64)
    assert gen.shape_in == (6, 6)
    ones = gen(torch.ones(1, 1, 6, 6, dtype=torch.float64))
    assert (ones[..., 4:-4, 4:-4] > 0.98).all()  # the smooth max of kernels slightly below 1 between nodes
    p = torch.zeros(1, 1, 6, 6, dtype=torch.float64)
    p[0, 0, 2, 3] = 1.0
    m = gen(p)[0, 0]
    assert 0 <= m.min() and m.max() <= 1
    ys = torch.arange(24, dtype=torch.float64)
    cy, cx = float((m.sum(1) * ys).sum() / m.sum()), float((m.sum(0) * ys).sum() / m.sum())
    assert abs(cy - 9.5) < 0.5 and abs(cx - 13.5) < 0.5  # node (2, 3) sits at (2*4+1.5, 3*4+1.5)
    assert m[9:11, 13:15].min() > 0.99  # a flat top within sigma/2 of the node
    assert m[0, 0] < 1e-6 and m[23, 23] < 1e-6
    assert (m.diff(dim=0).abs().max() < 0.35) and (m.diff(dim=1).abs().max() < 0.35)  # no hard edges


def test_area_reference():
    ref = area_reference((0.25, 0.5), 8)
    assert ref.tolist() == [[0, 0, 0, 0, 0, 0, 1, 1], [0, 0, 0, 0, 1, 1, 1, 1]]


def test_mask_finds_the_relevant_region():
    rows, cols = slice(4, 14), slice(16, 26)
    model = RegionModel(rows, cols).double()
    torch.manual_seed(0)
    x = 0.1 * torch.randn(2, 3, 32, 32, dtype=torch.float64)
    x[0, :, rows, cols] += 2.0
    x[1, :, rows, cols] += 1.6
    relevant = torch.zeros(32, 32, dtype=torch.bool)
    relevant[rows, cols] = True
    # jitter off: this model is not flip invariant, the flipped image has its region elsewhere
    method = build("extremal_perturbation", model, areas=(0.1,), steps=100, step=4, sigma=6.0, jitter=False)
    e = method.explain(x, target=1)
    maps = e.maps
    share = (maps * relevant).sum((1, 2)) / maps.sum((1, 2))
    assert (share > 0.5).all(), share  # the region is 10% of the image
    assert e.lowres.shape == (2, 8, 8) and e.extras["params"].shape == (2, 1, 8, 8)
    area = e.extras["masks"].mean((2, 3))
    assert torch.allclose(area, torch.full_like(area, 0.1), atol=0.05)


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


def test_params_keep_the_constructor_input():
    model = tiny_cnn()
    m = build("extremal_perturbation", model, areas=0.2, steps=3)
    assert m.params == {"areas": 0.2, "steps": 3} and m.areas == (0.2,)
    again = type(m)(model, **m.params)
    assert again.areas == (0.2,) and again.steps == 3
