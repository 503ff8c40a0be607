"""distillation_loss (e2KD): hand-computed terms, the batch against a loop, the student's parameter
gradients against finite differences, the teacher untouched, the fixed-teacher mode, errors."""

import math

import pytest
import torch
from torch import nn

import saliencylab as sl
from saliencylab.training import distillation_loss, teacher_targets
from zoo import SmoothToy, central_differences, make_small_cnn, sequential_cnn

pytestmark = pytest.mark.usefixtures("one_thread")


def linear_student():
    """logits = W x on 1x2x2 images; the input x gradient of class 0 on an all-ones image is W[0]."""
    model = nn.Sequential(nn.Flatten(), nn.Linear(4, 2, bias=False)).double()
    with torch.no_grad():
        model[1].weight.copy_(torch.tensor([[1.0, 0, 0, 0], [0, 0, 0, 0]], dtype=torch.float64))
    return model


@pytest.mark.parametrize("temperature,weights", [(1.0, (1.0, 1.0, 1.0)), (2.0, (0.5, 2.0, 3.0))])
def test_hand_computed_terms(temperature, weights):
    x = torch.ones(1, 1, 2, 2, dtype=torch.float64)
    t_logits = torch.tensor([[math.log(3), 0.0]], dtype=torch.float64)  # top-1 class 0
    t_maps = torch.tensor([[[[1.0, 1.0], [0.0, 0.0]]]], dtype=torch.float64)
    loss, info = distillation_loss(linear_student(), None, x, torch.tensor([1]), method="input_x_gradient",
                                   temperature=temperature, weights=weights, teacher_logits=t_logits,
                                   teacher_maps=t_maps, details=True)
    T = temperature
    # student logits (1, 0); teacher (log 3, 0)
    q = [math.exp(1 / T) / (math.exp(1 / T) + 1), 1 / (math.exp(1 / T) + 1)]
    p = [3 ** (1 / T) / (3 ** (1 / T) + 1), 1 / (3 ** (1 / T) + 1)]
    kd = T * T * (p[0] * math.log(p[0] / q[0]) + p[1] * math.log(p[1] / q[1]))
    ce = math.log(1 + math.e)  # -log softmax(1, 0)[1]
    explanation = 1 - 1 / math.sqrt(2)  # student map (1, 0, 0, 0) against (1, 1, 0, 0)
    assert float(info["kd"]) == pytest.approx(kd, abs=1e-12)
    assert float(info["gt"]) == pytest.approx(ce, abs=1e-12)
    assert float(info["explanation"]) == pytest.approx(explanation, abs=1e-12)
    assert info["classes"].tolist() == [0]
    assert float(loss) == pytest.approx(weights[0] * ce + weights[1] * kd + weights[2] * explanation, abs=1e-12)


def test_without_labels_there_is_no_cross_entropy_and_weight_zero_skips_the_maps():
    x = torch.ones(1, 1, 2, 2, dtype=torch.float64)
    t_logits = torch.tensor([[0.0, 0.0]], dtype=torch.float64)
    loss, info = distillation_loss(linear_student(), None, x, teacher_logits=t_logits, weights=(1, 1, 0),
                                   method="input_x_gradient", details=True)
    assert info["gt"] is None and info["explanation"] is None and info["student_maps"] is None
    q = math.exp(1) / (math.exp(1) + 1)
    assert float(loss) == pytest.approx(0.5 * math.log(0.5 / q) + 0.5 * math.log(0.5 / (1 - q)), abs=1e-12)


def models():
    student = make_small_cnn(seed=1, dtype=torch.float64)
    teacher = make_small_cnn(seed=2, dtype=torch.float64)
    return student, teacher


@pytest.mark.parametrize("method,params", [("gradcam", {"student_layer": "conv2", "teacher_layer": "conv1"}),
                                           ("input_x_gradient", {})])
def test_batch_equals_the_mean_over_single_images(method, params):
    student, teacher = models()
    x = torch.rand(4, 3, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    y = torch.tensor([0, 1, 2, 3])
    batched = distillation_loss(student, teacher, x, y, method=method, temperature=3.0, weights=(1, 0.5, 2), **params)
    loop = sum(distillation_loss(student, teacher, x[i : i + 1], y[i : i + 1], method=method, temperature=3.0,
                                 weights=(1, 0.5, 2), **params) for i in range(4)) / 4
    torch.testing.assert_close(batched.detach(), loop.detach())


@pytest.mark.parametrize("method,params", [("gradcam", {"student_layer": "conv2"}), ("input_x_gradient", {}),
                                           ("integrated_gradients", {"steps": 3})])
def test_the_shared_forward_pass_gives_the_gradients_of_a_separate_one(method, params):
    """The student's logits come from its explanation's forward pass: same loss and gradients as
    computing the three terms from a separate student(x), written out here."""
    import copy
    import torch.nn.functional as F

    student, teacher = models()
    student.train()
    student.dropout.p = 0.0
    other = copy.deepcopy(student)
    x = torch.rand(4, 3, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    y = torch.tensor([0, 1, 2, 3])
    loss = distillation_loss(student, teacher, x, y, method=method, temperature=2.0, **params)
    loss.backward()
    t_logits, t_maps = teacher_targets(teacher, x, method=method,
                                       **{k: v for k, v in params.items() if k != "student_layer"})
    s_logits = other(x)
    layer = {"layer": params["student_layer"]} if "student_layer" in params else {}
    extra = {k: v for k, v in params.items() if k != "student_layer"}
    s_maps = sl.explain(other, x, method, target=t_logits.argmax(1), create_graph=True,
                        channels=method != "gradcam", **layer, **extra).maps
    by_hand = (F.cross_entropy(s_logits, y)
               + 4 * F.kl_div(F.log_softmax(s_logits / 2, 1), F.softmax(t_logits / 2, 1), reduction="batchmean")
               + (1 - F.cosine_similarity(s_maps.flatten(1), t_maps.flatten(1))).mean())
    by_hand.backward()
    torch.testing.assert_close(loss.detach(), by_hand.detach())
    for p, q in zip(student.parameters(), other.parameters()):
        torch.testing.assert_close(p.grad, q.grad)
    for a, b in zip(student.buffers(), other.buffers()):
        torch.testing.assert_close(a, b)


def test_fixed_teacher_gives_the_live_teacher_loss():
    student, teacher = models()
    x = torch.rand(3, 3, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    live, info = distillation_loss(student, teacher, x, method="gradcam", teacher_layer="conv2", details=True)
    logits, maps = teacher_targets(teacher, x, method="gradcam", teacher_layer="conv2")
    assert maps.shape == (3, 8, 8) and not maps.requires_grad and not logits.requires_grad
    fixed = distillation_loss(student, None, x, method="gradcam", teacher_logits=logits, teacher_maps=maps)
    torch.testing.assert_close(fixed.detach(), live.detach())
    assert torch.equal(info["classes"], logits.argmax(1))
    # other maps give another loss (the term is used)
    other = distillation_loss(student, None, x, method="gradcam", teacher_logits=logits, teacher_maps=maps.flip(-1))
    assert abs(float(other) - float(fixed)) > 1e-6


def test_the_teacher_is_untouched_and_gets_no_gradient():
    student, teacher = models()
    student.train()
    teacher.train()  # even a teacher left in train mode: evaluated in eval mode, mode restored
    flags = {n: p.requires_grad for n, p in teacher.named_parameters()}
    state = {k: v.clone() for k, v in teacher.state_dict().items()}
    x = torch.rand(4, 3, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    loss = distillation_loss(student, teacher, x, torch.tensor([0, 1, 2, 3]), method="gradcam",
                             student_layer="conv2", teacher_layer="conv2")
    loss.backward()
    assert all(p.grad is None for p in teacher.parameters())
    assert student.conv1.weight.grad is not None and student.conv1.weight.grad.abs().sum() > 0
    assert all(m.training for m in teacher.modules()) and all(m.training for m in student.modules())
    assert {n: p.requires_grad for n, p in teacher.named_parameters()} == flags
    assert all(torch.equal(v, state[k]) for k, v in teacher.state_dict().items())
    # the student's one forward pass (shared with its explanation) moved its statistics once
    assert int(student.bn1.num_batches_tracked) == 1 and student.bn1.track_running_stats
    hooks = sum(len(getattr(m, d)) for net in (student, teacher) for m in net.modules()
                for d in ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks"))
    assert hooks == 0


@pytest.mark.parametrize("method,params", [("gradcam", {"student_layer": "conv2", "teacher_layer": "conv2"}),
                                           ("input_x_gradient", {})])
def test_student_gradients_match_finite_differences(method, params):
    student, teacher = SmoothToy(0).double().train(), SmoothToy(1).double()
    x = torch.randn(3, 2, 6, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    y = torch.tensor([0, 2, 1])

    def f():
        return distillation_loss(student, teacher, x, y, method=method, temperature=2.0, weights=(1, 1, 3), **params)

    for weight in (student.conv1.weight, student.fc.weight):
        (grad,) = torch.autograd.grad(f(), weight)
        entries, fd = central_differences(f, weight, 8)
        assert fd.abs().max() > 0
        torch.testing.assert_close(grad.reshape(-1)[entries], fd, rtol=1e-4, atol=1e-6 * float(fd.abs().max()))


@pytest.mark.parametrize("kwargs,error,match", [
    ({"teacher": "four_classes"}, sl.InputError, "disagree on the number of classes: student 5, teacher 4"),
    ({"teacher": None}, sl.InputError, "needs a teacher model, or teacher_logits="),
    ({"teacher": None, "teacher_logits": torch.zeros(2, 5)}, sl.InputError, "teacher_maps="),
    ({"teacher": None, "teacher_logits": torch.zeros(2, 5), "teacher_maps": torch.zeros(2, 4, 4)}, sl.InputError,
     "teacher maps have shape"),
    ({"teacher_logits": torch.zeros(3, 5)}, sl.InputError, r"teacher logits must be \(2, K\)"),
    ({"temperature": 0}, sl.ConfigError, "temperature"),
    ({"weights": (1, 1)}, sl.ConfigError, "three numbers"),
    ({"y": torch.tensor([0, 1, 2])}, sl.InputError, r"y must be \(2,\)"),
    ({"student_layer": "conv7"}, sl.ConfigError, "conv7"),
    ({"method": "occlusion"}, sl.ConfigError, "not differentiable"),
])
def test_bad_input_is_one_clear_line(kwargs, error, match):
    args = {"teacher": make_small_cnn(seed=2), "method": "gradcam", **kwargs}
    if args["teacher"] == "four_classes":
        args["teacher"] = sequential_cnn(classes=4)
    with pytest.raises(error, match=match) as info:
        distillation_loss(make_small_cnn(seed=1), x=torch.rand(2, 3, 8, 8), **args)
    assert "\n" not in str(info.value)


def test_bcos_student_and_teacher_when_the_bcos_models_are_there():
    """e2KD on B-cos networks (method "bcos"): the authors compare W(x) (the dynamic weights); the
    loss is differentiable in the student (finite differences) and the fixed teacher gives the same."""
    bcos = pytest.importorskip("saliencylab.models.bcos")
    torch.manual_seed(0)
    student = bcos.BcosCNN(num_classes=3, width=4).double().train()
    teacher = bcos.BcosCNN(num_classes=3, width=4).double().eval()
    x = torch.rand(2, 3, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(1))

    def f():
        return distillation_loss(student, teacher, x, method="bcos", weights=(0, 1, 2))

    live = f()
    logits, maps = teacher_targets(teacher, x, method="bcos")
    assert maps.shape == (2, 6, 8, 8)  # W(x) on the encoded input
    with_graph = sl.explain(student, x, "bcos", create_graph=True, return_weights=True).extras["weights"].requires_grad
    if not with_graph:  # W(x) without its graph: the contribution maps are compared
        maps = sl.explain(teacher, x, "bcos", target=logits.argmax(1), channels=True).maps
    fixed = distillation_loss(student, None, x, method="bcos", weights=(0, 1, 2), teacher_logits=logits,
                              teacher_maps=maps)
    torch.testing.assert_close(fixed.detach(), live.detach())
    weight = next(p for p in student.parameters() if p.is_contiguous() and p.numel() > 4)
    (grad,) = torch.autograd.grad(live, weight)
    entries, fd = central_differences(f, weight, 4, seed=None)
    torch.testing.assert_close(grad.reshape(-1)[entries], fd, rtol=1e-4, atol=1e-8)


def test_a_loss_that_raises_leaves_the_batch_norm_statistics_alone():
    from torch import nn

    from saliencylab.core.errors import SaliencyLabError
    from saliencylab.training import distillation_loss, guidance_loss

    def net(classes):
        return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 4, 3, padding=1),
                             nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, classes))

    torch.manual_seed(0)
    student, teacher = net(2).train(), net(5).eval()
    x, y = torch.rand(4, 3, 16, 16), torch.tensor([0, 1, 1, 0])
    before = {k: v.clone() for k, v in student.state_dict().items()}
    with pytest.raises(SaliencyLabError, match="number of classes"):
        distillation_loss(student, teacher, x, y, method="gradcam", student_layer="3", teacher_layer="3")
    with pytest.raises(SaliencyLabError):
        guidance_loss(student, x, torch.tensor([0, 1, 7, 0]), boxes=torch.tensor([[2, 2, 10, 10]] * 4), with_logits=True)
    assert all(torch.equal(v, before[k]) for k, v in student.state_dict().items())
    assert student.training
