"""Trained variants: the same data, a small CNN fitted in seconds, deterministic and cached."""

import pytest
import torch

from saliencylab import envs
from saliencylab.envs import trained
from zoo import same_weights

NAMES = ("dominant_colour", "pattern_at_location", "null_player")


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    with pytest.MonkeyPatch.context() as mp:
        path = tmp_path_factory.mktemp("cache")
        mp.setenv("SALIENCYLAB_CACHE", str(path))
        trained.clear_cache()
        yield path
        trained.clear_cache()


@pytest.fixture(scope="module", params=NAMES)
def env(request, cache):
    return envs.load(request.param, trained=True, seed=0)


def test_trained_env_contract(env):
    designed = envs.load(env.name)
    assert env.trained is True and "may not use exactly the designed features" in env.note
    assert (env.name, env.description, env.image_size, env.num_classes) == \
        (designed.name, designed.description, designed.image_size, designed.num_classes)
    assert not env.model.training and isinstance(env.model, trained.EnvCNN)
    a, b = env.sample(16, seed=1), designed.sample(16, seed=1)   # same data, designed truth
    assert torch.equal(a.x, b.x) and torch.equal(a.truth, b.truth) and torch.equal(a.labels, b.labels)


def test_trained_accuracy(env):
    assert env.accuracy > 0.9
    b = env.sample(500, seed=123)
    with torch.no_grad():
        measured = float((env.model(b.x).argmax(1) == b.labels).float().mean())
    assert measured > 0.9


def test_cached_in_process_and_on_disk(env, cache, monkeypatch):
    path = cache / "envs" / f"{env.name}-seed0-{trained.RECIPE}.pt"
    assert path.is_file()

    def no_training(*args, **kwargs):
        raise AssertionError("should have come from the cache")

    monkeypatch.setattr(trained, "train", no_training)
    again = envs.load(env.name, trained=True, seed=0)          # in-process
    assert same_weights(again.model, env.model) and again.accuracy == env.accuracy
    assert again.model is not env.model                        # a fresh module each time
    saved = dict(trained._CACHE)
    trained.clear_cache()
    try:
        from_disk = envs.load(env.name, trained=True, seed=0)
    finally:
        trained._CACHE.update(saved)
    assert same_weights(from_disk.model, env.model) and from_disk.accuracy == env.accuracy


def test_training_is_deterministic_per_seed():
    design = envs.get("pattern_at_location")()
    a, b = trained.train(design, seed=3, steps=15), trained.train(design, seed=3, steps=15)
    c = trained.train(design, seed=4, steps=15)
    assert all(torch.equal(a["state_dict"][k], b["state_dict"][k]) for k in a["state_dict"])
    assert a["accuracy"] == b["accuracy"]
    assert not torch.equal(a["state_dict"]["fc.weight"], c["state_dict"]["fc.weight"])


def test_training_leaves_the_global_rng_alone():
    torch.manual_seed(0)
    expected = torch.rand(3)
    torch.manual_seed(0)
    trained.train(envs.get("pattern_at_location")(), seed=1, steps=2)
    assert torch.equal(torch.rand(3), expected)


def test_empty_cache_variable_disables_the_disk_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("SALIENCYLAB_CACHE", "")
    assert trained.cache_dir() is None
    monkeypatch.setenv("SALIENCYLAB_CACHE", str(tmp_path))
    assert trained.cache_dir() == tmp_path
    monkeypatch.delenv("SALIENCYLAB_CACHE")
    assert trained.cache_dir() == trained.Path.home() / ".cache" / "saliencylab"
