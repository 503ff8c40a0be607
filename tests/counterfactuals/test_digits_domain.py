"""The shipped digits domain: the data, the networks' shapes, and the cache (in-process and on disk, keyed
by seed and settings), with a tiny recipe (its networks are poor; the full one is measured by
runs/counterfactual_claims.py)."""

import pytest
import torch

from saliencylab.core.errors import ConfigError
from saliencylab.counterfactuals import digits
from saliencylab.counterfactuals.digits import digits_domain, load_digits_images

pytestmark = pytest.mark.usefixtures("one_thread")

TINY = dict(width=8, latent_dim=8, classifier_epochs=1, ae_epochs=1, adv_epochs=1, train_limit=64, batch_size=32)


def test_images():
    x, y = load_digits_images()
    assert x.shape == (1797, 1, 32, 32) and y.shape == (1797,)
    assert float(x.min()) == -1.0 and float(x.max()) == pytest.approx(1.0, abs=1e-6)
    assert sorted(y.unique().tolist()) == list(range(10))
    assert int((y == 4).sum()) == 181 and int((y == 9).sum()) == 180


def test_cache_round_trip_and_keys(tmp_path, monkeypatch):
    monkeypatch.setenv("SALIENCYLAB_CACHE", str(tmp_path))
    digits.clear_cache()
    d = digits_domain(3, **TINY)
    files = list((tmp_path / "counterfactuals").glob(f"digits-seed3-{digits.RECIPE}-*.pt"))
    assert len(files) == 1
    # shapes, ranges, the split (disjoint, 30% held out, seeded)
    z = d.encoder(d.test_images[:5])
    assert z.shape == (5, 8, 1, 1)
    out = d.generator(z)
    assert out.shape == (5, 1, 32, 32) and float(out.abs().max()) <= 1
    assert d.classifier(out).shape == (5, 10)
    p = d.discriminator(out)
    assert p.shape == (5,) and bool(((p > 0) & (p < 1)).all())
    assert len(d.test_labels) == round(1797 * 0.3) and len(d.train_labels) + len(d.test_labels) == 1797
    assert torch.equal(d.images(4), d.test_images[d.test_labels == 4])
    assert not any(m.training for m in (d.generator, d.encoder, d.discriminator, d.classifier))
    assert set(d.info) >= {"accuracy", "reconstruction_l1", "seconds"}
    # the perceptual layers are the ReLU outputs of layer1 / layer2 (c3lt/modules.py MNISTFeatureExtractor: module[:2])
    mods = dict(d.classifier.named_modules())
    assert [n.split(".")[0] for n in d.perceptual_layers] == ["layer1", "layer2"]
    assert all(isinstance(mods[n], torch.nn.ReLU) and mods[n] is mods[n.split(".")[0]][1] for n in d.perceptual_layers)

    def no_training(*a, **k):
        raise AssertionError("trained again instead of loading")

    # in-process hit, then a disk hit after forgetting the process cache: the same weights
    monkeypatch.setattr(digits, "train_domain", no_training)
    again = digits_domain(3, **TINY)
    digits.clear_cache()
    disk = digits_domain(3, **TINY)
    for a, b in ((d.generator, again.generator), (d.classifier, disk.classifier), (d.encoder, disk.encoder),
                 (d.discriminator, disk.discriminator)):
        for (k, v), (_, w) in zip(a.state_dict().items(), b.state_dict().items()):
            assert torch.equal(v, w), k
    assert disk is not d and disk.generator is not d.generator  # fresh modules every call
    # other settings or another seed: another key (would train)
    with pytest.raises(AssertionError, match="trained again"):
        digits_domain(3, **dict(TINY, ae_epochs=2))
    with pytest.raises(AssertionError, match="trained again"):
        digits_domain(4, **TINY)
    with pytest.raises(ConfigError, match="unknown digits-domain setting"):
        digits_domain(0, epochs=3)
    with pytest.raises(ConfigError, match="split"):
        d.images(4, "val")
    digits.clear_cache()


def test_training_is_deterministic_and_restores_threads(monkeypatch):
    monkeypatch.setenv("SALIENCYLAB_CACHE", "")
    seen = []
    real = digits._batches

    def spy(*a, **k):  # called by every training epoch: the thread count while training
        seen.append(torch.get_num_threads())
        return real(*a, **k)

    monkeypatch.setattr(digits, "_batches", spy)
    torch.set_num_threads(2)
    try:
        a = digits.train_domain(1, **dict(TINY, adv_epochs=0, ae_epochs=0))
        assert torch.get_num_threads() == 2 and seen == [1]  # one thread inside, restored after
    finally:
        torch.set_num_threads(1)
    b = digits.train_domain(1, **dict(TINY, adv_epochs=0, ae_epochs=0))
    for k, v in a["state_dicts"]["classifier"].items():
        assert torch.equal(v, b["state_dicts"]["classifier"][k]), k
