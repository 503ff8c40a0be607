"""InputIBA: the input capacity, the grouped critics, batching, output range, and the model left untouched."""

import pytest
import torch
from torch import nn

import saliencylab as sl
from saliencylab.core.errors import ConfigError
from saliencylab.methods import build
from saliencylab.methods.iba import capacity
from saliencylab.methods.input_iba import Critic, GroupedCritics, input_capacity
from zoo import sequential_cnn

CHEAP = dict(feature_steps=3, steps=4, samples=3, gan_epochs=2, gan_size=40, gan_batch=16)


@pytest.fixture(autouse=True)
def isolated(tmp_path, monkeypatch):
    monkeypatch.setenv("SALIENCYLAB_CACHE", str(tmp_path / "cache"))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def small_cnn(seed=0):
    return sequential_cnn(seed)


@pytest.fixture
def x():
    torch.manual_seed(1)
    return torch.randn(3, 3, 12, 12)


@pytest.fixture
def data():
    torch.manual_seed(2)
    return torch.randn(32, 3, 12, 12)


def test_input_capacity_formula():
    torch.manual_seed(0)
    xs, lam = torch.randn(50, dtype=torch.float64), torch.rand(50, dtype=torch.float64) * 0.98 + 0.01
    # without a prior mask it is the feature bottleneck's capacity against N(0, 1)
    assert torch.allclose(input_capacity(xs, torch.zeros_like(xs), lam), capacity(xs, lam), atol=1e-12)
    # by hand: x = 1, m = 0.5, lambda = 0.5: denom 0.75, r = 2/3, var = 4/9, mu = 1/3
    expected = -0.5 * (1 + torch.log(torch.tensor(4 / 9, dtype=torch.float64)) - 1 / 9 - 4 / 9)
    got = input_capacity(torch.tensor(1.0, dtype=torch.float64), torch.tensor(0.5, dtype=torch.float64),
                         torch.tensor(0.5, dtype=torch.float64))
    assert got.item() == pytest.approx(expected.item(), abs=1e-12)


def test_grouped_critics_equal_separate_critics():
    torch.manual_seed(0)
    ref = Critic(6, (12, 12))
    grouped = GroupedCritics(ref, 3)
    f = torch.randn(3, 8, 6, 12, 12)
    separate = torch.stack([ref(f[b]).squeeze(1) for b in range(3)])
    assert torch.allclose(grouped(f), separate, atol=1e-5)
    # gradients stay per copy: critic 0's loss does not move critic 1's parameters
    g = torch.autograd.grad(grouped(f)[0].sum(), grouped.params)
    assert g[0][12:].abs().max() == 0 and g[0][:12].abs().max() > 0


def test_batched_equals_one_image_runs(x, data):
    """Every stage's draws are keyed to the image id: one-image calls, halves and any batch_size agree."""
    model = small_cnn()
    kw = dict(layer="2", data=data, seed=1, **CHEAP)
    ids = ["a", "b", "c"]
    whole = build("input_iba", model, batch_size=7, **kw).explain(x, image_ids=ids)
    single = [build("input_iba", model, batch_size=16, **kw).explain(x[i:i + 1], image_ids=ids[i:i + 1])
              for i in range(3)]
    for key in ("gan_mask", "mask"):
        assert torch.allclose(whole.extras[key], torch.cat([e.extras[key] for e in single]), rtol=1e-4, atol=1e-5)
    assert torch.allclose(whole.maps, torch.cat([e.maps for e in single]), rtol=1e-4, atol=1e-5)
    for batch_size in (1, None):
        other = build("input_iba", model, batch_size=batch_size, **kw).explain(x, image_ids=ids)
        assert torch.allclose(whole.maps, other.maps, rtol=1e-4, atol=1e-5), batch_size
    # another id gives other draws (the positions alone do not decide the noise)
    other = build("input_iba", model, batch_size=7, **kw).explain(x, image_ids=["d", "b", "c"])
    assert (other.extras["mask"][0] - whole.extras["mask"][0]).abs().max() > 1e-4
    assert torch.allclose(other.extras["mask"][1:], whole.extras["mask"][1:], rtol=1e-4, atol=1e-5)


def test_output_is_a_mask_and_stages_are_kept(x, data):
    model = small_cnn()
    e = build("input_iba", model, layer="2", data=data, **CHEAP).explain(x)
    maps = e.maps
    assert maps.shape == (3, 12, 12) and ((maps > 0) & (maps < 1)).all()
    assert e.extras["feature_map"].shape == (3, 12, 12) and e.extras["gan_mask"].shape == (3, 3, 12, 12)
    assert e.extras["layer"] == "2" and torch.allclose(e.lowres, e.extras["mask"].mean(1))
    assert e.extras["result"].losses.shape == (3, CHEAP["feature_steps"])
    lam = build("input_iba", model, layer="2", data=data, feature_mask="lambda", **CHEAP).attribute(x)
    assert torch.isfinite(lam).all()
    no_gan = build("input_iba", model, layer="2", data=data, **{**CHEAP, "gan_epochs": 0}).attribute(x)
    assert torch.isfinite(no_gan).all()


def test_bad_arguments():
    model = small_cnn()
    with pytest.raises(ConfigError, match="feature_mask"):
        build("input_iba", model, feature_mask="alpha")
    with pytest.raises(ConfigError, match="one feature layer"):
        build("input_iba", model, layer=["2", "4"])
    with pytest.raises(ConfigError, match="gan_batch"):
        build("input_iba", model, gan_batch=0)


def test_explain_records_and_model_untouched(x, data):
    model = small_cnn()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    e = sl.explain(model, x, "input_iba", layer="2", data=data, target=1, **CHEAP)
    assert e.targets.tolist() == [1, 1, 1] and e.cost.backward_images > 0
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert all(not p.requires_grad or p.grad is None for p in model.parameters())
    assert all(len(m._forward_hooks) == 0 for m in model.modules())
