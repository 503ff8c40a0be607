"""ROAD: the batched noisy linear imputation against exact solves, and the road metrics."""

import contextlib
import functools

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import PatchModel

import saliencylab
from saliencylab.core.errors import ConfigError
from saliencylab.perturbation import LinearImputer, solve_linear_imputation

# ROAD's neighbour weights, as (row offset, column offset, weight) (tleemann/road_evaluation)
OFFSETS = [(1, 1, 1 / 12), (0, 1, 1 / 6), (-1, 1, 1 / 12), (1, -1, 1 / 12), (0, -1, 1 / 6), (-1, -1, 1 / 12),
           (1, 0, 1 / 6), (-1, 0, 1 / 6)]


@contextlib.contextmanager
def one_thread():
    """Dense LAPACK solves of a few hundred unknowns: threads only add spin-waiting on a busy machine."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


@functools.lru_cache(maxsize=None)
def neighbour_matrix(H, W):
    """(HW, HW) float64: weight of pixel j in pixel i's equation, neighbours inside the image only."""
    r, c = torch.meshgrid(torch.arange(H), torch.arange(W), indexing="ij")
    r, c = r.flatten(), c.flatten()
    M = torch.zeros(H * W, H * W, dtype=torch.float64)
    for dr, dc, w in OFFSETS:
        rr, cc = r + dr, c + dc
        ok = (rr >= 0) & (rr < H) & (cc >= 0) & (cc < W)
        M[torch.arange(H * W)[ok], (rr * W + cc)[ok]] = w
    return M


def exact_imputation(x, keep):
    """The authors' system, dense: for every removed pixel i, sum_j w_ij (y_i - y_j) = 0 over the
    neighbours j inside the image (kept ones fixed). x (C, H, W) float64, keep (H, W) bool."""
    C, H, W = x.shape
    M = neighbour_matrix(H, W)
    holes, kept = (~keep).flatten(), keep.flatten()
    A = torch.diag(M.sum(1))[holes][:, holes] - M[holes][:, holes]
    xf = x.reshape(C, -1)
    b = M[holes][:, kept] @ xf[:, kept].T  # (U, C)
    out = xf.clone()
    with one_thread():
        out[:, holes] = torch.linalg.solve(A, b).T
    return out.view(C, H, W)


def hole_masks(B, H, W, seed):
    """Keep-masks with 30-90% removed: random pixels, large blobs, a border-touching rectangle, a
    single-pixel ring of kept pixels around a big hole."""
    g = torch.Generator().manual_seed(seed)
    masks = []
    for i in range(B):
        kind = i % 4
        frac = 0.3 + 0.6 * torch.rand(1, generator=g).item()
        if kind == 0:
            keep = torch.rand(H, W, generator=g) > frac
        elif kind == 1:  # smooth random field thresholded: large irregular holes
            f = F.interpolate(torch.randn(1, 1, 4, 4, generator=g), size=(H, W), mode="bicubic", align_corners=False)
            keep = f[0, 0] <= f.flatten().kthvalue(int(round((1 - frac) * H * W)) or 1).values
        elif kind == 2:  # a rectangle touching two borders
            keep = torch.ones(H, W, dtype=torch.bool)
            keep[: int(H * 0.8), int(W * 0.1):] = False
        else:  # everything removed but a ring one pixel inside the border and a few dots
            keep = torch.zeros(H, W, dtype=torch.bool)
            keep[1, 1:-1] = keep[-2, 1:-1] = keep[1:-1, 1] = keep[1:-1, -2] = True
            keep[H // 2, W // 3] = True
        masks.append(keep)
    return torch.stack(masks)


@pytest.mark.parametrize("size", [(16, 16), (13, 17)])
def test_batched_imputation_matches_the_exact_sparse_system(size):
    H, W = size
    g = torch.Generator().manual_seed(3)
    x = torch.rand(8, 3, H, W, generator=g, dtype=torch.float64) * 4 - 1  # value range 4
    keep = hole_masks(8, H, W, seed=H * W)
    removed = 1 - keep.double().mean((1, 2))
    assert removed.min() >= 0.2 and removed.max() >= 0.8
    ours = solve_linear_imputation(x, keep[:, None].double())
    exact = torch.stack([exact_imputation(x[i], keep[i]) for i in range(len(x))])
    err = (ours - exact).abs().max() / (x.max() - x.min())
    assert err < 1e-4, err
    tight = solve_linear_imputation(x, keep[:, None].double(), iterations=200, tol=1e-12)
    assert (tight - exact).abs().max() / (x.max() - x.min()) < 1e-9
    # kept pixels are untouched, bit for bit
    assert torch.equal(ours[keep[:, None].expand_as(x)], x[keep[:, None].expand_as(x)])


def test_float32_imputation_of_large_holes_is_accurate():
    # 40x40 with a 34x36 hole: plain Jacobi sweeps from the pyramid fill would need thousands
    torch.manual_seed(0)
    x = torch.rand(2, 3, 40, 40)
    keep = torch.ones(2, 40, 40, dtype=torch.bool)
    keep[0, 3:37, 2:38] = False
    keep[1] = torch.rand(40, 40) > 0.9
    ours = solve_linear_imputation(x, keep[:, None].float())
    assert ours.dtype == torch.float32
    for i in range(2):
        exact = exact_imputation(x[i].double(), keep[i])
        assert (ours[i].double() - exact).abs().max() < 1e-4


def test_agrees_with_quantus_noisy_linear_imputation():
    quantus = pytest.importorskip("quantus")
    from quantus.functions.perturb_func import noisy_linear_imputation

    torch.manual_seed(1)
    x = torch.rand(2, 3, 14, 12, dtype=torch.float64)
    keep = hole_masks(2, 14, 12, seed=5)
    ours = solve_linear_imputation(x, keep[:, None].double(), tol=1e-10, iterations=200)
    for i in range(2):
        indices = np.flatnonzero(~keep[i].numpy().ravel())
        theirs = noisy_linear_imputation(x[i].numpy().copy(), indices, noise=0.0)
        np.testing.assert_allclose(ours[i].numpy(), theirs, atol=1e-8)
    assert quantus.__version__


def test_imputed_rows_differ_only_where_pixels_were_removed():
    torch.manual_seed(2)
    x = torch.rand(6, 3, 20, 20)
    masks = (torch.rand(6, 1, 20, 20) > 0.6).float()
    imputer = LinearImputer(noise=0.01, seed=7)
    out = imputer.impute(x, masks, seed_rows=torch.arange(10, 16))
    keep = masks.bool().expand_as(x)
    assert torch.equal(out[keep], x[keep])
    assert (out[~keep] != x[~keep]).all()
    # the noise belongs to the row, not to the chunk: the same rows in two calls give the same values
    halves = torch.cat([imputer.impute(x[:2], masks[:2], seed_rows=torch.arange(10, 12)),
                        imputer.impute(x[2:], masks[2:], seed_rows=torch.arange(12, 16))])
    assert torch.equal(out, halves)
    # and its size is the one asked for: residual against the noiseless solution
    clean = LinearImputer(noise=0.0).impute(x, masks)
    resid = (out - clean)[~keep]
    assert abs(resid.std().item() - 0.01) < 0.001 and abs(resid.mean().item()) < 0.001
    # soft masks count as kept from 0.5 up
    assert torch.equal(LinearImputer(noise=0).impute(x, masks * 0.6 + 0.2), clean)


def test_nothing_kept_and_nothing_removed():
    x = torch.rand(2, 3, 8, 8)
    assert torch.equal(solve_linear_imputation(x, torch.ones(2, 1, 8, 8)), x)
    out = solve_linear_imputation(x, torch.zeros(2, 1, 8, 8))
    assert torch.isfinite(out).all()


# -- the metrics ------------------------------------------------------------------------------------
def patch_setup():
    torch.manual_seed(4)
    x = (torch.rand(4, 1, 8, 8) * 0.5 + 0.5) * torch.sign(torch.randn(4, 1, 8, 8))  # iid +-[0.5, 1]
    patch = torch.zeros(8, 8, dtype=torch.bool)
    patch[2:6, 3:7] = True
    # the weights match the first image's patch signs: the information sits in the pixel values,
    # which imputation from neighbours cannot recover
    w = torch.where(patch, 0.3 * torch.sign(x[0, 0]), torch.zeros(8, 8))
    model = PatchModel(w[None]).eval()
    x = torch.where(patch, x[0:1].abs() * torch.sign(w), x)  # every image agrees with the weights
    good = (w * x[:, 0]).abs() + 1e-3 * torch.rand(4, 8, 8)
    random = torch.rand(4, 8, 8, generator=torch.Generator().manual_seed(9))
    return model, x, good, random


def test_road_prefers_the_map_on_the_relevant_patch():
    model, x, good, random = patch_setup()
    for name, better in (("road", torch.gt), ("road_lerf", torch.gt), ("road_morf", torch.lt)):
        g = saliencylab.evaluate(model, x, good, name, target=0)
        r = saliencylab.evaluate(model, x, random, name, target=0)
        assert better(g, r).all(), (name, g, r)
    s, curves = saliencylab.evaluate(model, x, good, "road", target=0, return_curves=True)
    assert torch.allclose(curves["fraction"], torch.tensor([0.0, 6, 13, 19, 26, 32, 38, 45, 51, 58]) / 64)
    assert curves["morf"].shape == curves["lerf"].shape == (4, 10)
    # the first checkpoint is the clean image
    p = model(x).softmax(1)[:, 0]
    assert torch.allclose(curves["morf"][:, 0], p) and torch.allclose(curves["lerf"][:, 0], p)


def test_road_summary_is_the_mean_height_and_batch_size_free():
    model, x, good, _ = patch_setup()
    metric = saliencylab.metrics.build("road_morf", fractions=[0.0, 0.25, 0.5], batch_size=5)
    s, curves = metric(model, x, good, 0, return_curves=True)
    c = curves["scores"]
    assert torch.allclose(s, (c[:, 0] / 2 + c[:, 1] + c[:, 2] / 2) * 0.25 / 0.5)
    again = saliencylab.evaluate(model, x, good, "road_morf", target=0, fractions=[0.0, 0.25, 0.5], batch_size=64)
    assert torch.allclose(s, again, atol=1e-6)


def test_road_parameters_are_checked():
    with pytest.raises(ConfigError):
        saliencylab.metrics.build("road", fractions=[0.5, 0.1])
    with pytest.raises(ConfigError):
        saliencylab.metrics.build("road", noise=-1)
    with pytest.raises(ConfigError):
        saliencylab.metrics.build("road", auc="simpson")
    assert saliencylab.metrics.get("road_morf").higher_is_better is False
    assert saliencylab.metrics.parameters("road")["fractions"] is None


def test_keyed_imputation_noise_belongs_to_the_image_and_checkpoint():
    from saliencylab.core.randomness import KeyedRandom
    from saliencylab.metrics.road import ROAD_NOISE, KeyedImputer

    torch.manual_seed(2)
    x = torch.rand(4, 3, 20, 20)
    masks = (torch.rand(4, 1, 20, 20) > 0.6).float()
    ids = ["a", "b"]
    imputer = KeyedImputer(0.01, 50, 1e-6, KeyedRandom(7, ROAD_NOISE, ids), n=2)
    # engine rows 0..3 = (image 0, k 0), (0, 1), (1, 0), (1, 1)
    out = imputer.impute(x, masks, seed_rows=torch.arange(4))
    keep = masks.bool().expand_as(x)
    assert torch.equal(out[keep], x[keep]) and (out[~keep] != x[~keep]).all()
    clean = LinearImputer(noise=0.0).impute(x, masks)
    resid = (out - clean)[~keep]
    assert abs(resid.std().item() - 0.01) < 0.001 and abs(resid.mean().item()) < 0.001
    # image "b" alone, as image 0 of its own call, draws the same noise
    alone = KeyedImputer(0.01, 50, 1e-6, KeyedRandom(7, ROAD_NOISE, ids[1:]), n=2)
    assert torch.allclose(alone.impute(x[2:], masks[2:], seed_rows=torch.arange(2)), out[2:], atol=1e-6)
    # another checkpoint, image id or seed: other noise
    noise = out - clean
    assert not torch.allclose(noise[0], noise[1]) and not torch.allclose(noise[0], noise[2])
    reseeded = KeyedImputer(0.01, 50, 1e-6, KeyedRandom(8, ROAD_NOISE, ids), n=2).impute(x, masks, torch.arange(4))
    assert not torch.allclose(reseeded, out)
