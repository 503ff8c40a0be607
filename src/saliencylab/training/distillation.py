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
(`channels=True`), flattened over (C, H, W). A method that can return its dynamic weights
(`return_weights`, B-cos: W(x) in `extras["weights"]`, (B, 6, H, W) on the encoded input) is asked
for them and compared on them, as the authors, when the student's weights carry their graph
(create_graph); otherwise its contribution maps are compared.

Fixed teacher ("ffkd"/precomputed mode in the authors' code): give `teacher_logits` (B, K) and, when
the explanation term is on, `teacher_maps` (the maps this function would compute for the teacher:
(B, H, W) for layer methods, (B, C, H, W) for input-space ones); `teacher` may then be None. Anything
missing is computed from `teacher`.

The teacher is never trained: its logits and maps are computed without a graph to its parameters,
in eval mode (inside `saliencylab.explain`'s session; its mode, requires_grad flags and running
statistics are as before afterwards). The student is run in the caller's mode.

The student's logits come from its explanation's own forward pass (one forward pass per step, as
the authors' `explanation_aware_forward`), which then updates batch-norm running statistics once, as
`student(x)` would; a method without one forward pass over the batch (integrated gradients) gets a
separate `student(x)`. With `weights[2] == 0` no map is computed (the authors'
`explanation_distillation=False`) and the logits come from `student(x)`.

Where we differ from the authors: the ground-truth term is cross-entropy (the authors use
cross-entropy for standard networks and a BCE variant for B-cos ones); the teacher is evaluated in
eval mode whatever its mode (the authors' teacher is a frozen model in eval mode); for B-cos, while
the bcos method returns W(x) without its graph, the contribution maps W(x) x (colour channels folded,
(B, 3, H, W)) are compared instead of W(x).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..core.errors import ConfigError, InputError, SaliencyLabError
from ..core.layers import resolve_layers
from .guidance import _SharedForward, buffers_kept_on_error


@buffers_kept_on_error
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

    method_params = _with_weights(method, method_params)
    teacher_expl = None
    if teacher_logits is None:
        if want_maps and teacher_maps is None:
            teacher_expl = _teacher_explanation(teacher, x, None, method, teacher_layer, method_params)
            teacher_logits = teacher_expl.outputs
        else:
            teacher_logits = _teacher_logits(teacher, x)
    teacher_logits = torch.as_tensor(teacher_logits).detach().to(x.device)
    if teacher_logits.dim() != 2 or teacher_logits.shape[0] != B:
        raise InputError(f"teacher logits must be ({B}, K); got {tuple(teacher_logits.shape)}")
    classes = teacher_logits.argmax(dim=1)  # select_classes_and_teachers(exp_of="top1")

    student_maps = None
    if want_maps:
        if teacher_maps is None and teacher_expl is None:
            teacher_expl = _teacher_explanation(teacher, x, classes, method, teacher_layer, method_params)
        # The student's logits come from its explanation's forward pass where the method runs one over
        # the batch (one forward pass per step, as the authors); else from a separate student(x).
        wrapper = _SharedForward(student, x.detach())
        layer = student_layer
        if layer is not None and not isinstance(layer, torch.nn.Module):
            ((_, layer),) = resolve_layers(student, layer)
        try:
            expl = _explain(wrapper, x, classes, method, layer, method_params, True)
        except SaliencyLabError:
            _check_classes(_student_classes(student, x), teacher_logits.shape[1])
            raise
        # Dynamic weights W(x) (the authors' B-cos comparison) where the student's carry their graph
        # and the teacher's are there; else the maps.
        s_weights = _weights(expl)
        if teacher_maps is not None:
            teacher_maps = torch.as_tensor(teacher_maps).detach().to(x.device)
            use = s_weights is not None and s_weights.requires_grad and s_weights.shape == teacher_maps.shape
        else:
            t_weights = _weights(teacher_expl)
            use = s_weights is not None and s_weights.requires_grad and t_weights is not None
            teacher_maps = (t_weights if use else teacher_expl.maps).detach()
        student_maps = s_weights if use else expl.maps
        student_logits = wrapper.logits if wrapper.logits is not None else student(x)
    else:
        student_logits = student(x)
    if student_logits.dim() != 2 or student_logits.shape[0] != B:
        raise InputError(f"the student must return (B, K) logits; got {tuple(student_logits.shape)}")
    _check_classes(student_logits.shape[1], teacher_logits.shape[1])
    teacher_logits = teacher_logits.to(student_logits.dtype)

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

    exp_term = None
    if want_maps:
        if tuple(teacher_maps.shape) != tuple(student_maps.shape):
            why = ""
            if s_weights is not None and not s_weights.requires_grad and s_weights.shape == teacher_maps.shape:
                why = ("; the method returns its weights W(x) without their graph, so the student's maps are "
                       "compared: give the teacher's maps of the same kind")
            raise InputError(f"teacher maps have shape {tuple(teacher_maps.shape)} but the student's maps "
                             f"have shape {tuple(student_maps.shape)}{why}")
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
    teacher_maps=)` (maps of the teacher's top-1 class; for a method with `return_weights`, B-cos,
    its weights W(x) (B, 6, H, W), which the student's are compared with when they carry their graph;
    else pass `sl.explain(teacher, x, method, target=top1, channels=True).maps`)."""
    expl = _teacher_explanation(teacher, x, None, method, teacher_layer, _with_weights(method, method_params))
    weights = _weights(expl)
    return expl.outputs, (expl.maps if weights is None else weights).detach()


def _check_classes(student_k, teacher_k):
    if student_k != teacher_k:
        raise InputError(f"student and teacher disagree on the number of classes: student {student_k}, "
                         f"teacher {teacher_k}")


def _student_classes(student, x) -> int:
    from ..core.session import ModelSession

    with torch.no_grad(), ModelSession(student) as session:  # eval mode: no running statistics move
        out = session.forward(x[:1])
    return out.shape[-1] if out.dim() == 2 else -1


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


def _with_weights(method, method_params):
    """Ask a method that can return its dynamic linear weights (B-cos: `return_weights`) for them."""
    from .. import methods as _methods

    params = dict(method_params)
    declared = _methods.parameters(method) if isinstance(method, str) and method in _methods.available() else {}
    if "return_weights" in declared and "return_weights" not in params:
        params["return_weights"] = True
    return params


def _weights(expl):
    """The explanation's dynamic weights (B, C, H, W) in extras["weights"], or None."""
    w = expl.extras.get("weights") if expl is not None and isinstance(expl.extras, dict) else None
    return w if isinstance(w, torch.Tensor) and w.dim() == 4 and w.shape[0] == expl.maps.shape[0] else None
