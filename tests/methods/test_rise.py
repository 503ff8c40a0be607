"""RISE: the authors' masks, a slow obviously-correct reference, seeding, chunking, a known answer."""

import math

import pytest
import torch
from torch import nn

import saliencylab as sl
from conftest import make_small_cnn
from saliencylab.methods.rise import RiseMasks, rise_grids
from zoo import PatchMeanModel as PatchModel


@pytest.fixture
def x64():  # an odd size (10 x 11): RISE's grid cells do not divide it
    torch.manual_seed(1)
    return torch.randn(3, 3, 10, 11, dtype=torch.float64)


def slow_mask(grid, dy, dx, H, W):
    """One RISE mask, pixel by pixel: bilinear upsampling of the s x s grid to (s + 1) * ceil(size / s)
    with half-pixel centres and mirror reflection at the border (skimage resize(order=1, mode="reflect")),
    cropped at (dy, dx)."""
    s = len(grid)
    up_h, up_w = (s + 1) * math.ceil(H / s), (s + 1) * math.ceil(W / s)

    def mirror(i):
        if s == 1:
            return 0
        while i < 0 or i > s - 1:
            i = -i if i < 0 else 2 * (s - 1) - i
        return i

    def taps(o, up):
        src = (o + 0.5) * s / up - 0.5
        i = math.floor(src)
        t = src - i
        return [(mirror(i), 1 - t), (mirror(i + 1), t)]

    mask = torch.zeros(H, W, dtype=torch.float64)
    for y in range(H):
        for x in range(W):
            mask[y, x] = sum(wy * wx * float(grid[iy][ix])
                             for iy, wy in taps(y + dy, up_h) for ix, wx in taps(x + dx, up_w))
    return mask


def test_matches_a_slow_reference(model64, x64):
    n, cell, p, seed = 24, 3, 0.4, 5
    ours = sl.explain(model64, x64, "rise", target=[0, 1, 2], masks=n, cell=cell, probability=p, seed=seed,
                      batch_size=10)
    grids, shifts = rise_grids(n, cell, p, seed, (10, 11))  # the random draws are shared; the rest is redone
    ref = torch.zeros(3, 10, 11, dtype=torch.float64)
    with torch.no_grad():
        for k in range(n):
            mask = slow_mask(grids[k].tolist(), int(shifts[k, 0]), int(shifts[k, 1]), 10, 11)
            for b, target in enumerate([0, 1, 2]):
                score = model64(x64[b:b + 1] * mask).softmax(1)[0, target]
                ref[b] += score * mask
    ref /= n * p
    torch.testing.assert_close(ours.maps, ref, atol=1e-12, rtol=1e-10)
    assert ours.cost.forward_images == 3 * (1 + n) and ours.cost.backward_images == 0


def test_masks_are_the_authors_masks():
    """eclique/RISE generate_masks: resize(grid, (s+1)*cell_size, order=1, mode='reflect', anti_aliasing=False)."""
    resize = pytest.importorskip("skimage.transform").resize
    H, W, s = 37, 29, 7
    grids, shifts = rise_grids(30, s, 0.5, 0, (H, W))
    masks = RiseMasks(grids, shifts, (H, W), torch.float64)(torch.arange(30))[:, 0]
    up = ((s + 1) * math.ceil(H / s), (s + 1) * math.ceil(W / s))
    for k in range(30):
        dy, dx = shifts[k].tolist()
        ref = resize(grids[k].numpy(), up, order=1, mode="reflect", anti_aliasing=False)[dy:dy + H, dx:dx + W]
        torch.testing.assert_close(masks[k], torch.from_numpy(ref), atol=1e-12, rtol=0)
    assert ((shifts[:, 0] >= 0) & (shifts[:, 0] < math.ceil(H / s))).all()
    assert abs(float(grids.mean()) - 0.5) < 0.05


def test_seeded_and_chunking_invariant(model64, x64):
    a = sl.explain(model64, x64, "rise", masks=50, seed=3, batch_size=7).maps
    b = sl.explain(model64, x64, "rise", masks=50, seed=3, batch_size=64).maps
    c = sl.explain(model64, x64, "rise", masks=50, seed=4).maps
    torch.testing.assert_close(a, b, atol=1e-12, rtol=0)
    assert not torch.allclose(a, c)


def test_same_masks_for_every_image(model64, x64):
    """An image's map does not depend on the other images in the batch."""
    both = sl.explain(model64, x64, "rise", target=[0, 1, 2], masks=40).maps
    alone = sl.explain(model64, x64[2:], "rise", target=[2], masks=40).maps
    torch.testing.assert_close(both[2:], alone, atol=1e-12, rtol=0)


def test_bad_parameters():
    model = make_small_cnn()
    for bad in ({"masks": 0}, {"cell": 0}, {"probability": 0}, {"probability": 1.5}, {"score": "nope"}):
        with pytest.raises(sl.ConfigError):
            sl.methods.build("rise", model, **bad)
    with pytest.raises(sl.ConfigError, match="channels"):
        sl.explain(model, torch.randn(1, 3, 8, 8), "rise", masks=4, channels=True)




def test_maximum_inside_the_relevant_patch():
    torch.manual_seed(0)
    x = torch.rand(2, 3, 16, 16) + 0.5
    maps = sl.explain(PatchModel(), x, "rise", target=0, masks=1000).maps
    for m in maps:
        r, c = divmod(int(m.argmax()), 16)
        assert 9 <= r < 13 and 3 <= c < 7
    occ = sl.explain(PatchModel(), x, "occlusion", target=0, window=4, stride=2).maps
    for m in occ:
        r, c = divmod(int(m.argmax()), 16)
        assert 9 <= r < 13 and 3 <= c < 7
