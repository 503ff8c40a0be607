"""Explanation-enhanced knowledge distillation (e2KD): the student matches the teacher's outputs and
its explanations.

After Parchami-Araghi, Boehle, Rao and Schiele, "Good teachers explain: explanation-enhanced knowledge
distillation" (ECCV 2024); authors' code m-parchami/GoodTeachersExplain (Apache-2.0):
`bcos/distillation_methods/TeachersExplain.py` (`TeachersExplainCriterion.forward` and
`_explanation_loss`, `explanation_aware_forward`, `select_classes_and_teachers`) and the default
criterion `DEFAULT_TE_CRITERION` in `bcos/experiments/ImageNet/final_live/experiment_parameters.py`.

    loss = w_gt * CE(student logits, y)
         + w_kd * T^2 * KL(softmax(teacher / T) || softmax(student / T))      (sum over classes, mean over images)
         + w_exp * mean_i (1 - cos(student map_i, teacher map_i))            (maps flattened per image)

as the authors: KLDivLoss(log_softmax(s/T), softmax(t/T), reduction="none").sum(-1).mean(0) * T^2;
the cross-entropy term only when `y` is given; both maps explain the teacher's top-1 class
(`exp_of="top1"`); the student's map keeps its graph (create_graph), the teacher's is detached.
Defaults as DEFAULT_TE_CRITERION: weights (1, 1, 1), temperature 1.

Maps: "gradcam" (the authors' GRAD_CAM_POS for standard networks: relu(sum_k mean(grad_k) A_k) at the
last feature layer, resized bilinearly to the image) is Grad-CAM at `student_layer` / `teacher_layer`
(None: each model's default layer), upsampled to the image; the cosine is over the flattened
(H, W) maps. Input-space methods (for B-cos networks the authors compare W(x), the dynamic linear
weights, `images.grad` of the explained logit) are compared with their colour channels kept
(`channels=True`), flattened over (C, H, W); a method that returns its dynamic weights in
`extras["weights"]` (B, C, H, W) is compared on those, as the authors.

Fixed teacher ("ffkd"/precomputed mode in the authors' code): give `teacher_logits` (B, K) and, when
the explanation term is on, `teacher_maps` (the maps this function would compute for the teacher:
(B, H, W) for layer methods, (B, C, H, W) for input-space ones); `teacher` may then be None. Anything
missing is computed from `teacher`.

The teacher is never trained: its logits and maps are computed without a graph to its parameters,
in eval mode (inside `saliencylab.explain`'s session; its mode, requires_grad flags and running
statistics are as before afterwards). The student is run in the caller's mode.

Where we differ from the authors: the ground-truth term is cross-entropy (the authors use
cross-entropy for standard networks and a BCE variant for B-cos ones); the student's forward pass for
the logits and its explanation's forward pass are two passes (the authors share one), which agree
in eval mode and, in train mode, see the same batch statistics; with `weights[2] == 0` no map is
computed (the authors' `explanation_distillation=False`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..core.errors import ConfigError, InputError


def distillation_loss(student, teacher, x, y=None, method="gradcam", temperature=1.0, weights=(1.0, 1.0, 1.0),
                      teacher_logits=None, teacher_maps=None, student_layer=None, teacher_layer=None,
                      details=False, **method_params):
    """The e2KD loss of a batch (module docstring): a scalar with gradient to the student only.

    details=True returns (loss, info), info = {"gt": CE term or None, "kd": KL term, "explanation":
    1 - cosine term or None (unweighted, detached), "classes": teacher's top-1 classes,
    "student_maps": the student's maps or None}.
    """
    if not isinstance(x, torch.Tensor) or x.dim() != 4 or x.shape[0] == 0:
        raise InputError(f"x must be a (B, C, H, W) tensor of images, got "
                         f"{tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__}")
    try:
        w_gt, w_kd, w_exp = (float(w) for w in weights)
    except (TypeError, ValueError):
        raise ConfigError(f"weights must be three numbers (gt, kd, explanation), got {weights!r}") from None
    if not (isinstance(temperature, (int, float)) and temperature > 0):
        raise ConfigError(f"temperature must be a positive number, got {temperature!r}")
    B = x.shape[0]
    want_maps = w_exp != 0
    if teacher is None and (teacher_logits is None or (want_maps and teacher_maps is None)):
        raise InputError("distillation needs a teacher model, or teacher_logits= (and teacher_maps= when the "
                         "explanation weight is not 0) for a fixed teacher")

    student_logits = student(x)
    if student_logits.dim() != 2 or student_logits.shape[0] != B:
        raise InputError(f"the student must return (B, K) logits; got {tuple(student_logits.shape)}")

    teacher_expl = None
    if teacher_logits is None:
        if want_maps and teacher_maps is None:
            teacher_expl = _teacher_explanation(teacher, x, None, method, teacher_layer, method_params)
            teacher_logits = teacher_expl.outputs
        else:
            teacher_logits = _teacher_logits(teacher, x)
    teacher_logits = torch.as_tensor(teacher_logits).detach().to(student_logits.device, student_logits.dtype)
    if teacher_logits.dim() != 2 or teacher_logits.shape[0] != B:
        raise InputError(f"teacher logits must be ({B}, K); got {tuple(teacher_logits.shape)}")
    if teacher_logits.shape[1] != student_logits.shape[1]:
        raise InputError(f"student and teacher disagree on the number of classes: student "
                         f"{student_logits.shape[1]}, teacher {teacher_logits.shape[1]}")
    classes = teacher_logits.argmax(dim=1)  # select_classes_and_teachers(exp_of="top1")

    T = float(temperature)
    kd = F.kl_div(F.log_softmax(student_logits / T, dim=1), F.softmax(teacher_logits / T, dim=1),
                  reduction="none").sum(dim=-1).mean(dim=0) * T ** 2
    total = w_kd * kd
    gt = None
    if y is not None:
        y = torch.as_tensor(y, device=student_logits.device)
        if y.shape != (B,):
            raise InputError(f"y must be ({B},) class indices, got shape {tuple(y.shape)}")
        gt = F.cross_entropy(student_logits, y.long())
        total = total + w_gt * gt

    exp_term, student_maps = None, None
    if want_maps:
        if teacher_maps is None:
            if teacher_expl is None:
                teacher_expl = _teacher_explanation(teacher, x, classes, method, teacher_layer, method_params)
            teacher_maps = _comparable(teacher_expl, method)
        teacher_maps = torch.as_tensor(teacher_maps).detach().to(x.device)
        student_maps = _comparable(_explain(student, x, classes, method, student_layer, method_params, True), method)
        if tuple(teacher_maps.shape) != tuple(student_maps.shape):
            raise InputError(f"teacher maps have shape {tuple(teacher_maps.shape)} but the student's maps "
                             f"have shape {tuple(student_maps.shape)}")
        cos = F.cosine_similarity(student_maps.reshape(B, -1), teacher_maps.to(student_maps.dtype).reshape(B, -1))
        exp_term = (1 - cos).mean()  # TeachersExplainCriterion._explanation_loss, then .mean()
        total = total + w_exp * exp_term
    if details:
        return total, {"gt": None if gt is None else gt.detach(), "kd": kd.detach(),
                       "explanation": None if exp_term is None else exp_term.detach(),
                       "classes": classes, "student_maps": student_maps}
    return total


def teacher_targets(teacher, x, method="gradcam", teacher_layer=None, **method_params):
    """Precompute a fixed teacher's (logits, maps) for `distillation_loss(teacher_logits=,
    teacher_maps=)` (maps of the teacher's top-1 class)."""
    expl = _teacher_explanation(teacher, x, None, method, teacher_layer, method_params)
    return expl.outputs, _comparable(expl, method)


def _teacher_logits(teacher, x):
    from ..core.session import ModelSession

    with torch.no_grad(), ModelSession(teacher) as session:  # eval mode, frozen, restored after
        return session.forward(x).detach()


def _teacher_explanation(teacher, x, classes, method, layer, method_params):
    # target None: the teacher's predicted (top-1) class, resolved in the same pass
    return _explain(teacher, x, classes, method, layer, method_params, False)


def _explain(model, x, classes, method, layer, method_params, create_graph):
    from .. import methods as _methods
    from ..api import explain

    params = dict(method_params)
    input_space = True
    if isinstance(method, str):
        if method not in _methods.available():
            from ..core.errors import unknown_name

            raise unknown_name("method", method, _methods.available(differentiable=True))
        cls = _methods.get(method)
        input_space = cls.input_space
        declared = _methods.parameters(method)
        if layer is not None:
            if "layer" not in declared:
                raise ConfigError(f"method '{method}' works at the input and takes no layer")
            params["layer"] = layer
        size = declared.get("batch_size")
        if "batch_size" in declared and "batch_size" not in params and isinstance(size, int) and size < len(x):
            params["batch_size"] = len(x)
    else:  # a Method class or instance
        input_space = bool(getattr(method, "input_space", True))
        if layer is not None:
            params["layer"] = layer
    return explain(model, x, method, target=classes, create_graph=create_graph, channels=input_space, **params)


def _comparable(expl, method):
    """The maps the cosine compares: dynamic weights where the method gives them, else the maps."""
    weights = expl.extras.get("weights") if isinstance(expl.extras, dict) else None
    if isinstance(weights, torch.Tensor) and weights.dim() == 4 and weights.shape[0] == expl.maps.shape[0]:
        return weights
    return expl.maps
