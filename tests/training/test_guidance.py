"""guidance_loss: the four Model-Guidance losses against hand-computed values, the batch against a loop
over single images, parameter gradients against finite differences, skips and errors."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import saliencylab as sl
from saliencylab.training import GUIDANCE_LOSSES, guidance_loss
from zoo import SmoothToy, central_differences, make_small_cnn

pytestmark = pytest.mark.usefixtures("one_thread")

# A linear model on 1x2x2 images: the input x gradient map of class c on an all-ones image is W[c].
MAP0 = [[1.0, -2.0], [3.0, 0.0]]
MAP1 = [[0.0, 1.0], [2.0, -1.0]]


def linear_model():
    model = nn.Sequential(nn.Flatten(), nn.Linear(4, 2, bias=False)).double()
    with torch.no_grad():
        model[1].weight.copy_(torch.tensor([sum(MAP0, []), sum(MAP1, [])], dtype=torch.float64))
    return model


TOP_ROW = [0, 0, 2, 1]  # (x0, y0, x1, y1): pixels (0, 0) and (0, 1)
LEFT_COLUMN = [0, 0, 1, 2]  # pixels (0, 0) and (1, 0)

# By hand, MAP0 with the top row as the box:
#   energy: positive parts 1, 3 (total 4), inside 1                      -> 1 - 1/4 = 0.75
#   l1: A+/3 = [[1/3, 0], [1, 0]] against [[1, 1], [0, 0]]               -> (2/3 + 1 + 1 + 0)/4 = 2/3
#   rrr: A/3 = [[1/3, -2/3], [1, 0]], squares outside (bottom row)        -> 1 + 0 = 1
# MAP0 with the left column: ppce: A+/3 inside = 1/3, 1                   -> (log 3 + 0)/2
HAND = {("energy", "top"): 0.75, ("l1", "top"): 2 / 3, ("rrr", "top"): 1.0, ("ppce", "left"): math.log(3) / 2,
        # MAP1 (class 1) with the left column: positive parts 1, 2 (total 3), inside 2 -> 1 - 2/3
        ("energy1", "left"): 1 / 3,
        # MAP1 with the top row: A/2 = [[0, 1/2], [1, -1/2]], squares outside = 1 + 1/4
        ("rrr1", "top"): 1.25}


@pytest.mark.parametrize("loss,box", [("energy", TOP_ROW), ("l1", TOP_ROW), ("rrr", TOP_ROW), ("ppce", LEFT_COLUMN)])
def test_hand_computed_values(loss, box):
    x = torch.ones(1, 1, 2, 2, dtype=torch.float64)
    value = guidance_loss(linear_model(), x, [0], boxes=[box], loss=loss)
    key = (loss, "top" if box == TOP_ROW else "left")
    assert value.shape == () and value.requires_grad
    assert float(value) == pytest.approx(HAND[key], abs=1e-12)


def test_sum_over_images_and_mean_and_class_choice():
    model = linear_model()
    x = torch.ones(2, 1, 2, 2, dtype=torch.float64)
    boxes = [LEFT_COLUMN, TOP_ROW]
    # image 0 explains class 1 (energy 1/3), image 1 class 0 (energy 0.75); the authors sum.
    total = guidance_loss(model, x, [1, 0], boxes=boxes)
    assert float(total) == pytest.approx(1 / 3 + 0.75, abs=1e-12)
    mean = guidance_loss(model, x, [1, 0], boxes=boxes, reduction="mean")
    assert float(mean) == pytest.approx((1 / 3 + 0.75) / 2, abs=1e-12)
    rrr = guidance_loss(model, x, torch.tensor([1, 0]), boxes=[TOP_ROW, TOP_ROW], loss="rrr")
    assert float(rrr) == pytest.approx(1.25 + 1.0, abs=1e-12)


def test_energy_without_positive_attribution_is_one():
    x = -torch.ones(1, 1, 2, 2, dtype=torch.float64)
    model = nn.Sequential(nn.Flatten(), nn.Linear(4, 1, bias=False)).double()
    with torch.no_grad():
        model[1].weight.fill_(1.0)  # map = x * 1 = -1 everywhere: no positive attribution
    assert float(guidance_loss(model, x, 0, boxes=[TOP_ROW])) == 1.0


def test_the_map_is_scale_free_for_every_loss():
    """energy, l1, rrr, ppce use A / max|A| (energy a ratio): doubling the image changes nothing."""
    model = linear_model()
    for loss in GUIDANCE_LOSSES:
        one = guidance_loss(model, torch.ones(1, 1, 2, 2, dtype=torch.float64), [0], boxes=[LEFT_COLUMN], loss=loss)
        two = guidance_loss(model, 2 * torch.ones(1, 1, 2, 2, dtype=torch.float64), [0], boxes=[LEFT_COLUMN], loss=loss)
        assert float(one) == pytest.approx(float(two), abs=1e-12)


# -- at a layer: the authors clamp and rescale the layer's map, then upsample -----------------------------
def test_layer_maps_are_processed_at_the_layer_then_upsampled():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.Tanh(), nn.Conv2d(4, 4, 3, stride=2, padding=1),
                          nn.Softplus(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3)).double().eval()
    x = torch.randn(3, 3, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    target = [0, 2, 1]
    boxes = [[0, 0, 4, 4], [2, 2, 8, 6], [1, 0, 7, 3]]
    region = torch.zeros(3, 8, 8, dtype=torch.float64)
    for i, (x0, y0, x1, y1) in enumerate(boxes):
        region[i, y0:y1, x0:x1] = 1
    e = sl.explain(model, x, "gradcam", target=target, layer="2", relu=False)
    low = e.lowres  # (3, 4, 4), signed (relu=False)
    assert low.shape == (3, 4, 4)

    def up(a):
        return F.interpolate(a[:, None], size=(8, 8), mode="bilinear", align_corners=False)[:, 0]

    def rescale(a):
        return a / a.abs().flatten(1).amax(1)[:, None, None]

    l1 = (up(rescale(low.clamp(min=0))) - region).abs().mean((1, 2)).sum()
    rrr = (up(rescale(low)) ** 2 * (1 - region)).sum()
    got_l1 = guidance_loss(model, x, target, boxes=boxes, method="gradcam", layer="2", loss="l1", relu=False)
    got_rrr = guidance_loss(model, x, target, boxes=boxes, method="gradcam", layer="2", loss="rrr", relu=False)
    torch.testing.assert_close(got_l1.detach(), l1)
    torch.testing.assert_close(got_rrr.detach(), rrr)
    # ...which is not what the same loss gives on the upsampled map (the order matters).
    wrong = (rescale(up(low)) ** 2 * (1 - region)).sum()
    assert abs(float(wrong) - float(rrr)) > 1e-3
    # energy: positive part of the upsampled map
    pos = e.maps.clamp(min=0)
    energy = (1 - (pos * region).sum((1, 2)) / pos.sum((1, 2))).sum()
    got = guidance_loss(model, x, target, boxes=boxes, method="gradcam", layer="2", relu=False)
    torch.testing.assert_close(got.detach(), energy)


# -- batch against a loop; train mode and batch norm ------------------------------------------------
@pytest.mark.parametrize("loss", GUIDANCE_LOSSES)
@pytest.mark.parametrize("method,params", [("input_x_gradient", {}), ("gradcam", {"layer": "conv2"}),
                                           ("integrated_gradients", {"steps": 3})])
def test_batch_equals_a_loop_over_images(loss, method, params):
    model = make_small_cnn(dtype=torch.float64)  # eval mode
    x = torch.rand(4, 3, 10, 10, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    target = torch.tensor([0, 3, 1, 4])
    boxes = [[1, 1, 6, 6], [], [0, 2, 10, 9], [[0, 0, 3, 3], [5, 5, 9, 10]]]
    batched, info = guidance_loss(model, x, target, boxes=boxes, method=method, loss=loss, details=True, **params)
    assert info["used"] == 3 and info["skipped"] == 1 and torch.isnan(info["per_image"][1])
    loop = sum(guidance_loss(model, x[i : i + 1], target[i : i + 1], boxes=[boxes[i]], method=method, loss=loss,
                             **params) for i in (0, 2, 3))
    torch.testing.assert_close(batched.detach(), loop.detach(), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(info["per_image"][[0, 2, 3]].sum(), loop.detach())


def test_train_mode_batch_norm_couples_the_images_as_documented():
    model = make_small_cnn(dtype=torch.float64).train()
    model.dropout.p = 0.0
    x = torch.rand(4, 3, 10, 10, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    boxes = torch.tensor([[1, 1, 6, 6]] * 4)
    batched = guidance_loss(model, x, [0, 1, 2, 3], boxes=boxes, reduction="mean")
    # The same images in two batches of two: other batch statistics, other maps.
    halves = (guidance_loss(model, x[:2], [0, 1], boxes=boxes[:2]) + guidance_loss(model, x[2:], [2, 3], boxes=boxes[2:])) / 4
    assert abs(float(batched) - float(halves)) > 1e-6
    # Without batch norm, train mode gives the loop's value.
    plain = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.Softplus(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                          nn.Linear(4, 4)).double().train()
    batched = guidance_loss(plain, x, [0, 1, 2, 3], boxes=boxes)
    loop = sum(guidance_loss(plain, x[i : i + 1], [i], boxes=boxes[i : i + 1]) for i in range(4))
    torch.testing.assert_close(batched.detach(), loop.detach())


def test_the_model_is_untouched():
    model = make_small_cnn(dtype=torch.float64).train()
    model.conv2.bias.requires_grad_(False)
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    buffers = {n: b.clone() for n, b in model.named_buffers()}
    x = torch.rand(3, 3, 10, 10, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    for method, params in [("input_x_gradient", {}), ("gradcam", {"layer": "conv2"})]:
        value = guidance_loss(model, x, [0, 1, 2], boxes=torch.tensor([[0, 0, 5, 5]] * 3), method=method, **params)
        value.backward()
    assert all(m.training for m in model.modules())
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    assert all(torch.equal(b, buffers[n]) for n, b in model.named_buffers())  # running statistics unmoved
    assert sum(len(getattr(m, d)) for m in model.modules()
               for d in ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks")) == 0
    assert model.conv1.weight.grad is not None and model.conv1.weight.grad.abs().sum() > 0
    assert model.conv2.bias.grad is None


# -- gradients against finite differences -----------------------------------------------------------
FD_CASES = [(loss, "input_x_gradient", {}) for loss in GUIDANCE_LOSSES] + [
    ("energy", "gradcam", {"layer": "conv2"}), ("l1", "gradcam", {"layer": "conv2", "relu": False}),
    ("rrr", "integrated_gradients", {"steps": 3})]


@pytest.mark.parametrize("loss,method,params", FD_CASES, ids=[f"{c[0]}-{c[1]}" for c in FD_CASES])
def test_parameter_gradients_match_finite_differences(loss, method, params):
    model = SmoothToy().double().train()
    x = torch.randn(2, 2, 6, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    boxes = [[0, 0, 4, 3], [2, 1, 6, 6]]
    target = [0, 2]

    def f():
        return guidance_loss(model, x, target, boxes=boxes, method=method, loss=loss, **params)

    weight = model.conv1.weight
    (grad,) = torch.autograd.grad(f(), weight)
    assert grad.abs().max() > 0
    entries, fd = central_differences(f, weight, 12)
    torch.testing.assert_close(grad.reshape(-1)[entries], fd, rtol=1e-4, atol=1e-6 * float(fd.abs().max()))


# -- multi-label targets, class boxes, masks ------------------------------------------------------------
def test_multi_hot_targets_draw_a_present_class_reproducibly():
    model = make_small_cnn(dtype=torch.float64)
    x = torch.rand(6, 3, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    labels = torch.tensor([[1, 0, 0, 0, 0], [0, 1, 1, 0, 0], [0, 0, 0, 0, 1], [1, 1, 1, 1, 1],
                           [0, 0, 1, 0, 0], [0, 1, 0, 1, 0]])
    _, a = guidance_loss(model, x, labels, boxes=torch.tensor([[0, 0, 4, 4]] * 6), seed=5, details=True)
    _, b = guidance_loss(model, x, labels, boxes=torch.tensor([[0, 0, 4, 4]] * 6), seed=5, details=True)
    assert torch.equal(a["classes"], b["classes"])
    assert bool(labels[torch.arange(6), a["classes"]].all())  # always a present class
    draws = torch.stack([guidance_loss(model, x[:2], labels[:2], boxes=[[0, 0, 2, 2]] * 2, seed=s, details=True)[1]
                         ["classes"] for s in range(12)])
    assert set(draws[:, 0].tolist()) == {0} and set(draws[:, 1].tolist()) == {1, 2}


def test_boxes_with_a_class_column_keep_the_explained_class_only():
    model = make_small_cnn(dtype=torch.float64)
    x = torch.rand(2, 3, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    classed = [[[1, 0, 0, 4, 4], [3, 4, 4, 8, 8]], [[2, 1, 1, 5, 7]]]
    got, info = guidance_loss(model, x, [3, 1], boxes=classed, details=True)
    want = guidance_loss(model, x[:1], [3], boxes=[[4, 4, 8, 8]])
    assert info["used"] == 1 and info["skipped"] == 1  # image 1 has no box of class 1
    torch.testing.assert_close(got.detach(), want.detach())
    per_class = torch.zeros(2, 5, 8, 8, dtype=torch.bool)
    per_class[0, 3, 4:, 4:] = True
    per_class[0, 1, :4, :4] = True
    via_masks = guidance_loss(model, x, [3, 1], masks=per_class)
    torch.testing.assert_close(via_masks.detach(), want.detach())


# -- skips and errors -------------------------------------------------------------------------------
def test_all_skipped_gives_a_zero_that_backpropagates():
    model = make_small_cnn()
    x = torch.rand(2, 3, 8, 8)
    value, info = guidance_loss(model, x, [0, 1], boxes=[[], [2, 2, 2, 5]], details=True)  # empty, zero-area
    assert float(value) == 0 and value.requires_grad and info == {**info, "used": 0, "skipped": 2, "maps": None}
    (value + model(x).sum()).backward()
    value = guidance_loss(model, x, [0, 1], masks=torch.zeros(2, 8, 8, dtype=torch.bool))
    assert float(value) == 0


@pytest.mark.parametrize("kwargs,error,match", [
    ({"loss": "enrgy"}, sl.ConfigError, "unknown guidance loss 'enrgy'; did you mean energy"),
    ({"boxes": [[0, 0, 9, 4], [0, 0, 2, 2]]}, sl.InputError, "outside the 8x8 image"),
    ({"boxes": [[-1, 0, 3, 4], [0, 0, 2, 2]]}, sl.InputError, "outside the 8x8 image"),
    ({"boxes": [[3, 0, 1, 4], [0, 0, 2, 2]]}, sl.InputError, "x1 >= x0"),
    ({"boxes": [[0, 0, 4, 4]]}, sl.InputError, "got boxes for 1 images, but there are 2"),
    ({"boxes": None}, sl.InputError, "needs the object region"),
    ({"boxes": None, "masks": torch.ones(2, 4, 4, dtype=torch.bool)}, sl.InputError, "masks must have shape"),
    ({"boxes": [[0, 0, 4, 4]] * 2, "method": "gradcam", "layer": "conv9"}, sl.ConfigError, "conv9"),
    ({"boxes": [[0, 0, 4, 4]] * 2, "layer": "conv2"}, sl.ConfigError, "takes no layer"),
    ({"boxes": [[0, 0, 4, 4]] * 2, "method": "occlusion"}, sl.ConfigError, "not differentiable"),
    ({"boxes": [[0, 0, 4, 4]] * 2, "target": torch.tensor([[1, 0, 0, 0, 0], [0] * 5])}, sl.InputError,
     "no present class"),
    ({"boxes": [[0, 0, 4, 4]] * 2, "target": [0, 1, 2]}, sl.InputError, r"target must be \(2,\)"),
    ({"boxes": [[0, 0, 4, 4]] * 2, "reduction": "max"}, sl.ConfigError, "reduction"),
])
def test_bad_input_is_one_clear_line(kwargs, error, match):
    args = {"boxes": [[0, 0, 4, 4], [0, 0, 2, 2]], "target": [0, 1], **kwargs}
    target = args.pop("target")
    with pytest.raises(error, match=match) as info:
        guidance_loss(make_small_cnn(), torch.rand(2, 3, 8, 8), target, **args)
    assert "\n" not in str(info.value)


# -- with_logits: the explanation's forward pass is the step's forward pass ---------------------------
@pytest.mark.parametrize("method,params", [("input_x_gradient", {}), ("gradcam", {"layer": "conv2"}), ("gradcam", {})])
def test_with_logits_equals_a_separate_forward_pass(method, params):
    import copy

    shared = make_small_cnn(dtype=torch.float64).train()
    shared.dropout.p = 0.0  # the same forward pass in both steps
    plain = copy.deepcopy(shared)
    x = torch.rand(4, 3, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    y, boxes = torch.tensor([0, 1, 2, 3]), torch.tensor([[0, 0, 4, 4]] * 4)
    guide, logits = guidance_loss(shared, x, y, boxes=boxes, method=method, with_logits=True, **params)
    assert logits.requires_grad and logits.shape == (4, 5)
    (F.cross_entropy(logits, y) + guide).backward()
    (F.cross_entropy(plain(x), y) + guidance_loss(plain, x, y, boxes=boxes, method=method, **params)).backward()
    for p, q in zip(shared.parameters(), plain.parameters()):
        torch.testing.assert_close(p.grad, q.grad)
    # batch-norm running statistics moved once, as by the separate model(x)
    for a, b in zip(shared.buffers(), plain.buffers()):
        torch.testing.assert_close(a, b)
    assert int(shared.bn1.num_batches_tracked) == 1
    assert all(m.track_running_stats for m in shared.modules() if isinstance(m, nn.BatchNorm2d))


def test_with_logits_refuses_methods_without_a_clean_forward_pass_and_works_when_all_are_skipped():
    model = make_small_cnn(dtype=torch.float64).train()
    x = torch.rand(2, 3, 8, 8, dtype=torch.float64)
    with pytest.raises(sl.ConfigError, match="with_logits=True needs a method that runs one forward pass"):
        guidance_loss(model, x, [0, 1], boxes=[[0, 0, 2, 2]] * 2, method="integrated_gradients", with_logits=True)
    with pytest.raises(sl.ConfigError, match="with_logits=True needs"):  # chunks smaller than the batch
        guidance_loss(model, x, [0, 1], boxes=[[0, 0, 2, 2]] * 2, with_logits=True, batch_size=1)
    value, info = guidance_loss(model, x, [0, 1], boxes=[[], []], with_logits=True, details=True)
    assert float(value) == 0 and info["logits"].requires_grad and info["logits"].shape == (2, 5)


def test_bcos_guidance_when_the_bcos_models_are_there():
    """method="bcos" on a B-cos CNN: the batch equals a loop (eval mode) and the parameter gradient
    matches finite differences."""
    bcos = pytest.importorskip("saliencylab.models.bcos")
    torch.manual_seed(0)
    model = bcos.BcosCNN(num_classes=3, width=4).double().eval()
    x = torch.rand(2, 3, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    boxes = [[0, 0, 4, 5], [2, 2, 8, 8]]

    def f(loss="energy"):
        return guidance_loss(model, x, [0, 2], boxes=boxes, method="bcos", loss=loss)

    for loss in GUIDANCE_LOSSES:
        loop = sum(guidance_loss(model, x[i : i + 1], [[0, 2][i]], boxes=[boxes[i]], method="bcos", loss=loss)
                   for i in range(2))
        torch.testing.assert_close(f(loss).detach(), loop.detach())
    weight = next(p for p in model.parameters() if p.is_contiguous() and p.numel() > 4)
    (grad,) = torch.autograd.grad(f(), weight)
    entries, fd = central_differences(f, weight, 4, seed=None)
    torch.testing.assert_close(grad.reshape(-1)[entries], fd, rtol=1e-4, atol=1e-8)
