"""IBA family: the capacity formula, the bottleneck hook, batching, known-relevant pixels, variants, readout."""

import warnings

import pytest
import torch
from torch import nn

import saliencylab as sl
from saliencylab import features
from saliencylab.core.errors import ConfigError, InputError
from saliencylab.methods import build
from saliencylab.methods.iba import (LN2, Adam, BottleneckHook, StatisticsWarning, capacity, capacity_map,
                                     combine_maps, default_layers, minimal_deviation, mse_target, probe_layers,
                                     restrict, smooth)
from saliencylab.core.session import ModelSession
from zoo import sequential_cnn


@pytest.fixture(autouse=True)
def quiet_and_isolated(tmp_path, monkeypatch):
    """A private cache folder, and one thread: these models are tiny and the machine may be shared."""
    monkeypatch.setenv("SALIENCYLAB_CACHE", str(tmp_path / "cache"))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def small_cnn(seed=0):
    return sequential_cnn(seed)


class RegionModel(nn.Module):
    """Relevant pixels known by construction: logit k = 20 * mean over `region` of relu(x_k).

    conv1 is +-identity (so the bottleneck layer relu1 holds relu(x) and relu(-x) per channel); features
    outside the region are multiplied by zero, so no pixel outside it can matter.
    """

    def __init__(self, scale=20.0):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 6, 3, padding=1, bias=False)
        self.relu1 = nn.ReLU()
        self.fc = nn.Linear(6, 3)
        with torch.no_grad():
            self.conv1.weight.zero_()
            for c in range(3):
                self.conv1.weight[c, c, 1, 1] = 1
                self.conv1.weight[3 + c, c, 1, 1] = -1
            self.fc.weight.zero_()
            self.fc.bias.zero_()
            for c in range(3):
                self.fc.weight[c, c] = scale
        region = torch.zeros(1, 1, 16, 16)
        region[..., 2:12, 1:9] = 1
        self.register_buffer("region", region)

    def forward(self, x):
        return self.fc((self.relu1(self.conv1(x)) * self.region).mean((2, 3)))


def region_data():
    """Reference images (noise), and explained images: evidence for class b % 3 inside the region plus an
    identical distractor patch outside it."""
    g = torch.Generator().manual_seed(1)
    data = torch.randn(128, 3, 16, 16, generator=g)
    x = torch.randn(4, 3, 16, 16, generator=g)
    for b in range(4):
        x[b, b % 3, 4:9, 2:7] += 3
        x[b, b % 3, 5:10, 10:15] += 3
    return data, x


def fraction_inside(maps, region):
    pos = maps.clamp(min=0)
    return (pos * region).flatten(1).sum(1) / pos.flatten(1).sum(1)


@pytest.fixture
def x():
    torch.manual_seed(1)
    return torch.randn(3, 3, 12, 12)


@pytest.fixture
def data():
    torch.manual_seed(2)
    return torch.randn(48, 3, 12, 12)


# -- formulas --------------------------------------------------------------------------------------------
def test_capacity_against_hand_computation():
    # lambda = 0.5, r = 2: -1/2 [1 + ln 0.25 - 1 - 0.25] = 0.125 + ln 2 = 0.8181471805599453 nats
    assert capacity(torch.tensor(2.0, dtype=torch.float64), torch.tensor(0.5, dtype=torch.float64)).item() == \
        pytest.approx(0.8181471805599453, abs=1e-12)
    # lambda = 0.9, r = 0: -1/2 [1 + ln 0.01 - 0 - 0.01] = 1.8075850929940457 nats
    assert capacity(torch.tensor(0.0, dtype=torch.float64), torch.tensor(0.9, dtype=torch.float64)).item() == \
        pytest.approx(1.8075850929940457, abs=1e-12)
    # lambda = 0: nothing passes, no information
    assert capacity(torch.tensor(3.0), torch.tensor(0.0)).item() == pytest.approx(0.0, abs=1e-7)


def test_capacity_is_the_kl_divergence_of_gaussians():
    torch.manual_seed(0)
    r, lam = torch.randn(100, dtype=torch.float64), torch.rand(100, dtype=torch.float64) * 0.98 + 0.01
    p = torch.distributions.Normal(lam * r, 1 - lam)
    q = torch.distributions.Normal(torch.zeros(100, dtype=torch.float64), torch.ones(100, dtype=torch.float64))
    assert torch.allclose(capacity(r, lam), torch.distributions.kl_divergence(p, q), atol=1e-12)


def test_capacity_map_bits_and_scaling():
    cap = torch.ones(2, 3, 4, 4)  # 1 nat per element, 3 channels, 4x4 map for an 8x8 input
    m = capacity_map(cap, (8, 8))
    assert m.shape == (2, 4, 4)
    assert torch.allclose(m, torch.full((2, 4, 4), 3 / LN2 * 16 / 64))


def test_smoothing_kernel_and_constant_maps():
    lam = torch.full((1, 2, 6, 6), 0.7)
    assert torch.allclose(smooth(lam, 1.0), lam, atol=1e-6)  # normalised kernel, reflection padding
    spike = torch.zeros(1, 1, 9, 9)
    spike[0, 0, 4, 4] = 1
    s = smooth(spike, 1.0)
    assert s.sum().item() == pytest.approx(1.0, abs=1e-6) and (s > 0).sum() == 25  # 5x5 kernel at sigma 1
    assert smooth(lam, None) is lam


def test_restrict_formula():
    torch.manual_seed(0)
    R, lam, noise = torch.randn(2, 3, 4, 4), torch.rand(2, 3, 4, 4), torch.randn(2, 3, 4, 4)
    mean, std, active = torch.randn(3, 4, 4), torch.rand(3, 4, 4) + 0.5, (torch.rand(3, 4, 4) > 0.2).float()
    z, cap = restrict(R, lam, mean, std, active, noise)
    assert torch.allclose(z, (lam * R + (1 - lam) * (std * noise + mean)) * active)
    assert torch.allclose(cap, capacity((R - mean) / std, lam) * active)
    z_inv, cap_inv = restrict(R, lam, mean, std, active, noise, inverse=True)
    assert torch.allclose(z_inv, (lam * (std * noise + mean) + (1 - lam) * R) * active)
    assert torch.allclose(cap_inv, cap)  # inverse IBA measures the same capacity of lambda (authors' code)


def test_adam_matches_torch():
    torch.manual_seed(0)
    a = torch.randn(4, 5, requires_grad=True)
    b = a.detach().clone().requires_grad_(True)
    ours, theirs = Adam([b], lr=0.5), torch.optim.Adam([a], lr=0.5)
    for _ in range(4):
        theirs.zero_grad()
        (a**3).sum().backward()
        theirs.step()
        ours.step(torch.autograd.grad((b**3).sum(), b))
    assert torch.allclose(a, b, atol=1e-6)


# -- the hook ----------------------------------------------------------------------------------------------
def test_bottleneck_at_lambda_one_leaves_the_output_unchanged(x, data):
    model = small_cnn()
    stats = features.estimate(model, "2", data)
    with ModelSession(model) as s:
        clean = s.forward(x)
        hook = BottleneckHook(stats.mean, stats.floored_std(), stats.active().float())
        s.add_forward_hook(model[2], hook)
        feat = stats.shape
        hook.arm(torch.ones(len(x), *feat), torch.randn(len(x), *feat))
        out = s.forward(x)
        assert hook.capacity is not None
        assert torch.allclose(out, clean, atol=1e-5)
        # lambda = 0: the output no longer depends on the image at all
        hook.arm(torch.zeros(len(x), *feat), torch.zeros(len(x), *feat))
        out0 = s.forward(x)
        hook.arm(torch.zeros(len(x), *feat), torch.zeros(len(x), *feat))
        assert torch.allclose(out0, s.forward(torch.randn_like(x)), atol=1e-6)
        # disarmed: a pass-through
        hook.disarm()
        assert torch.allclose(s.forward(x), clean)
    assert len(model[2]._forward_hooks) == 0  # owned by the session, gone afterwards


def test_bottleneck_through_the_method_at_lambda_one(x, data):
    """The whole optimisation path with alpha so large that lambda == 1: the model's output is intact, so
    the loss equals CE(clean) + beta * capacity."""
    model = small_cnn()
    m = build("iba", model, layer="2", data=data, initial_alpha=100.0, lr=1e-9, steps=1, samples=2)
    e = m.explain(x)
    clean_ce = torch.nn.functional.cross_entropy(model(x), model(x).argmax(1), reduction="none")
    result = e.extras["result"]
    info = result.capacity.flatten(1).mean(1)
    assert result.losses.shape == (3, 1)  # per image and step
    assert torch.allclose(result.losses[:, 0].float(), clean_ce + 10.0 * info, rtol=1e-4)
    assert e.extras["layer"] == "2" and torch.equal(e.extras["capacity"], result.capacity)
    assert torch.allclose(e.lowres, capacity_map(result.capacity, x.shape[-2:]))


# -- batching and seeds -------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["iba", "inverse_iba"])
def test_batched_equals_one_image_runs(name, x, data):
    model = small_cnn()
    kw = dict(layer="2", data=data, steps=4, samples=5, seed=3)
    ids = ["a.jpg", "b.jpg", "c.jpg"]
    batched = build(name, model, batch_size=7, **kw).attribute(x, image_ids=ids)  # chunks straddle images
    single = torch.cat([build(name, model, batch_size=16, **kw).attribute(x[i:i + 1], image_ids=ids[i:i + 1])
                        for i in range(len(x))])
    assert torch.allclose(batched, single, rtol=1e-4, atol=1e-6)
    shared = build(name, model, batch_size=7, reuse_features=True, **kw).attribute(x)
    assert torch.allclose(batched, shared, rtol=1e-4, atol=1e-6)
    other_seed = build(name, model, batch_size=7, **{**kw, "seed": 4}).attribute(x)
    assert (batched - other_seed).abs().max() > 1e-5  # the noise does matter


def test_cost_counts_every_noisy_copy(x, data):
    model = small_cnn()
    stats = features.estimate(model, "2", data)  # FeatureStats are accepted as data, too
    e = sl.explain(model, x, "iba", layer="2", data=stats, steps=3, samples=4, batch_size=5, reuse_features=False)
    assert e.cost.backward_images == 3 * 3 * 4
    assert e.cost.forward_images == 3 * 3 * 4 + len(x)  # + the clean pass resolving the target
    shared = sl.explain(model, x, "iba", layer="2", data=stats, steps=3, samples=4, batch_size=5, reuse_features=True)
    assert shared.cost.forward_images == e.cost.forward_images  # shared rows are still counted as rows
    auto = sl.explain(model, x, "iba", layer="2", data=stats, steps=3, samples=4, batch_size=5)
    # + the check after the first chunk: its images (0 and 1) once more, shared
    assert auto.cost.forward_images == e.cost.forward_images + 2


def test_automatic_batch_size_cuts_chunks_at_whole_images(x, data, monkeypatch):
    from saliencylab.methods.iba import optimisation as iba_module

    model = small_cnn()
    stats = features.estimate(model, "2", data)
    kw = dict(layer="2", data=stats, steps=2, samples=4, reuse_features=False)
    fixed = sl.explain(model, x, "iba", batch_size=8, **kw)
    monkeypatch.setattr(iba_module, "auto_batch_size", lambda *a, **k: 11)  # rounds down to 8 = 2 images
    auto = sl.explain(model, x, "iba", **kw)
    assert auto.cost.forward_calls == fixed.cost.forward_calls == 1 + 2 * 2  # clean pass + 2 chunks per step
    assert torch.allclose(auto.maps, fixed.maps, rtol=1e-5, atol=1e-7)
    monkeypatch.setattr(iba_module, "auto_batch_size", lambda *a, **k: 3)  # fewer rows than copies: kept
    assert sl.explain(model, x, "iba", **kw).cost.forward_calls == 1 + 2 * 4
    with pytest.raises(ConfigError, match="batch_size"):
        build("readout_iba", model, layer="2", data=stats, batch_size=None)


class SkipAcross(nn.Module):
    """A skip connection across the bottleneck layer: sharing features among copies is not exact here."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv0, self.conv1, self.relu = nn.Conv2d(3, 4, 3, padding=1), nn.Conv2d(4, 4, 3, padding=1), nn.ReLU()
        self.conv2, self.fc = nn.Conv2d(4, 4, 3, padding=1), nn.Linear(4, 5)

    def forward(self, x):
        a = self.conv0(x)
        return self.fc((self.conv2(self.relu(self.conv1(a))) + a).mean((2, 3)))


def test_auto_sharing_checks_itself(x):
    torch.manual_seed(3)
    data = torch.randn(32, 3, 12, 12)
    for model, layer, expect in ((small_cnn(), "2", True), (SkipAcross().eval(), "relu", False)):
        kw = dict(layer=layer, data=data, steps=3, samples=4, batch_size=6)
        e = build("iba", model, **kw).explain(x)
        maps = e.maps
        assert e.extras["result"].reused is expect
        exact = build("iba", model, reuse_features=False, **kw).attribute(x)
        assert torch.allclose(maps, exact, rtol=1e-4, atol=1e-6)
    with pytest.raises(RuntimeError):  # forced sharing on a model where it cannot work
        build("iba", SkipAcross().eval(), layer="relu", data=data, steps=1, samples=4, batch_size=6,
              reuse_features=True).attribute(x)
    with pytest.raises(ConfigError, match="reuse_features"):
        build("iba", small_cnn(), reuse_features="yes")


# -- known relevant pixels ------------------------------------------------------------------------------
def test_most_positive_attribution_on_the_known_relevant_pixels():
    model = RegionModel().eval()
    data, x = region_data()
    region = model.region[0, 0]
    share = region.mean().item()  # 80 of 256 pixels
    for name, params in [("iba", dict(steps=30)), ("multilayer_iba", dict(layer=["conv1", "relu1"], steps=30)),
                         ("inverse_iba", dict(beta=1.0))]:
        params = {"layer": "relu1", **params}
        maps = sl.explain(model, x, name, data=data, **params).maps
        frac = fraction_inside(maps, region)
        assert (frac > 0.9).all(), (name, frac)
    # the authors' 10 steps: the evidence is found but a floor of capacity remains everywhere (see docs/iba.md)
    frac = fraction_inside(sl.explain(model, x, "iba", layer="relu1", data=data).maps, region)
    assert (frac > share + 0.08).all(), frac


# -- variants -------------------------------------------------------------------------------------------------
def chexplain_filtered_mask(maps, thresholds):
    """CheXplain-IBA `filtered_mask` (evaluation/gen_attribution_map.py), one image: heatmap[0] is the
    first block's map; each deeper map hm = hm / np.linalg.norm(hm), mask[mask < t] = 0,
    mask[mask >= t] = 1; the result is the product."""
    out = maps[0].clone()
    for hm, t in zip(maps[1:], thresholds):
        hm = hm / torch.linalg.norm(hm)
        mask = hm.clone()
        mask[hm < t] = 0
        mask[hm >= t] = 1
        out = out * mask
    return out


def test_combine_maps():
    a = torch.tensor([[[3.0, 4.0], [0.0, 0.0]]])  # norm 5
    b = torch.tensor([[[0.0, 0.0], [1.0, 0.0]]])  # norm 1
    assert torch.allclose(combine_maps([a, b], "sum"), a / 5 + b)
    assert torch.allclose(combine_maps([a, a * 0 + torch.tensor([[[1.0, 0.1], [1.0, 1.0]]])], "filter_max", 0.5),
                          torch.tensor([[[3.0, 0.0], [0.0, 0.0]]]))
    with pytest.raises(ConfigError, match="combine"):
        combine_maps([a], "max")


def test_filter_is_chexplains_absolute_level_on_l2_normalised_maps():
    g = torch.Generator().manual_seed(0)
    maps = [torch.rand(2, 24, 24, generator=g) ** 3 * s for s in (1.0, 7.0, 0.01)]  # different scales
    got = combine_maps(maps, "filter")  # default: the authors' 0.006 for both deeper maps
    for i in range(2):
        ref = chexplain_filtered_mask([m[i] for m in maps], [0.006, 0.006])
        assert torch.equal(got[i], ref)
    # the level is absolute on the normalised map, not a fraction of the maximum: the two rules differ here
    kept = (got != 0).float().mean()
    assert 0.05 < float(kept) < 0.95 and not torch.equal(got, combine_maps(maps, "filter_max"))
    # one level per deeper map, as their threshold=[t0, t1]
    got = combine_maps(maps, "filter", [0.01, 0.03])
    assert torch.equal(got[1], chexplain_filtered_mask([m[1] for m in maps], [0.01, 0.03]))
    with pytest.raises(ConfigError, match="one value per deeper layer"):
        combine_maps(maps, "filter", [0.01])


def test_multilayer_orders_layers_and_combines(x, data):
    model = small_cnn()
    e = build("multilayer_iba", model, layer=["4", "2"], data=data, steps=2, samples=2).explain(x)
    maps = e.maps
    assert e.extras["layer"] == ["2", "4"]  # shallow to deep, whatever order they were given in
    assert list(e.extras["maps"]) == ["2", "4"] and set(e.extras["result"]) == {"2", "4"}
    assert maps.shape == (3, 12, 12) and torch.isfinite(maps).all()
    filt = build("multilayer_iba", model, layer="2,4", data=data, steps=2, samples=2, combine="filter").attribute(x)
    assert torch.allclose(filt[filt != 0], e.extras["maps"]["2"][filt != 0])  # the shallow map, where kept
    # each layer's map is IBA's at that layer: the same bottleneck fit, the same keyed noise
    for layer in ("2", "4"):
        single = build("iba", model, layer=layer, data=data, steps=2, samples=2).attribute(x)
        assert torch.allclose(e.extras["maps"][layer], single, rtol=1e-4, atol=1e-6)


def test_regression_closures(data):
    torch.manual_seed(0)
    reg = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 4, 3, padding=1), nn.ReLU(),
                        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 1)).eval()
    x = torch.randn(2, 3, 12, 12)
    out = reg(x)
    assert torch.allclose(mse_target(1.5)(out), -((out[:, 0] - 1.5) ** 2))
    dev = minimal_deviation()
    assert torch.equal(dev(out), torch.zeros(2))  # unbound: the clean point, zero deviation
    bound = dev.bind(out)
    assert torch.allclose(bound(out + 1, torch.tensor([0, 1])), -torch.ones(2))
    for target in (mse_target(2.0), minimal_deviation()):
        e = sl.explain(reg, x, "iba", layer="1", data=data, target=target, steps=3, samples=3)
        assert e.maps.shape == (2, 12, 12) and torch.isfinite(e.maps).all() and e.targets is None
    with pytest.raises(InputError, match="one score per"):
        sl.explain(reg, x, "iba", layer="1", data=data, target=lambda o: o, steps=1, samples=1)


def test_default_layers_and_probe(x):
    model = small_cnn()
    with ModelSession(model) as s:
        infos = probe_layers(s, x)
    assert [i.name for i in infos][:5] == ["0", "1", "2", "3", "4"]
    assert default_layers(infos) == ["2"]  # middle of the five spatial layers
    assert default_layers(infos, 3) == ["1", "2", "3"]


def test_no_data(x):
    model = small_cnn()
    with pytest.raises(ConfigError, match="feature statistics"):
        sl.explain(model, x[:1], "iba", steps=1, samples=1)
    with pytest.warns(StatisticsWarning, match="data="):
        e = sl.explain(model, x, "iba", steps=1, samples=1)
    assert e.maps.shape == (3, 12, 12)


def test_bad_arguments(x, tmp_path):
    model = small_cnn()
    with pytest.raises(ConfigError, match="no layer named"):
        build("iba", model, layer="conv9")
    with pytest.raises(ConfigError, match="does not exist"):
        build("iba", model, data=str(tmp_path / "nowhere"))
    with pytest.raises(ConfigError, match="steps"):
        build("iba", model, steps=0)
    with pytest.raises(ConfigError, match="multilayer_iba"):
        build("iba", model, layer=["2", "4"])
    with pytest.raises(ConfigError, match="shape"):  # statistics estimated on another image size
        sl.explain(model, x, "iba", layer="2", data=torch.randn(4, 3, 10, 10), steps=1, samples=1)


def test_same_arguments_for_every_variant(x, data):
    model = small_cnn()
    cheap = {"iba": dict(steps=2, samples=2), "inverse_iba": dict(steps=2, samples=2),
             "multilayer_iba": dict(steps=2, samples=2), "readout_iba": dict(epochs=2),
             "input_iba": dict(steps=2, samples=2, feature_steps=2, gan_epochs=1)}
    for name, params in cheap.items():
        e = sl.explain(model, x, method=name, layer="2", data=data, target=[0, 1, 2], **params)
        assert e.maps.shape == (3, 12, 12) and torch.isfinite(e.maps).all(), name
        assert e.targets.tolist() == [0, 1, 2]
        # records get a summary (shape and content digest), not the pixels
        assert e.spec["params"]["data"].startswith("tensor(48, 3, 12, 12)#")


# -- statistics reuse and readout -------------------------------------------------------------------------
def test_statistics_are_cached_on_disk(x, data, tmp_path):
    model = small_cnn()
    first = sl.explain(model, x, "iba", layer="2", data=data, steps=1, samples=1)
    files = list((tmp_path / "cache" / "features").rglob("*.pt"))
    assert len(files) == 1
    again = sl.explain(model, x, "iba", layer="2", data=data, steps=1, samples=1)
    assert again.cost.forward_images == first.cost.forward_images - len(data)  # no estimation pass
    assert torch.allclose(first.maps, again.maps)


def test_readout_trains_once_then_one_pass_per_image(x, data, tmp_path):
    model = small_cnn()
    first = sl.explain(model, x, "readout_iba", layer="2", data=data, epochs=2, batch_size=16)
    assert first.cost.backward_images == 2 * len(data)  # two epochs of training, nothing at inference
    assert len(list((tmp_path / "cache" / "readout").glob("*.pt"))) == 1
    again = sl.explain(model, x, "readout_iba", layer="2", data=data, epochs=2, batch_size=16)
    assert again.cost.backward_images == 0 and again.cost.forward_images == len(x) + 1  # + a one-image probe
    assert torch.allclose(first.maps, again.maps)
    assert first.maps.shape == (3, 12, 12) and torch.isfinite(first.maps).all()
    assert first.extras["readout_layers"] == ["2", "3", "4", features.OUTPUT]  # the layer, later ones, the output
    assert first.extras["layer"] == "2" and first.extras["capacity"].shape == (3, 6, 12, 12)
    assert torch.allclose(first.lowres, capacity_map(first.extras["capacity"], x.shape[-2:]))
    with pytest.raises(ConfigError, match="generator"):
        build("readout_iba", model, data=(b for b in [data]))


def test_readout_alpha_is_clamped_to_five_like_the_authors(x, data, monkeypatch):
    """BioroboticsLab/IBA `IBAReadout._generate_alpha` assigns alpha.clamp(-5, 5) (since 2020-05-31): a
    network whose output is above 5 everywhere gives alpha = 5, no gradient, so training leaves it as
    it is and the map is that of lambda = sigmoid(5), whatever the excess."""
    from saliencylab.methods import readout_iba as ro

    net = ro.ReadoutNet(4, 3)
    with torch.no_grad():
        net.conv3.bias.fill_(8.0)
        net.conv3.weight.zero_()
    readout = torch.randn(2, 4, 5, 5)
    assert torch.equal(net(readout), torch.full((2, 3, 5, 5), 5.0))
    with torch.no_grad():
        net.conv3.bias.copy_(torch.tensor([-9.0, 0.5, 4.0]))
    assert torch.equal(net(readout)[:, :, 0, 0], torch.tensor([[-5.0, 0.5, 4.0]] * 2))

    model = small_cnn()
    caps, trained, original = {}, {}, ro.ReadoutNet
    for bias in (8.0, 50.0):
        class Above(original):
            def __init__(self, *args, _bias=bias):
                super().__init__(*args)
                with torch.no_grad():
                    self.conv3.bias.fill_(_bias)
                    self.conv3.weight.zero_()
                trained[_bias] = self

        monkeypatch.setattr(ro, "ReadoutNet", Above)
        e = sl.explain(model, x, "readout_iba", layer="2", data=data, epochs=1, batch_size=16, lr=0.1, cache=False)
        caps[bias] = e.extras["capacity"]
    assert float(trained[8.0].conv3.bias.min()) == 8.0  # no gradient passed the clamp
    # unclamped, lambda = sigmoid(8) and sigmoid(50) give different capacities; clamped both are sigmoid(5)'s
    torch.testing.assert_close(caps[8.0], caps[50.0], rtol=0, atol=0)
    assert float(caps[8.0].max()) > 0


def test_generic_iterable_data_is_estimated_each_time_and_warns_nothing(x, data):
    model = small_cnn()
    batches = [(data[:20], torch.zeros(20)), (data[20:], torch.zeros(28))]
    with warnings.catch_warnings():
        warnings.simplefilter("error", StatisticsWarning)
        e = sl.explain(model, x, "iba", layer="2", data=batches, steps=1, samples=1)
    ref = sl.explain(model, x, "iba", layer="2", data=data, steps=1, samples=1)
    assert torch.allclose(e.maps, ref.maps, rtol=1e-4, atol=1e-6)
    assert e.cost.forward_images == ref.cost.forward_images  # both estimated once (the tensor had no cache yet)


def test_losses_decrease(x, data):
    e = build("iba", small_cnn(), layer="2", data=data, steps=8, samples=4).explain(x)
    losses = e.extras["losses"]
    assert losses.shape == (3, 8) and torch.isfinite(losses).all()
    assert (losses[:, -1] < losses[:, 0]).all()


# -- the method contract: parameters, rebuilding, keyed randomness, nothing kept -------------------------
def test_parameters_declared_once_with_each_variants_defaults():
    iba, inverse = sl.methods.parameters("iba"), sl.methods.parameters("inverse_iba")
    assert set(iba) == set(inverse) and len(iba) == 15
    assert inverse["beta"] == 30.0 and iba["beta"] == 10.0
    assert {k: v for k, v in inverse.items() if k != "beta"} == {k: v for k, v in iba.items() if k != "beta"}
    assert iba["steps"] == 10 and iba["samples"] == 10 and iba["batch_size"] is None
    assert iba["reuse_features"] == "auto" and iba["sigma"] == 1.0
    multi = sl.methods.parameters("multilayer_iba")
    assert set(multi) == set(iba) | {"combine", "threshold", "inverse"}
    readout = sl.methods.parameters("readout_iba")
    assert readout["lr"] == 1e-3 and readout["batch_size"] == 32 and "steps" not in readout
    inp = sl.methods.parameters("input_iba")
    assert (inp["beta"], inp["steps"], inp["feature_steps"], inp["batch_size"]) == (20.0, 60, 10, 32)
    with pytest.raises(ConfigError, match="unknown parameter"):
        build("inverse_iba", small_cnn(), gan_epochs=1)


@pytest.mark.parametrize("name,params", [("iba", dict(steps=2, samples=2)), ("inverse_iba", dict(steps=2, samples=2)),
                                         ("multilayer_iba", dict(layer=["2", "4"], steps=2, samples=2)),
                                         ("readout_iba", dict(epochs=1)),
                                         ("input_iba", dict(steps=2, samples=2, feature_steps=2, gan_epochs=1,
                                                            gan_size=8, gan_batch=8))])
def test_rebuilding_from_params(name, params, x, data):
    model = small_cnn()
    m = build(name, model, **{"layer": "2", "data": data, **params})
    assert m.params["data"] is data  # the constructor's input, as given
    before = set(vars(m))
    e = m.explain(x)
    assert set(vars(m)) == before  # nothing stored on the instance during a call
    again = type(m)(model, **m.params).explain(x)
    assert torch.allclose(e.maps, again.maps, rtol=1e-5, atol=1e-7)
    assert e.spec == again.spec


@pytest.mark.parametrize("name", ["iba", "inverse_iba"])
def test_noise_is_keyed_to_the_image(name, x, data):
    model = small_cnn()
    ids = ["cat", "dog", 17]
    kw = dict(layer="2", data=data, steps=3, samples=3, seed=5, initial_alpha=0.0)  # lambda 1/2: noise matters
    whole = build(name, model, **kw).explain(x, image_ids=ids)
    assert whole.image_ids == ids
    halves = [build(name, model, **kw).explain(x[a:b], image_ids=ids[a:b]) for a, b in ((0, 1), (1, 3))]
    # the per-image losses see the noise directly (the capacity map only through alpha's updates)
    losses = whole.extras["losses"]
    assert torch.allclose(whole.maps, torch.cat([h.maps for h in halves]), rtol=1e-4, atol=1e-6)
    assert torch.allclose(losses, torch.cat([h.extras["losses"] for h in halves]), rtol=1e-5)
    for batch_size in (None, 1, 7):
        other = build(name, model, batch_size=batch_size, **kw).explain(x, image_ids=ids)
        assert torch.allclose(whole.maps, other.maps, rtol=1e-4, atol=1e-6), batch_size
        assert torch.allclose(losses, other.extras["losses"], rtol=1e-5), batch_size
    # the key is the image id, not the position: swapping two ids changes those images' noise
    swapped = build(name, model, **kw).explain(x, image_ids=["dog", "cat", 17]).extras["losses"]
    # (a small model averages the noise away: differences of 1e-4..1e-3, far above float32 rounding ~1e-6)
    assert ((swapped[:2] - losses[:2]).abs().amax(1) > 1e-4).all()
    assert torch.allclose(swapped[2], losses[2], rtol=1e-5)
    # the same image under the same id gets the same map wherever it sits in the batch
    moved = build(name, model, **kw).explain(x.flip(0), image_ids=ids[::-1])
    assert torch.allclose(whole.maps, moved.maps.flip(0), rtol=1e-4, atol=1e-6)
    assert torch.allclose(losses, moved.extras["losses"].flip(0), rtol=1e-5)


def test_metadata():
    for name in ("iba", "inverse_iba", "multilayer_iba", "input_iba"):
        cls = sl.methods.get(name)
        assert cls.stochastic and cls.needs_data and not cls.input_space and not cls.differentiable, name
    readout = sl.methods.get("readout_iba")
    assert readout.needs_data and not readout.stochastic  # inference draws nothing


def test_bottleneck_is_removed_when_the_model_raises(x, data):
    model = small_cnn()

    def target(outputs):
        if outputs.shape[0] != len(x):  # the noisy passes: fail inside the bottleneck's fit
            raise RuntimeError("boom")
        return outputs[:, 0]

    with pytest.raises(RuntimeError, match="boom"):
        build("iba", model, layer="2", data=data, steps=1, samples=2).explain(x, target=target)
    assert all(len(m._forward_hooks) == 0 for m in model.modules())
    assert all(p.requires_grad for p in model.parameters())
