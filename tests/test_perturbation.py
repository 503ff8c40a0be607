"""The perturbation engine's batch size: automatic per device when None, validated when given."""

import pytest
import torch

import saliencylab as sl
from conftest import make_small_cnn
from saliencylab.errors import ConfigError
from saliencylab.perturbation import AUTO_BATCH_SIZE, Perturber, auto_batch_size


def test_auto_batch_size_per_device():
    assert auto_batch_size("cpu") == AUTO_BATCH_SIZE["cpu"] == 4
    assert auto_batch_size(torch.device("cuda", 0)) == 64  # accelerators: large batches are cheaper per image


@pytest.mark.parametrize("bad", [0, -1, 2.5, True, "8"])
def test_batch_size_must_be_positive_int_or_none(bad):
    with pytest.raises(ConfigError, match="batch_size"):
        Perturber(batch_size=bad)


def test_default_batch_size_uses_the_device_choice_and_gives_the_same_maps():
    model, x = make_small_cnn(), torch.randn(2, 3, 12, 12)
    auto = sl.explain(model, x, "occlusion", window=4, stride=2)  # 25 windows per image
    assert auto.params.get("batch_size") is None
    rows = 2 * 25
    # one clean forward, then ceil(rows / 4) passes of at most 4 rows
    assert auto.cost.forward_calls == 1 + -(-rows // 4)
    fixed = sl.explain(model, x, "occlusion", window=4, stride=2, batch_size=64)
    assert fixed.cost.forward_calls == 2
    torch.testing.assert_close(auto.maps, fixed.maps)
