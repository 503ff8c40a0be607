"""Feature statistics: batched estimation, early stop, cache keyed by model and layer, data sources."""

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from saliencylab import features
from saliencylab.core.errors import ConfigError, InputError
from saliencylab.core.session import ModelSession


@pytest.fixture(autouse=True)
def isolated(tmp_path, monkeypatch):
    monkeypatch.setenv("SALIENCYLAB_CACHE", str(tmp_path / "cache"))


class Tail(nn.Module):
    """Counts how often the part after the bottleneck layer runs."""

    def __init__(self):
        super().__init__()
        self.calls = 0

    def forward(self, x):
        self.calls += 1
        return x.mean((2, 3))


def model_with_tail(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), Tail()).eval()


def test_statistics_match_a_direct_computation():
    model = model_with_tail()
    torch.manual_seed(1)
    data = torch.randn(37, 3, 8, 8)
    st = features.estimate(model, "1", data, batch_size=10)
    with torch.no_grad():
        direct = model[1](model[0](data))
    assert st.n == 37 and st.shape == (4, 8, 8)
    assert torch.allclose(st.mean, direct.mean(0), atol=1e-6)
    assert torch.allclose(st.std, direct.std(0), atol=1e-5)
    assert torch.allclose(st.nonzero, (direct != 0).float().mean(0))
    assert torch.equal(st.active(0.01), (direct != 0).float().mean(0) > 0.01)
    assert st.floored_std(0.5).min() >= 0.5
    assert model[2].calls == 0  # the forward pass stopped at the layer every time


def test_several_layers_in_one_pass_and_n_samples():
    model = model_with_tail()
    data = torch.randn(20, 3, 8, 8)
    both = features.estimate(model, ["0", "1"], data, n_samples=12, batch_size=5)
    assert both["0"].n == both["1"].n == 12
    assert torch.allclose(both["1"].mean, features.estimate(model, "1", data[:12]).mean, atol=1e-6)
    out = features.estimate(model, features.OUTPUT, data)  # the model's own output
    assert out.shape == (4,) and model[2].calls > 0


def test_cache_round_trip_and_keys(tmp_path):
    model = model_with_tail()
    data = torch.randn(16, 3, 8, 8)
    first = features.feature_stats(model, "1", data)
    files = list((tmp_path / "cache" / "features").rglob("*.pt"))
    assert len(files) == 1 and files[0].stat().st_size < 10_000  # a small file
    model[2].calls = 0
    with ModelSession(model) as s:
        again = features.feature_stats(model, "1", data, session=s)
    assert s.cost.forward_images == 0  # loaded, not estimated
    assert torch.equal(first.mean, again.mean) and again.n == 16 and again.model_key
    loaded = features.FeatureStats.load(files[0])
    assert torch.equal(loaded.std, first.std)
    # other data, another layer or changed weights: a different file
    features.feature_stats(model, "1", data * 2)
    features.feature_stats(model, "0", data)
    with torch.no_grad():
        model[0].bias.add_(1)
    features.feature_stats(model, "1", data)
    assert len(list((tmp_path / "cache" / "features").rglob("*.pt"))) == 4
    # no cache: nothing written
    features.feature_stats(model, "1", data * 3, cache=False)
    assert len(list((tmp_path / "cache" / "features").rglob("*.pt"))) == 4


def test_fingerprint_depends_on_values_not_identity():
    a, b = model_with_tail(0), model_with_tail(0)
    assert features.model_fingerprint(a) == features.model_fingerprint(b)
    assert features.model_fingerprint(a) != features.model_fingerprint(model_with_tail(1))


def test_iterables_of_batches():
    model = model_with_tail()
    data = torch.randn(12, 3, 8, 8)
    ref = features.estimate(model, "1", data)
    tuples = [(data[:5], torch.zeros(5)), (data[5:], torch.zeros(7))]
    dicts = [{"input": data[:5]}, {"image": data[5:]}]
    gen = (b for b in (data[:6], data[6:]))
    for source in (tuples, dicts, gen):
        st = features.estimate(model, "1", source)
        assert st.n == 12 and torch.allclose(st.mean, ref.mean, atol=1e-6)
    assert features.data_key(tuples) is None  # no stable identity: estimated every time, never cached
    with pytest.raises(InputError, match="float image tensor"):
        features.estimate(model, "1", [torch.zeros(3, dtype=torch.long)])
    with pytest.raises(ConfigError, match="no images"):
        features.estimate(model, "1", [])


def test_image_folder(tmp_path):
    folder = tmp_path / "imgs"
    (folder / "sub").mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i, (w, h) in enumerate([(40, 30), (30, 50), (64, 64)]):
        pixels = rng.integers(0, 255, (h, w, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(folder / ("sub" if i else "") / f"{i}.png")
    (folder / "notes.txt").write_text("not an image")
    src = features.ImageFolder(folder, size=16, batch_size=2)
    batches = list(src)
    assert len(src) == 3 and [b.shape for b in batches] == [(2, 3, 16, 16), (1, 3, 16, 16)]
    key = src.cache_key
    model = model_with_tail()
    st = features.feature_stats(model, "1", str(folder), size=(16, 16))
    assert st.n == 3 and st.shape == (4, 16, 16)
    (folder / "3.png").write_bytes((folder / "0.png").read_bytes())
    assert features.ImageFolder(folder, size=16).cache_key != key  # new files, new key
    with pytest.raises(ConfigError, match="does not exist"):
        features.ImageFolder(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="no image files"):
        features.ImageFolder(tmp_path / "empty")


def test_sample_crops_are_deterministic_augmented_crops():
    crops = features.sample_crops(5, seed=3, size=32, batch_size=2)
    a, b = torch.cat(list(crops)), torch.cat(list(crops))
    assert a.shape == (5, 3, 32, 32) and torch.equal(a, b)
    assert not torch.equal(a, torch.cat(list(features.sample_crops(5, seed=4, size=32))))
    assert (a[0] - a[1]).abs().mean() > 0.05  # different crops, not copies
    assert a.abs().max() <= 1.0 + 1e-6  # normalized for the embedded model: (x*255 - 127) / 128
    assert "n=5" in crops.cache_key and "seed=3" in crops.cache_key


def test_capture_stops_and_checks():
    model = model_with_tail()
    data = torch.randn(2, 3, 8, 8)
    with ModelSession(model) as s:
        out = features.capture(s, data, ["0", "1"])
        assert set(out) == {"0", "1"} and model[2].calls == 0
        assert s.cost.forward_images == 2
    shared = nn.ReLU()
    twice = nn.Sequential(nn.Conv2d(3, 3, 1), shared, nn.Conv2d(3, 3, 1), shared).eval()
    twice.add_module("last", nn.Conv2d(3, 3, 1))
    with ModelSession(twice) as s, pytest.raises(ConfigError, match="more than once"):
        features.capture(s, data, ["1", "last"])
