"""Extremal perturbation against a port of TorchRay's semantics (formulas, written here independently).

Reference: facebookresearch/TorchRay, torchray/attribution/extremal_perturbation.py (MaskGenerator,
Perturbation, extremal_perturbation) and torchray/utils.py (imsmooth).
"""

import math

import pytest
import torch

from saliencylab.methods import build
from saliencylab.methods.extremal import SmoothMaskGenerator
from zoo import sequential_cnn


pytestmark = pytest.mark.usefixtures("one_thread")


# -- the port ----------------------------------------------------------------------------------
def port_geometry(shape, step, sigma):
    margin = sigma
    padding = 1 + math.ceil((margin + sigma) / step)
    radius = 1 + math.ceil(sigma / step)
    shape_in = [math.ceil(z / step) for z in shape]
    shape_mid = [z + 2 * padding - (2 * radius + 1) + 1 for z in shape_in]
    shape_out = [step * z - step + 1 for z in shape_mid]
    return margin, padding, radius, shape_in, shape_out


def covering(shape, step, sigma):
    """TorchRay's canvas, extended at the bottom/right where its crop would fall off it (TorchRay fails)."""
    margin, _, _, _, shape_out = port_geometry(shape, step, sigma)
    return [max(o, round(margin) + z) for o, z in zip(shape_out, shape)]


def port_masks(pmask, shape, step, sigma):
    """(cropped, canvas) masks: canvas pixel u uses the nodes floor(u/step) + o - padding (0 off the
    grid) placed at margin + step * node, kernel exp(-2 max(0, d/sigma - 1/2)^2), softmax pooling with
    coldness 20, clamp to [0, 1], crop at round(margin)."""
    margin, padding, radius, shape_in, _ = port_geometry(shape, step, sigma)
    Ho, Wo = covering(shape, step, sigma)
    n = pmask.shape[0]
    uy = torch.arange(Ho, dtype=torch.float64)[:, None].expand(Ho, Wo)
    ux = torch.arange(Wo, dtype=torch.float64)[None, :].expand(Ho, Wo)
    terms = []
    for oy in range(2 * radius + 1):
        for ox in range(2 * radius + 1):
            iy = torch.floor(uy / step).long() + oy - padding
            ix = torch.floor(ux / step).long() + ox - padding
            inside = (iy >= 0) & (iy < shape_in[0]) & (ix >= 0) & (ix < shape_in[1])
            value = pmask[:, 0, iy.clamp(0, shape_in[0] - 1), ix.clamp(0, shape_in[1] - 1)] * inside
            d = torch.sqrt((uy - (margin + step * iy)) ** 2 + (ux - (margin + step * ix)) ** 2)
            terms.append(value * torch.exp(-2 * torch.clamp(d / sigma - 0.5, min=0) ** 2))
    v = torch.stack(terms, 1)
    canvas = (v * torch.softmax(20 * v, dim=1)).sum(1, keepdim=True).clamp(0, 1)
    m = round(margin)
    return canvas[:, :, m:m + shape[0], m:m + shape[1]], canvas


def port_smooth(x, sigma):
    """imsmooth: taps |i| <= ceil(4 sigma), exp(-(i / (sqrt2 sigma + eps))^2), zero padding; written as
    banded matrices acting on rows and columns."""
    if sigma == 0:
        return x
    w = math.ceil(4 * sigma)
    eps = 1.19209290e-07

    def band(n):
        i = torch.arange(n, dtype=torch.float64)
        off = i[None, :] - i[:, None]
        taps = torch.exp(-(torch.arange(-w, w + 1, dtype=torch.float64) / (math.sqrt(2) * sigma + eps)) ** 2)
        k = torch.exp(-(off / (math.sqrt(2) * sigma + eps)) ** 2) / taps.sum()
        return k * (off.abs() <= w)

    H, W = x.shape[-2:]
    return band(H) @ x @ band(W).T


def port_pyramid(x, levels, max_blur, kind="blur"):
    out = []
    for s in torch.linspace(0, 1, levels).tolist():
        out.append(port_smooth(x, (1 - s) * max_blur) if kind == "blur" else x * s)
    return torch.cat(out, 0)  # (L, C, H, W)


def port_apply(pyramid, mask):
    """Linear interpolation of the levels at mask * (L - 1), as hat functions of the level index."""
    L = pyramid.shape[0]
    w = mask * (L - 1)  # (K, 1, H, W)
    hats = torch.stack([torch.relu(1 - (w - l).abs()) for l in range(L)], 1)  # (K, L, 1, H, W)
    return (hats * pyramid[None]).sum(1)


def port_extremal(model, x, target, areas, *, steps, step, sigma, max_blur, variant, kind="blur", jitter=True):
    """TorchRay's extremal_perturbation loop for one image (1, C, H, W)."""
    lr, momentum, weight = 0.01, 0.9, 300.0
    pyramid = port_pyramid(x, 8, max_blur, kind)
    shape = x.shape[2:]
    _, _, _, shape_in, _ = port_geometry(shape, step, sigma)
    shape_out = covering(shape, step, sigma)
    pmask = torch.ones(len(areas), 1, *shape_in, dtype=x.dtype)
    n = shape_out[0] * shape_out[1]
    reference = torch.ones(len(areas), n, dtype=x.dtype)
    for i, a in enumerate(areas):
        reference[i, :int(n * (1 - a))] = 0
    buf = None
    for t in range(steps):
        pmask.requires_grad_(True)
        mask_, mask = port_masks(pmask, shape, step, sigma)
        if variant == "preserve":
            xp = port_apply(pyramid, mask_)
        elif variant == "delete":
            xp = port_apply(pyramid, 1 - mask_)
        else:
            xp = torch.cat([port_apply(pyramid, mask_), port_apply(pyramid, 1 - mask_)], 0)
        if jitter and t % 2 == 0:
            xp = torch.flip(xp, dims=(3,))
        y = model(xp)[:, target]
        if variant == "delete":
            reward = -y
        elif variant == "dual":
            reward = y[:len(areas)] - y[len(areas):]
        else:
            reward = y
        regul = -((mask.reshape(len(areas), -1).sort(dim=1)[0] - reference) ** 2).mean(1) * weight
        (g,) = torch.autograd.grad(-(reward + regul).sum(), pmask)
        with torch.no_grad():  # torch.optim.SGD(momentum=0.9, dampening=0.9): first step buf = grad
            buf = g.clone() if buf is None else momentum * buf + (1 - momentum) * g
            pmask = (pmask - lr * buf).clamp(0, 1)
        weight *= 1.0035
    return mask_.detach(), -regul.detach()


# -- the tests ---------------------------------------------------------------------------------
@pytest.mark.parametrize("shape,step,sigma", [((24, 24), 2, 6.0), ((17, 23), 3, 4.5), ((224, 224), 7, 21.0),
                                              ((32, 32), 1, 3.0), ((24, 20), 4, 6.0)])
def test_mask_generator_matches_torchray(shape, step, sigma):
    torch.manual_seed(0)
    gen = SmoothMaskGenerator(shape, step, sigma, dtype=torch.float64)
    _, _, _, shape_in, shape_out = port_geometry(shape, step, sigma)
    assert list(gen.shape_in) == shape_in
    p = torch.rand(2, 1, *shape_in, dtype=torch.float64)
    p[1] = (p[1] > 0.7).double()  # sharp on/off nodes too
    ref, ref_canvas = port_masks(p, shape, step, sigma)
    ours = gen(p)
    assert ours.shape == (2, 1, *shape)
    assert torch.allclose(ours, ref, atol=1e-5), float((ours - ref).abs().max())
    assert list(gen.shape_out) == covering(shape, step, sigma)
    if step != 4:  # (24, 20) with step 4, sigma 6: TorchRay's canvas is 25 x 25, its 6-pixel crop falls off
        assert list(gen.shape_out) == shape_out
    ours_crop, ours_canvas = gen.generate(p)
    assert torch.equal(ours_crop, ours) and ours_canvas.shape == ref_canvas.shape
    assert torch.allclose(ours_canvas, ref_canvas, atol=1e-5)


def test_canvas_at_224_and_its_area_target():
    gen = SmoothMaskGenerator((224, 224), 7, 21.0)
    assert gen.shape_out == (260, 260) and gen.crop == 21
    # an isolated node sits at image pixel step * j (not at the centre of its step x step cell)
    p = torch.zeros(1, 1, 32, 32)
    p[0, 0, 10, 20] = 1
    m = gen(p)[0, 0]
    assert m[70, 140] == m.max() and m[70, 140] > 0.99
    assert torch.allclose(m[70, 120:161], m[70, 120:161].flip(0), atol=1e-6)  # symmetric about x = 140


@pytest.mark.parametrize("variant", ["preserve", "delete", "dual"])
def test_optimisation_matches_torchray(variant):
    """Five steps on two images and two areas: masks and area penalties equal the port's."""
    model = sequential_cnn(0, batchnorm=False, pool=2, classes=4, dtype=torch.float64)
    torch.manual_seed(2)
    x = torch.randn(2, 3, 17, 19, dtype=torch.float64)
    kw = dict(steps=5, step=3, sigma=4.5, max_blur=2.5)
    e = build("extremal_perturbation", model, areas=(0.1, 0.3), variant=variant, **kw).explain(x, target=1)
    for j in range(2):
        masks, regul = port_extremal(model, x[j:j + 1], 1, [0.1, 0.3], variant=variant, **kw)
        assert torch.allclose(e.extras["masks"][j], masks[:, 0], atol=1e-6), float(
            (e.extras["masks"][j] - masks[:, 0]).abs().max())
        assert torch.allclose(torch.tensor(e.extras["history"]["area_loss"][-1][2 * j:2 * j + 2],
                                           dtype=torch.float64), regul, rtol=1e-6)


def test_area_penalty_counts_the_whole_canvas():
    """With node values 1 the canvas is all 1, and the first penalty is weight * the canvas's share of
    zeros in the reference: (1 - a) of the canvas's pixels, not of the image's."""
    model = sequential_cnn(0, batchnorm=False, pool=2, classes=4, dtype=torch.float64)
    x = torch.randn(1, 3, 20, 20, dtype=torch.float64)
    e = build("extremal_perturbation", model, areas=(0.1,), steps=1, step=2, sigma=6.0).explain(x)
    Ho, Wo = port_geometry((20, 20), 2, 6.0)[4]
    n = Ho * Wo
    canvas = port_masks(torch.ones(1, 1, 10, 10, dtype=torch.float64), (20, 20), 2, 6.0)[1]
    expected = 300 * float(((canvas.flatten().sort()[0] - (torch.arange(n) >= int(n * 0.9)).double()) ** 2).mean())
    assert e.extras["history"]["area_loss"][0][0] == pytest.approx(expected, rel=1e-9)
    assert n > 2 * 400  # the canvas is much larger than the image here


def test_zero_baseline_is_torchrays_fade():
    model = sequential_cnn(1, batchnorm=False, pool=2, classes=4, dtype=torch.float64)
    torch.manual_seed(3)
    x = torch.randn(1, 3, 16, 16, dtype=torch.float64)
    kw = dict(steps=4, step=3, sigma=4.0)
    e = build("extremal_perturbation", model, areas=(0.2,), baseline="zero", **kw).explain(x, target=2)
    masks, _ = port_extremal(model, x, 2, [0.2], variant="preserve", kind="fade", max_blur=None, **kw)
    assert torch.allclose(e.extras["masks"][0], masks[:, 0], atol=1e-6)


def test_defaults_are_torchrays_at_224_and_scale_with_the_image():
    from saliencylab.methods.extremal import default_geometry

    assert default_geometry((224, 224)) == (7, 21.0, 20.0)
    assert default_geometry((224, 300)) == (7, 21.0, 20.0)  # the shorter side decides
    step, sigma, blur = default_geometry((32, 32))
    assert step == 1 and sigma == pytest.approx(3.0) and blur == pytest.approx(20 / 7)
    assert default_geometry((32, 32), step=4, sigma=6, max_blur=5) == (4, 6.0, 5.0)
    # the method uses them: node grid ceil(side / step)
    model = sequential_cnn(0, batchnorm=False, pool=2, classes=4)
    e = build("extremal_perturbation", model, steps=1).explain(torch.randn(1, 3, 64, 64))
    assert e.extras["params"].shape == (1, 1, 32, 32)  # step round(7 * 64 / 224) = 2
