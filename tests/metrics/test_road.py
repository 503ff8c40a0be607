"""ROAD: the batched noisy linear imputation against exact solves, and the road metrics."""

import contextlib
import functools

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import PatchModel
from torch import nn

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
    # the authors' counts, int(64 * p) (rounded down): 12, 25, 44, 57 where rounding gives 13, 26, 45, 58
    assert torch.allclose(curves["fraction"], torch.tensor([0.0, 6, 12, 19, 25, 32, 38, 44, 51, 57]) / 64)
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


# -- the authors' noisy linear imputation: pixel units, then normalization -------------------------------
# A port of the semantics of tleemann/road_evaluation (MIT): road/imputations.py
# NoisyLinearImputer.setup_sparse_system / __call__ and road/imputed_dataset.py ImputedDataset.__getitem__.
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def authors_noisy_linear(img, keep, z, noise=0.01):
    """NoisyLinearImputer on img (C, H, W) float64 in pixel units, keep (H, W) bool: one equation per
    missing pixel i (raster order), over the neighbours j inside the image:
    -s_i y_i + sum_{j missing} w_j y_j = -sum_{j kept} w_j img_j, s_i = 1 - weights of the neighbours
    outside the image; solved by spsolve, then `noise * z` added to the solution (z: the standard
    normal draw of the imputed values, (C, H, W), read at the missing pixels)."""
    from scipy.sparse import lil_matrix
    from scipy.sparse.linalg import spsolve

    C, H, W = img.shape
    missing = np.flatnonzero(~keep.numpy().ravel())
    var = -np.ones(H * W, dtype=int)
    var[missing] = np.arange(len(missing))
    flat = img.numpy().reshape(C, -1)
    A, b, s = lil_matrix((len(missing), len(missing))), np.zeros((len(missing), C)), np.ones(len(missing))
    rows, cols = missing // W, missing % W
    for dr, dc, w in OFFSETS:
        r, c = rows + dr, cols + dc
        inside = (r >= 0) & (r < H) & (c >= 0) & (c < W)
        s[~inside] -= w
        j = (r * W + c)[inside]
        eq = np.flatnonzero(inside)
        known = var[j] < 0
        b[eq[known]] -= w * flat[:, j[known]].T
        A[eq[~known], var[j[~known]]] = w
    A[np.arange(len(missing)), np.arange(len(missing))] = -s
    out = flat.copy()
    out[:, missing] = spsolve(A.tocsc(), b).reshape(len(missing), C).T + noise * z.numpy().reshape(C, -1)[:, missing]
    return torch.from_numpy(out.reshape(C, H, W))


def normalize(pixels, mean, std):
    """torchvision's Normalize, the authors' transform after the imputation."""
    mean, std = (torch.tensor(v, dtype=pixels.dtype).view(-1, 1, 1) for v in (mean, std))
    return (pixels - mean) / std


def test_imputation_runs_in_pixel_units_then_normalizes_as_the_authors():
    from saliencylab.core.randomness import KeyedRandom
    from saliencylab.metrics.road import ROAD_NOISE, KeyedImputer

    H, W = 12, 14
    pixels = torch.rand(3, 3, H, W, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    x = torch.stack([normalize(p, IMAGENET_MEAN, IMAGENET_STD) for p in pixels])
    keep = hole_masks(3, H, W, seed=11)
    imputer = KeyedImputer(0.01, 200, 1e-12, KeyedRandom(7, ROAD_NOISE), n=4, mean=IMAGENET_MEAN, std=IMAGENET_STD)
    images, draws = [0, 1, 2], [3, 1, 2]
    ours = imputer.impute_rows(x, keep[:, None].double(), images, draws)
    z = KeyedRandom(7, ROAD_NOISE).normal(images, draws, (3, H, W), dtype=torch.float64)
    for i in range(3):
        theirs = normalize(authors_noisy_linear(pixels[i], keep[i], z[i]), IMAGENET_MEAN, IMAGENET_STD)
        np.testing.assert_allclose(ours[i].numpy(), theirs.numpy(), atol=1e-8)
    assert torch.equal(ours[keep[:, None].expand_as(x)], x[keep[:, None].expand_as(x)])  # kept: bit for bit


def noise_std_per_channel(noisy, clean):
    """Per channel std of the differences where they are nonzero (the removed pixels)."""
    d = (noisy - clean).transpose(0, 1).reshape(noisy.shape[1], -1)
    return torch.stack([c[c != 0].std() for c in d])


def test_noise_in_the_models_input_space_is_sigma_over_std():
    from saliencylab.core.randomness import KeyedRandom
    from saliencylab.metrics.road import ROAD_NOISE, KeyedImputer

    g = torch.Generator().manual_seed(3)
    x = torch.randn(4, 3, 32, 32, generator=g)
    masks = (torch.rand(4, 1, 32, 32, generator=g) > 0.6).float()
    std = (0.5, 0.25, 0.125)

    def impute(noise, **norm):
        return KeyedImputer(noise, 50, 1e-6, KeyedRandom(7, ROAD_NOISE), n=1, **norm).impute(x, masks, torch.arange(4))

    got = noise_std_per_channel(impute(0.01, mean=(0.1, 0.2, 0.3), std=std), impute(0.0, mean=(0.1, 0.2, 0.3), std=std))
    want = 0.01 / torch.tensor(std)
    assert torch.allclose(got, want, rtol=0.06), (got, want)
    # no normalization: the inputs are pixel units, the noise 0.01 as given
    assert torch.allclose(noise_std_per_channel(impute(0.01), impute(0.0)), torch.full((3,), 0.01), rtol=0.06)


class Spy(nn.Module):
    """A fixed linear model that keeps every batch it is fed."""

    def __init__(self, channels=3, size=16):
        super().__init__()
        self.fc = nn.Linear(channels * size * size, 3)
        self.seen = []

    def forward(self, x):
        self.seen.append(x.detach().clone())
        return self.fc(x.flatten(1))


def fed(model, name, x, maps, **params):
    model.seen.clear()
    saliencylab.evaluate(model, x, maps, name, target=0, fractions=[0.0, 0.6], batch_size=64, **params)
    return torch.cat(model.seen)


def test_road_metrics_add_the_noise_in_pixel_units():
    torch.manual_seed(0)
    model = Spy().eval()
    x, maps = torch.randn(6, 3, 16, 16), torch.rand(6, 16, 16)
    std = (0.229, 0.224, 0.225)
    for name in ("road_morf", "road_lerf", "road"):
        noisy = fed(model, name, x, maps, normalization=(IMAGENET_MEAN, std))
        clean = fed(model, name, x, maps, normalization=(IMAGENET_MEAN, std), noise=0.0)
        got = noise_std_per_channel(noisy, clean)
        assert torch.allclose(got, 0.01 / torch.tensor(std), rtol=0.08), (name, got)
    # "none", like a model that is not the embedded one under "auto": the noise is 0.01 in input units
    for normalization in ("none", "auto"):
        got = noise_std_per_channel(fed(model, "road_morf", x, maps, normalization=normalization),
                                    fed(model, "road_morf", x, maps, normalization=normalization, noise=0.0))
        assert torch.allclose(got, torch.full((3,), 0.01), rtol=0.08), (normalization, got)
    with pytest.raises(ConfigError):  # two channels of statistics for three-channel images
        saliencylab.evaluate(model, x, maps, "road", target=0, normalization=((0.5, 0.5), (0.2, 0.2)))


def test_auto_normalization_knows_the_embedded_model_only():
    from saliencylab.metrics.road import resolve_normalization
    from saliencylab.models import LITE_MEAN, LITE_STD, LoadedModel
    from saliencylab.models.efficientnet_lite import EfficientNetLite

    lite = EfficientNetLite(stages=[(1, 3, 1, 1, 32, 16)], head_channels=8, num_classes=3)
    assert resolve_normalization("auto", lite) == (LITE_MEAN, LITE_STD)
    # wrapped (e.g. behind the user's own normalization layer), or another network: unknown, none
    assert resolve_normalization("auto", nn.Sequential(lite)) == (None, None)
    assert resolve_normalization("auto", PatchModel(torch.zeros(1, 4, 4))) == (None, None)
    assert resolve_normalization(None) == resolve_normalization("none") == (None, None)
    bundle = LoadedModel(name="m", model=lite, labels=["a", "b", "c"], mean=(0.4, 0.5, 0.6), std=(0.2, 0.3, 0.4))
    assert resolve_normalization(bundle) == ((0.4, 0.5, 0.6), (0.2, 0.3, 0.4))
    assert resolve_normalization((0.5, 0.25)) == ((0.5,), (0.25,))
    for bad in ("imagenet", (0.5,), ((0.5,), (0.0,)), ((0.5, 0.5), (0.2, 0.2, 0.2)), ((1.0,), None)):
        with pytest.raises(ConfigError):
            saliencylab.metrics.build("road", normalization=bad)
    # the embedded network under "auto": the noise is 0.01 in pixel units, 0.01 / (128 / 255) in its inputs
    class SpyLite(EfficientNetLite):
        seen = []

        def forward(self, x):
            self.seen.append(x.detach().clone())
            return super().forward(x)

    model = SpyLite(stages=[(1, 3, 1, 1, 32, 16)], head_channels=8, num_classes=3).eval()
    x, maps = torch.randn(4, 3, 16, 16), torch.rand(4, 16, 16)
    got = noise_std_per_channel(fed(model, "road_morf", x, maps), fed(model, "road_morf", x, maps, noise=0.0))
    assert torch.allclose(got, 0.01 / torch.tensor(LITE_STD), rtol=0.1), got


# -- LeRF: fraction removed (default) or kept (the authors') ---------------------------------------------
def reference_lerf(model, x, maps, fractions, kept, seed=0, noise=0.01):
    """ImputedDataset.__getitem__ with remove=False per image: pixels sorted by decreasing attribution
    (the maps have no ties), the authors' LeRF at p removes order[int(U * p):] (keeps the int(U * p)
    most relevant); ours at p removes the int(U * p) least relevant. Scores: the target's softmax."""
    from saliencylab.core.randomness import KeyedRandom
    from saliencylab.metrics.road import ROAD_NOISE, KeyedImputer

    imputer = KeyedImputer(noise, 50, 1e-6, KeyedRandom(seed, ROAD_NOISE), n=len(fractions))
    B, _, H, W = x.shape
    U = H * W
    out = torch.empty(B, len(fractions))
    for i in range(B):
        order = torch.argsort(maps[i].flatten(), descending=True)
        for k, p in enumerate(fractions):
            removed = order[int(U * p):] if kept else order[U - int(U * p):]
            keep = torch.ones(U)
            keep[removed] = 0
            img = imputer.impute_rows(x[i:i + 1], keep.view(1, 1, H, W), images=[i], draws=[k])
            with torch.no_grad():
                out[i, k] = model(img).softmax(1)[0, 0]
    return out


@pytest.mark.parametrize("lerf_fraction", ["removed", "kept"])
def test_lerf_fraction_counts_removed_or_kept_pixels(lerf_fraction):
    model, x, good, _ = patch_setup()
    fractions = [0.1, 0.2, 0.3, 0.4, 0.5, 0.7, 0.9]  # the authors' percentages (RoadBenchmarkDemo.ipynb)
    s, curves = saliencylab.evaluate(model, x, good, "road_lerf", target=0, fractions=fractions,
                                     lerf_fraction=lerf_fraction, return_curves=True)
    ref = reference_lerf(model, x, good, fractions, kept=lerf_fraction == "kept")
    assert torch.allclose(curves["scores"], ref, atol=1e-5)
    assert torch.allclose(curves["fraction"], torch.tensor([6.0, 12, 19, 25, 32, 44, 57]) / 64)
    # the curves are mirror images: the authors' LeRF at p is ours at 1 - p
    other = "kept" if lerf_fraction == "removed" else "removed"
    mirrored = saliencylab.evaluate(model, x, good, "road_lerf", target=0, fractions=[0.0, 0.5, 1.0],
                                    lerf_fraction=other, return_curves=True, noise=0.0)[1]["scores"]
    direct = saliencylab.evaluate(model, x, good, "road_lerf", target=0, fractions=[0.0, 0.5, 1.0],
                                  lerf_fraction=lerf_fraction, return_curves=True, noise=0.0)[1]["scores"]
    assert torch.allclose(mirrored, direct.flip(1), atol=1e-5)
    with pytest.raises(ConfigError):
        saliencylab.metrics.build("road", lerf_fraction="both")
