"""The perturbation engine's batch size (automatic per device when None, validated when given) and its
ranked masks (checkpoint counts, hard tiles or I-GOS's bilinear soft masks)."""

import pytest
import torch

import saliencylab as sl
from conftest import make_small_cnn
from saliencylab.core.errors import ConfigError
from saliencylab.perturbation import (AUTO_BATCH_SIZE, Perturber, auto_batch_size, fit_masks, rank_positions,
                                      ranked_masks, step_counts)


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


def test_step_counts_even_and_floor_rules():
    # even: steps + 1 checkpoints spread over the units (the default)
    assert step_counts(10, 4).tolist() == [0, 2, 5, 8, 10]
    # floor: I-GOS's max(1, units // 50) units per step, the last step takes the rest: on the 28x28
    # grid 15 cells per step, 53 steps, the last of 4 cells
    igos = step_counts(784, 50, rule="floor")
    assert igos[:3].tolist() == [0, 15, 30] and igos[-2:].tolist() == [780, 784] and len(igos) == 54
    assert step_counts(49, 50, rule="floor").tolist() == list(range(50))  # fewer units than steps: one each
    assert step_counts(10, 7, per_step=3).tolist() == step_counts(10, 3, rule="floor").tolist() == [0, 3, 6, 9, 10]
    with pytest.raises(ConfigError, match="step rule"):
        step_counts(10, 4, rule="ceil")
    with pytest.raises(ConfigError, match="steps"):
        step_counts(10, 0, rule="floor")


def test_bilinear_masks_are_torchs_upsampling_bilinear2d():
    # I-GOS upsamples its binary 28x28 keep-grid with nn.UpsamplingBilinear2d (align_corners=True)
    grid = (torch.rand(3, 1, 7, 7, generator=torch.Generator().manual_seed(0)) > 0.5)
    soft = fit_masks(grid, (56, 60), "bilinear")
    torch.testing.assert_close(soft, torch.nn.UpsamplingBilinear2d(size=(56, 60))(grid.float()))
    assert ((soft > 0) & (soft < 1)).any()  # soft edges, not tiles
    hard = fit_masks(grid, (56, 56))
    assert torch.equal(hard, grid.repeat_interleave(8, -2).repeat_interleave(8, -1))
    with pytest.raises(ConfigError, match="upsampling"):
        fit_masks(grid, (56, 56), "bicubic")


def test_ranked_bilinear_masks_insertion_is_one_minus_deletion():
    values = torch.rand(2, 16, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    positions, counts = rank_positions(values), torch.tensor([0, 3, 7, 16])
    image, k = torch.tensor([0, 0, 1, 1]), torch.tensor([0, 1, 2, 3])
    args = (positions, counts, (4, 4))
    deletion = ranked_masks(*args, insertion=False, size=(32, 32), upsampling="bilinear", dtype=torch.float64)
    insertion = ranked_masks(*args, insertion=True, size=(32, 32), upsampling="bilinear", dtype=torch.float64)
    d, i = deletion(image, k), insertion(image, k)
    assert d.shape == (4, 1, 32, 32) and d.dtype == torch.float64
    torch.testing.assert_close(i, 1 - d, rtol=0, atol=1e-15)
    # nothing acted on, everything acted on (bilinear weights sum to one up to rounding)
    assert ((d[0] - 1).abs() < 1e-15).all() and ((d[3]).abs() < 1e-15).all()
    # the binary grid under the tents is the hard one
    hard = ranked_masks(*args, insertion=False)(image, k)
    torch.testing.assert_close(d, fit_masks(hard.double(), (32, 32), "bilinear"))


# -- shared passes (issue 16): rows that keep every pixel are scored from the metric's clean forward --------
@pytest.mark.parametrize("name, params, shared", [
    ("deletion", {"steps": 4}, 1),  # the first checkpoint is the clean image
    ("insertion", {"steps": 4}, 1),  # the last one reveals everything
    ("morf_lerf", {"steps": 4, "tile": 4}, 3),  # both start clean, and both end on the all-removed image
    ("road", {"fractions": (0.0, 0.5), "tile": 4}, 2),  # MoRF and LeRF at 0
    ("sensitivity_n", {"samples": 3, "fraction": 0.1}, 1),  # the clean score
])
def test_shared_passes_save_forwards_and_keep_the_scores(monkeypatch, name, params, shared):
    from saliencylab import perturbation

    model, x = make_small_cnn(), torch.randn(3, 3, 16, 16)
    maps = torch.randn(3, 16, 16)
    metric = sl.metrics.build(name, **params)
    fast = metric.measure(model, x, maps)
    monkeypatch.setattr(perturbation, "FAST", False)
    slow = metric.measure(model, x, maps)
    assert slow.cost.forward_images - fast.cost.forward_images == shared * len(x)
    # the shared rows come from a forward at another batch size: equal up to float rounding
    torch.testing.assert_close(fast.scores, slow.scores, rtol=0, atol=1e-6)
    for key, curve in (fast.curves or {}).items():
        torch.testing.assert_close(curve, slow.curves[key], rtol=0, atol=1e-6)


def test_nothing_is_shared_without_the_metrics_clean_forward():
    # an engine call on its own (no remembered clean outputs) forwards every row, all-kept ones included
    model, x = make_small_cnn(), torch.randn(2, 3, 16, 16)
    from saliencylab.core.session import ModelSession
    from saliencylab.core.targets import resolve_target

    with ModelSession(model) as session:
        with torch.no_grad():
            target = resolve_target(None, session.forward(x))
        ones = lambda image, k: torch.ones(len(image), 1, 16, 16)  # noqa: E731
        Perturber().scores(session, x, target, 3, ones)
    assert session.cost.forward_images == 2 + 2 * 3


def test_multigrid_pooling_by_corners_is_the_reshape_reduction_bit_for_bit(monkeypatch):
    from saliencylab import perturbation
    from saliencylab.perturbation import _pool2

    torch.manual_seed(0)
    for shape in ((2, 3, 224, 224), (2, 1, 7, 9), (1, 3, 57, 113), (1, 1, 1, 1)):
        for dtype in (torch.float32, torch.float64):
            t = torch.randn(shape, dtype=dtype) * 1e3
            fast = [_pool2(t), _pool2(t, "min", 1.0)]
            monkeypatch.setattr(perturbation, "FAST", False)
            slow = [_pool2(t), _pool2(t, "min", 1.0)]
            monkeypatch.setattr(perturbation, "FAST", True)
            assert all(torch.equal(a, b) for a, b in zip(fast, slow))


# -- channels-last engine inputs (issue 16): the same scores, the model untouched --------------------------
class _LayoutProbe(torch.nn.Module):
    """The zoo CNN, recording whether each forward call got a channels-last input."""

    def __init__(self, flatten_by_view: bool = False):
        super().__init__()
        self.net, self.seen, self.flatten_by_view = make_small_cnn(), [], flatten_by_view

    def forward(self, x):
        self.seen.append(x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last))
        if self.flatten_by_view:  # a model that cannot take channels-last inputs
            x = x.view(x.shape[0], -1).view(x.shape)
        return self.net(x)


@pytest.mark.usefixtures("one_thread")
@pytest.mark.parametrize("name, params", [
    ("deletion", {"protocol": "igos", "steps": 5}), ("insertion", {"protocol": "igos", "steps": 5}),
    ("morf_lerf", {"steps": 5, "tile": 16}), ("road", {"fractions": (0.0, 0.3, 0.6), "tile": 16}),
    ("sensitivity_n", {"samples": 4, "fraction": (0.01, 0.1)}),
])
def test_channels_last_inputs_keep_the_scores(monkeypatch, name, params):
    from saliencylab import perturbation

    model, x = _LayoutProbe(), torch.randn(2, 3, 128, 128, generator=torch.Generator().manual_seed(3))
    maps = torch.randn(2, 128, 128, generator=torch.Generator().manual_seed(4))
    metric = sl.metrics.build(name, **params)
    fast = metric.measure(model, x, maps)
    assert any(model.seen) and not all(model.seen)  # the engine's rows channels-last, the clean forward not
    model.seen.clear()
    monkeypatch.setattr(perturbation, "CHANNELS_LAST_MIN_PIXELS", None)
    plain = metric.measure(model, x, maps)
    assert not any(model.seen)
    assert plain.cost.forward_images == fast.cost.forward_images
    torch.testing.assert_close(fast.scores, plain.scores, rtol=0, atol=1e-6)
    for key, curve in (fast.curves or {}).items():
        torch.testing.assert_close(curve, plain.curves[key], rtol=0, atol=1e-6)
    monkeypatch.setattr(perturbation, "FAST", False)  # the code before issue 16 (no shared rows either)
    torch.testing.assert_close(metric.measure(model, x, maps).scores, fast.scores, rtol=0, atol=1e-6)


@pytest.mark.usefixtures("one_thread")
def test_channels_last_only_for_large_cpu_images_and_not_for_models_that_refuse_them():
    from saliencylab import perturbation

    small = _LayoutProbe()
    sl.metrics.build("deletion", steps=2).measure(small, torch.randn(1, 3, 32, 32), torch.randn(1, 32, 32))
    assert not any(small.seen)  # below CHANNELS_LAST_MIN_PIXELS: contiguous inputs (faster there)
    refusing, x = _LayoutProbe(flatten_by_view=True), torch.randn(2, 3, 128, 128)
    metric = sl.metrics.build("deletion", steps=3)
    first = metric.measure(refusing, x, torch.randn(2, 128, 128))
    assert refusing in perturbation._NO_CHANNELS_LAST  # the failed call fell back, and is remembered
    # the failed call is not counted as a pass: 1 clean forward + 3 rows per image, the first from it
    assert first.cost.forward_images == 2 + 2 * 3
    refusing.seen.clear()
    again = metric.measure(refusing, x, torch.randn(2, 128, 128))
    assert not any(refusing.seen) and torch.isfinite(again.scores).all()


@pytest.mark.usefixtures("one_thread")
def test_faithfulness_suite_shares_map_independent_passes_across_methods(monkeypatch, tmp_path):
    """The suite's methods are measured inside one shared_passes() scope: sensitivity-N's drops once."""
    from saliencylab import perturbation
    from saliencylab.runs import leaderboard as lb

    assert lb.FAITHFULNESS_METRICS == ("deletion", "insertion", "road", "morf_lerf", "sensitivity_n", "sparseness")
    assert "completeness" in lb.FAITHFULNESS_PRESETS["faithfulness-soundness"]
    model = make_small_cnn().eval()
    x = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))

    def groups(methods, full, seed, images, metrics=lb.FAITHFULNESS_METRICS):
        return [lb.Group("photos", model, x, None, ["sensitivity_n"], {},
                         metric_params={"sensitivity_n": {"samples": 3, "fraction": 0.1}},
                         display=lambda t: lb._unit_rgb(t[:3]))]

    monkeypatch.setattr(lb, "faithfulness_groups", groups)
    calls = []
    scores = perturbation.Perturber.scores

    def counting(self, session, x, target, n, make_masks, **kw):
        calls.append(n)
        return scores(self, session, x, target, n, make_masks, **kw)

    monkeypatch.setattr(perturbation.Perturber, "scores", counting)
    suite = lb.suites.get("faithfulness")
    results = suite.run(["gradient", "input_x_gradient"], tmp_path, full=False, seed=0, images=None,
                        on_record=None, debug=True)
    assert {r.method for r in results[0].records} == {"gradient", "input_x_gradient"}
    assert calls.count(3) == 1  # the 3 subsets of each image forwarded for the first method only
