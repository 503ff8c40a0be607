"""The perturbation engine's batch size: automatic per device when None, validated when given."""

import pytest
import torch

import saliencylab as sl
from conftest import make_small_cnn
from saliencylab.core.errors import ConfigError
from saliencylab.perturbation import AUTO_BATCH_SIZE, Perturber, auto_batch_size


def test_auto_batch_size_per_device_and_image_size():
    assert auto_batch_size("cpu") == AUTO_BATCH_SIZE["cpu"] == 4
    assert auto_batch_size("cpu", pixels=224 * 224) == 4 and auto_batch_size("cpu", backward=True) == 16
    assert auto_batch_size("cpu", pixels=112 * 112) == 16  # smaller images: proportionally more rows
    assert auto_batch_size("cpu", pixels=12 * 12) == 256  # capped
    assert auto_batch_size(torch.device("cuda", 0)) == 64  # accelerators: large batches are cheaper per image
    assert auto_batch_size(torch.device("cuda", 0), backward=True, pixels=12 * 12) == 32


@pytest.mark.parametrize("bad", [0, -1, 2.5, True, "8"])
def test_batch_size_must_be_positive_int_or_none(bad):
    with pytest.raises(ConfigError, match="batch_size"):
        Perturber(batch_size=bad)


def test_default_batch_size_uses_the_device_choice_and_gives_the_same_maps():
    model, x = make_small_cnn(), torch.randn(2, 3, 112, 112)
    auto = sl.explain(model, x, "occlusion", window=28, stride=14)  # 49 windows per image
    assert auto.params.get("batch_size") is None
    rows = 2 * 49
    # one clean forward, then ceil(rows / 16) passes of at most 16 rows (112x112 on CPU)
    assert auto.cost.forward_calls == 1 + -(-rows // 16)
    fixed = sl.explain(model, x, "occlusion", window=28, stride=14, batch_size=128)
    assert fixed.cost.forward_calls == 2
    torch.testing.assert_close(auto.maps, fixed.maps)


def test_gradient_methods_default_batch_is_automatic_too():
    model, x = make_small_cnn(), torch.randn(3, 3, 224, 224)
    auto = sl.explain(model, x, "integrated_gradients", steps=10)  # 30 rows
    assert auto_batch_size("cpu", backward=True, pixels=224 * 224) == 16
    assert auto.cost.backward_calls == 2 and auto.cost.backward_images == 30
    fixed = sl.explain(model, x, "integrated_gradients", steps=10, batch_size=64)
    assert fixed.cost.backward_calls == 1
    torch.testing.assert_close(auto.maps, fixed.maps)
    sg = sl.explain(model, x, "smoothgrad", samples=6)
    assert sg.cost.backward_calls == 2  # 18 rows in passes of 16


def test_random_baselines_are_keyed_by_image():
    """The engine draws a uniform baseline per image, keyed by the call's image ids: occlusion with it is
    the same for a whole batch and for its shards; a subset names its images with `images=`."""
    from saliencylab.core.session import ModelSession
    from saliencylab.core.targets import resolve_target

    model, ids = make_small_cnn(), ["a", "b", "c"]
    torch.manual_seed(0)
    x = torch.randn(3, 3, 16, 16)
    params = dict(window=8, stride=4, baseline="uniform", batch_size=5)
    whole = sl.explain(model, x, "occlusion", image_ids=ids, **params).maps
    shards = torch.cat([sl.explain(model, x[i:i + 1], "occlusion", image_ids=ids[i:i + 1], **params).maps
                        for i in range(3)])
    torch.testing.assert_close(shards, whole, atol=1e-5, rtol=1e-5)
    renamed = sl.explain(model, x, "occlusion", image_ids=["x", "y", "z"], **params).maps
    assert not torch.allclose(renamed, whole)

    perturber = Perturber("uniform", "logit", 4)
    everything = lambda image, k: torch.zeros(len(image), 1, 16, 16)  # noqa: E731 - all baseline
    with ModelSession(model, image_ids=ids) as session:
        target = resolve_target(0, torch.zeros(3, 5))
        all_three = perturber.scores(session, x, target, 1, everything)
        last_two = perturber.scores(session, x[1:], target.for_images(torch.tensor([1, 2])), 1, everything,
                                    images=torch.tensor([1, 2]))
        with pytest.raises(sl.InputError, match="images="):
            perturber.scores(session, x[1:], target, 1, everything)
    torch.testing.assert_close(last_two, all_three[1:])
