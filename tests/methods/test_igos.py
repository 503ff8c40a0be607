"""I-GOS and iGOS++: the batched optimizer against a slow one-image reference, seeding, pass counts,
and the known-relevant-pixels property on a model built by hand."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import saliencylab as sl
from saliencylab.baselines import Blur
from saliencylab.core.errors import ConfigError
from saliencylab.methods import build
from saliencylab.core.randomness import KeyedRandom
from saliencylab.methods.igos import igos_noise
from zoo import RegionModel
from zoo import sequential_cnn


pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_cnn(seed=0, classes=4):
    model = sequential_cnn(seed, batchnorm=False, pool=2, classes=classes, dtype=torch.float64)
    with torch.no_grad():  # confident predictions that perturbations can change: masks move a lot
        model[-1].weight.mul_(8)
    return model


@pytest.fixture
def images():
    torch.manual_seed(3)
    return torch.randn(3, 3, 12, 12, dtype=torch.float64)


SMALL = dict(size=6, steps=5, iterations=6, seed=7, l1=0.05)  # a weak model: a light L1 lets masks move


# -- the reference: one image, one path point at a time, plain autograd, sequential line search -----
def reference(model, x1, cls, *, image, plus, size, steps, iterations, seed, l1, noise=0.2, l2=20.0, alpha=1000.0,
              armijo=1e-4, decay=0.2, alpha_min=1e-5, ls_growth=1.0, bil_sigma=0.01, line_search="reuse"):
    H, W = x1.shape[-2:]
    b1 = Blur(sigma=50.0, kernel_size=51)(x1)
    # (kind, mask, sign): mask 0 = deletion, 1 = insertion, 2 = product
    terms = [("del", 2, 1.0), ("ins", 2, -1.0), ("del", 0, 1.0), ("ins", 1, -1.0)] if plus else [("del", 0, 1.0)]
    K = 2 if plus else 1
    N = steps

    def up(m):
        return F.interpolate(m, size=(H, W), mode="bilinear", align_corners=True)

    def reg(P):
        M = P[0, 0] * P[0, 1] if plus else P[0, 0]
        tv = ((M[1:] - M[:-1]) ** 2).mean() + ((M[:, 1:] - M[:, :-1]) ** 2).mean()
        r = l1 * (1 - M).abs().mean()
        if not plus:
            return r + l2 * tv
        U = up(M[None, None])[0, 0]
        wv = torch.exp(-((x1[0, :, 1:] - x1[0, :, :-1]) ** 2).mean(0) / bil_sigma)
        wh = torch.exp(-((x1[0, :, :, 1:] - x1[0, :, :, :-1]) ** 2).mean(0) / bil_sigma)
        btv = 0.5 * (tv + (wv * (U[1:] - U[:-1]) ** 2).mean() + (wh * (U[:, 1:] - U[:, :-1]) ** 2).mean())
        return r + l2 * btv

    def scores(P, eps):
        """Signed sum of the integrated scores, built one path point at a time."""
        u = up(P)[0]
        masks = {0: u[0], 1: u[1] if plus else None, 2: u[0] * u[1] if plus else u[0]}
        total = 0.0
        for t, (kind, mk, sign) in enumerate(terms):
            for i in range(N):
                m = masks[mk] * (i + 1) / N
                inp = x1 * m + b1 * (1 - m) if kind == "del" else b1 * m + x1 * (1 - m)
                inp = inp + eps[t * N + i]
                total = total + sign * model(inp).softmax(1)[0, cls] / N
        return total

    P = torch.ones(1, K, size, size, dtype=x1.dtype)
    step = alpha
    for it in range(iterations):
        draw = 0 if line_search == "lookahead" else it  # lookahead: one noise draw for the whole run
        # the image's own noise, keyed by (its position in the call, draw * rows + row)
        eps = igos_noise(KeyedRandom(seed, "igos"), [image], [draw], len(terms) * N, x1.shape[1:], noise,
                         dtype=x1.dtype)[0]
        Pl = P.clone().requires_grad_(True)
        s = scores(Pl, eps)
        (gs,) = torch.autograd.grad(s, Pl)
        r = reg(Pl)
        (gr,) = torch.autograd.grad(r, Pl)
        g = (0.5 if plus else 1.0) * gs + gr
        loss = float(s.detach()) + float(r.detach())
        a = alpha if it == 0 else min(step * ls_growth, alpha)
        with torch.no_grad():
            while True:
                cand = (P - a * g).clamp(0, 1)
                new = float(scores(cand, eps)) + float(reg(cand))
                if new <= loss - armijo * a * float((g ** 2).sum()) or a < alpha_min:
                    break
                a *= decay
        step = a
        P = (P - a * g).clamp(0, 1).detach()
    return P[0, 0] * P[0, 1] if plus else P[0, 0]


@pytest.mark.parametrize("line_search", ["lookahead", "reuse"])
@pytest.mark.parametrize("name", ["igos", "igos_plus_plus"])
def test_batched_matches_one_image_reference(name, line_search, images):
    model = tiny_cnn()
    method = build(name, model, batch_size=7, line_search=line_search, **SMALL)  # 7: chunks cut across images and terms
    e = method.explain(images)
    mask = e.extras["mask"]
    for j in range(len(images)):
        ref = reference(model, images[j:j + 1], int(e.targets[j]), image=j, plus=name == "igos_plus_plus",
                        line_search=line_search, **SMALL)
        assert torch.allclose(mask[j], ref, atol=1e-8), (j, (mask[j] - ref).abs().max())
    # public output: higher = more important, the mask upsampled with align_corners=True
    up = F.interpolate(mask[:, None], size=(12, 12), mode="bilinear", align_corners=True)[:, 0]
    assert torch.allclose(e.maps, 1 - up)
    assert torch.allclose(e.lowres, 1 - mask)
    assert not torch.equal(mask, torch.ones_like(mask))  # it moved
    if name == "igos_plus_plus":
        assert torch.allclose(e.extras["masks"]["deletion"] * e.extras["masks"]["insertion"], mask)


@pytest.mark.parametrize("line_search", ["reuse", "lookahead", "authors"])
@pytest.mark.parametrize("name", ["igos", "igos_plus_plus"])
def test_batch_composition_and_batch_size_do_not_change_masks(name, line_search, images):
    """With image ids, an image's noise, line search and mask do not depend on its batch or batch_size:
    the whole batch equals the concatenation of its halves, for batch_size None, 1 and 7."""
    model = tiny_cnn()
    ids = ["a.jpg", "b.jpg", "c.jpg"]
    kw = {**SMALL, "iterations": 3, "line_search": line_search}
    full = build(name, model, batch_size=64, **kw).explain(images, image_ids=ids)
    for batch_size in (None, 1, 7):
        m = build(name, model, batch_size=batch_size, **kw)
        halves = [m.explain(images[:1], image_ids=ids[:1]), m.explain(images[1:], image_ids=ids[1:])]
        assert torch.allclose(full.maps, torch.cat([h.maps for h in halves]), atol=1e-9), batch_size
        assert full.extras["history"]["candidates"] == [a + b for a, b in zip(*(h.extras["history"]["candidates"]
                                                                                for h in halves))]
    assert not torch.equal(full.maps[0], full.maps[1])
    # the noise follows the image's id, not its position: another id gives another mask
    other = build(name, model, **kw).explain(images[:1], image_ids=["z.jpg"])
    assert not torch.allclose(other.maps[0], full.maps[0])


def test_images_never_share_noise():
    """Two copies of one image under different ids get different noise (the authors' one-image loop
    draws fresh noise per image too); with noise=0 they get identical masks."""
    model = tiny_cnn()
    torch.manual_seed(3)
    x = torch.randn(1, 3, 12, 12, dtype=torch.float64).repeat(2, 1, 1, 1)
    e = build("igos", model, **SMALL).explain(x)
    assert not torch.allclose(e.maps[0], e.maps[1])
    e = build("igos", model, **{**SMALL, "noise": 0.0}).explain(x)
    assert torch.equal(e.maps[0], e.maps[1])


def test_noise_cache_budget_does_not_change_results(images, monkeypatch):
    from saliencylab.methods import igos

    model = tiny_cnn()
    cached = build("igos_plus_plus", model, line_search="lookahead", **SMALL).explain(images)
    monkeypatch.setattr(igos._Objective, "noise_cache_bytes", 3 * 12 * 12 * 8 * 7)  # 7 rows fit, the rest redrawn
    partly = build("igos_plus_plus", model, line_search="lookahead", **SMALL).explain(images)
    assert torch.equal(cached.maps, partly.maps)


def test_seeding(images):
    model = tiny_cnn()
    a = build("igos", model, **SMALL).attribute(images)
    b = build("igos", model, **SMALL).attribute(images)
    c = build("igos", model, **{**SMALL, "seed": 8}).attribute(images)
    assert torch.equal(a, b)
    assert not torch.allclose(a, c)


@pytest.mark.parametrize("name,terms", [("igos", 1), ("igos_plus_plus", 4)])
@pytest.mark.parametrize("line_search", ["reuse", "authors"])
def test_pass_counts(name, terms, line_search, images):
    model = tiny_cnn()
    method = build(name, model, line_search=line_search, batch_size=16, **SMALL)
    e = sl.explain(model, images, method)
    rows = terms * SMALL["steps"]  # rows per image per evaluation of the objective
    tried = sum(sum(c) for c in e.extras["history"]["candidates"])
    B, T = len(images), SMALL["iterations"]
    assert e.cost.backward_images == B * T * rows
    extra_base = B * T * rows if line_search == "authors" else 0  # the authors evaluate the current mask again
    assert e.cost.forward_images == B + B * T * rows + extra_base + tried * rows
    assert e.cost.forward_calls > 1 and e.cost.backward_calls == -(-B * rows // 16) * T


@pytest.mark.parametrize("name,terms", [("igos", 1), ("igos_plus_plus", 4)])
def test_lookahead_pass_counts(name, terms, images):
    """Candidates of the middle iterations run with gradients (their pass is the next gradient pass);
    the first search runs forward only and is followed by one gradient pass; the last needs none."""
    model = tiny_cnn()
    method = build(name, model, line_search="lookahead", batch_size=16, **SMALL)
    e = sl.explain(model, images, method)
    rows = terms * SMALL["steps"]
    tried = torch.tensor(e.extras["history"]["candidates"])  # (iterations, B)
    B = len(images)
    assert e.cost.backward_images == 2 * B * rows + int(tried[1:-1].sum()) * rows
    assert e.cost.forward_images == B + 2 * B * rows + int(tried.sum()) * rows
    reuse = sl.explain(model, images, build(name, model, line_search="reuse", batch_size=16, **SMALL))
    assert e.cost.forward_images < reuse.cost.forward_images  # the separate gradient passes are gone


def test_warm_start_spends_fewer_candidates_than_restarting(images):
    model = tiny_cnn()
    reuse = build("igos", model, **SMALL).explain(images)
    authors = build("igos", model, line_search="authors", **SMALL).explain(images)
    n_reuse = sum(map(sum, reuse.extras["history"]["candidates"]))
    n_authors = sum(map(sum, authors.extras["history"]["candidates"]))
    assert n_reuse < n_authors


def test_nag_and_adaptive_l1_options(images):
    model = tiny_cnn()
    nag = build("igos", model, opt="nag", alpha=50.0, **SMALL)
    e = sl.explain(model, images, nag)
    assert e.cost.forward_images == 3 + 3 * SMALL["iterations"] * SMALL["steps"]  # no line search
    assert torch.isfinite(e.maps).all()
    ada = build("igos", model, adaptive_l1=True, **{**SMALL, "iterations": 8}).explain(images)
    l1 = torch.tensor(ada.extras["history"]["l1"], dtype=torch.float64)  # (iterations, B): per image, only ever divided by 10 or 5
    ratios = l1[-1] / l1[0]
    assert all(any(abs(float(r) - v) < 1e-9 for v in (1, 0.1, 0.2, 0.02)) for r in ratios)
    assert (ratios < 1).any()  # the weak model barely moves its score: L1 was lowered


def test_tiny_images_and_mask_size(images):
    model = tiny_cnn()
    m = build("igos_plus_plus", model, steps=2, iterations=2)  # default size 28 > 12: clipped to the input
    e = m.explain(images)
    assert e.maps.shape == (3, 12, 12) and e.lowres.shape == (3, 12, 12)
    m = build("igos", model, size=1, steps=2, iterations=2)
    assert m.attribute(images).shape == (3, 12, 12)


def test_bad_parameters():
    model = tiny_cnn()
    with pytest.raises(ConfigError, match="line_search"):
        build("igos", model, line_search="nope")
    with pytest.raises(ConfigError, match="opt"):
        build("igos_plus_plus", model, opt="adam")
    with pytest.raises(ConfigError, match="size"):
        build("igos", model, size=0)
    with pytest.raises(ConfigError, match="imputer"):  # mask gradients need a fixed baseline
        build("igos", model, baseline="road")


# -- a model whose relevant pixels are known by construction ---------------------------------------


@pytest.mark.parametrize("name", ["igos", "igos_plus_plus"])
def test_positive_attribution_falls_on_the_relevant_pixels(name):
    rows, cols = slice(2, 8), slice(8, 14)
    model = RegionModel(rows, cols, scale=3.0).double()
    torch.manual_seed(0)
    x = 0.1 * torch.randn(2, 3, 16, 16, dtype=torch.float64)
    x[0, :, rows, cols] += 2.0
    x[1, :, rows, cols] += 1.6
    relevant = torch.zeros(16, 16, dtype=torch.bool)
    relevant[rows, cols] = True
    # the mask at the input's resolution, default weights (at coarser masks the TV term, 20x the L1
    # weight, spreads the mask beyond the region within 10 iterations)
    maps = build(name, model, size=16, steps=10, iterations=10).attribute(x, target=1)
    pos = maps.clamp(min=0)
    share = (pos * relevant).sum((1, 2)) / pos.sum((1, 2))
    assert (share > 0.55).all(), share  # the region is 14% of the image


# -- line_search="aaai": the AAAI 2020 code's search ------------------------------------------------
def aaai_reference(model, x1, cls, *, image, size, steps, iterations, seed, l1, noise=0.2, l2=20.0):
    """A port of the semantics of `Integrated_Mask` in zhongangqi/IGOS (IGOS_generate_video.py), one
    image: integrated noisy gradient; Armijo on regularizer + clean deletion score (no noise, no path),
    step 200 at every iteration, decay 0.2, c = 1e-4, stop after the first step below 1e-5; update,
    then clamp; the L1 weight divided by 10 (5) at the end of iteration T/2 (T/1.25) if the clean score
    curve2 barely moved. Returns the mask, the accepted steps, the candidates tried, the L1 weights."""
    H, W = x1.shape[-2:]
    b1 = Blur(sigma=50.0, kernel_size=51)(x1)

    def up(m):
        return F.interpolate(m, size=(H, W), mode="bilinear", align_corners=True)

    def reg(M):
        m = M[0, 0]
        tv = ((m[:-1] - m[1:]).abs() ** 2).mean() + ((m[:, :-1] - m[:, 1:]).abs() ** 2).mean()
        return l1 * (1 - M).abs().mean() + l2 * tv

    def clean(M):
        u = up(M)
        return model(x1 * u + b1 * (1 - u)).softmax(1)[0, cls]

    mask = torch.ones(1, 1, size, size, dtype=x1.dtype)
    curve2, steps_taken, tried, l1s = [], [], [], []
    for i in range(iterations):
        l1s.append(l1)
        eps = igos_noise(KeyedRandom(seed, "igos"), [image], [i], steps, x1.shape[1:], noise, dtype=x1.dtype)[0]
        m = mask.clone().requires_grad_(True)
        u = up(m)
        total = reg(m)
        for k in range(steps):
            integ = (k + 1.0) / steps * u
            total = total + model(x1 * integ + b1 * (1 - integ) + eps[k]).softmax(1)[0, cls] / steps
        (g,) = torch.autograd.grad(total, m)
        with torch.no_grad():
            s_ori = clean(mask)
            loss_ori = float(reg(mask) + s_ori)
            if i == 0:
                curve2.append(float(s_ori))
            curve2.append(float(s_ori))
            step, n = 200.0, 1
            cand = (mask - step * g).clamp(0, 1)
            loss_ls = float(reg(cand) + clean(cand))
            while loss_ls > loss_ori - 1e-4 * step * float((g ** 2).sum()):
                step *= 0.2
                cand = (mask - step * g).clamp(0, 1)
                loss_ls, n = float(reg(cand) + clean(cand)), n + 1
                if step < 0.00001:
                    break
            mask = (mask - step * g).clamp(0, 1)
        steps_taken.append(step)
        tried.append(n)
        if iterations > 3:
            if i == int(iterations / 2):
                if abs(curve2[0] - curve2[i]) <= 0.001:
                    l1 = l1 / 10
            elif i == int(iterations / 1.25):
                if abs(curve2[0] - curve2[i]) <= 0.01:
                    l1 = l1 / 5
    return mask[0, 0], steps_taken, tried, l1s


def test_aaai_line_search_matches_the_aaai_code(images):
    model = tiny_cnn()
    # a heavy L1 keeps the weak model's score from moving: the adaptive rule fires at its exact iterations
    kw = {**SMALL, "iterations": 9, "l1": 2.0}
    e = build("igos", model, line_search="aaai", batch_size=4, **kw).explain(images)
    hist = e.extras["history"]
    for j in range(len(images)):
        mask, steps, tried, l1s = aaai_reference(model, images[j:j + 1], int(e.targets[j]), image=j,
                                                 size=kw["size"], steps=kw["steps"], iterations=kw["iterations"],
                                                 seed=kw["seed"], l1=kw["l1"])
        assert torch.allclose(e.extras["mask"][j], mask, atol=1e-8), (j, (e.extras["mask"][j] - mask).abs().max())
        assert [a[j] for a in hist["alpha"]] == pytest.approx(steps, rel=1e-12)
        assert [c[j] for c in hist["candidates"]] == tried
        assert [w[j] for w in hist["l1"]] == pytest.approx(l1s, rel=1e-12)
    # every search restarts from the AAAI step 200: the accepted step is 200 * 0.2^(candidates - 1)
    for steps, tried in zip(hist["alpha"], hist["candidates"]):
        assert steps == pytest.approx([200.0 * 0.2 ** (c - 1) for c in tried], rel=1e-12)
    assert hist["l1"][-1] == pytest.approx([kw["l1"] / 50] * 3)  # the L1 rule fired twice
    # a clean-score search: each candidate is one forward pass per image
    cost = sl.explain(model, images, build("igos", model, line_search="aaai", batch_size=4, **kw)).cost
    tried = sum(map(sum, hist["candidates"]))
    B, T, N = len(images), kw["iterations"], kw["steps"]
    assert cost.backward_images == B * T * N
    assert cost.forward_images == B + B * T * N + B * T + tried  # clean outputs, gradients, current masks, candidates


def test_aaai_line_search_options():
    model = tiny_cnn()
    with pytest.raises(ConfigError, match="aaai"):
        build("igos_plus_plus", model, line_search="aaai")
    m = build("igos", model, line_search="aaai", alpha=50.0, adaptive_l1=False, size=4, steps=2, iterations=2)
    torch.manual_seed(0)
    e = m.explain(torch.randn(1, 3, 8, 8, dtype=torch.float64))
    assert e.extras["history"]["alpha"][0][0] <= 50.0


# -- per-image baselines ------------------------------------------------------------------------------
@pytest.mark.parametrize("name,line_search", [("igos", "reuse"), ("igos", "authors"), ("igos", "aaai"),
                                              ("igos_plus_plus", "lookahead")])
def test_per_image_baseline_equals_each_image_alone(name, line_search, images):
    """A (B, C, H, W) baseline gives every image its own baseline, also in the line search's subsets."""
    model = tiny_cnn()
    torch.manual_seed(5)
    base = 0.5 * torch.randn_like(images)
    ids = ["a", "b", "c"]
    kw = {**SMALL, "iterations": 4, "line_search": line_search}
    e = build(name, model, baseline=base, batch_size=7, **kw).explain(images, image_ids=ids)
    for j in range(len(images)):
        alone = build(name, model, baseline=base[j:j + 1], batch_size=7, **kw).explain(images[j:j + 1],
                                                                                    image_ids=ids[j:j + 1])
        assert torch.allclose(e.maps[j], alone.maps[0], atol=1e-9), j
    shared = build(name, model, baseline=base[:1], batch_size=7, **kw).explain(images, image_ids=ids)
    assert not torch.allclose(shared.maps[1:], e.maps[1:])  # the baseline matters
    with pytest.raises(sl.InputError, match="broadcast"):
        build(name, model, baseline=base[:2], **kw).explain(images)


# -- seeds=k: the mean of k keyed noise draws ---------------------------------------------------------
@pytest.mark.parametrize("name", ["igos", "igos_plus_plus"])
def test_seeds_average_single_seed_runs(name, images):
    model = tiny_cnn()
    kw = {**SMALL, "iterations": 3}
    ids = ["a", "b", "c"]
    avg = build(name, model, seeds=3, batch_size=7, **kw).explain(images, image_ids=ids)
    singles = [build(name, model, **{**kw, "seed": kw["seed"] + r}).explain(images, image_ids=ids)
               for r in range(3)]
    assert avg.extras["seeds"] == [kw["seed"], kw["seed"] + 1, kw["seed"] + 2]
    for r, s in enumerate(singles):
        assert torch.allclose(avg.extras["seed_masks"][r], s.extras["mask"], atol=1e-9), r
    assert torch.allclose(avg.extras["mask"], torch.stack([s.extras["mask"] for s in singles]).mean(0), atol=1e-9)
    assert torch.allclose(avg.maps, torch.stack([s.maps for s in singles]).mean(0), atol=1e-9)
    assert torch.allclose(avg.lowres, 1 - avg.extras["mask"])
    assert not torch.allclose(singles[0].maps, singles[1].maps)  # the draws differ: averaging does something
    # batch invariance: the whole batch equals its halves
    m = build(name, model, seeds=3, batch_size=5, **kw)
    halves = [m.explain(images[:1], image_ids=ids[:1]), m.explain(images[1:], image_ids=ids[1:])]
    assert torch.allclose(avg.maps, torch.cat([h.maps for h in halves]), atol=1e-9)
    with pytest.raises(ConfigError, match="seeds"):
        build(name, model, seeds=0)
