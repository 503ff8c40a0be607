"""Revertible edits: every temporary change to a model is a handle the session undoes, in reverse order."""

import pytest
import torch
from torch import nn

import saliencylab as sl
from saliencylab.core.session import model_fingerprint
from conftest import make_small_cnn
from core.test_model_untouched import assert_same_state, state


class Boom(RuntimeError):
    pass


def test_edits_undone_in_reverse_order_on_success_and_error(images):
    model = make_small_cnn()
    before = state(model)
    order = []
    for fail in (False, True):
        try:
            with sl.ModelSession(model) as s:
                s.edit(lambda: order.append("first"))
                s.edit(lambda: order.append("second"))
                s.set_attr(model.conv1, "weight", nn.Parameter(torch.zeros_like(model.conv1.weight)))
                s.swap_module("relu1", nn.Tanh())
                s.hook(model.fc, lambda m, a, o: o * 0)
                assert isinstance(model.relu1, nn.Tanh)
                assert bool((s.forward(images) == 0).all())
                if fail:
                    raise Boom()
        except Boom:
            pass
        assert order[-2:] == ["second", "first"], "edits must be undone last-first"
        assert_same_state(before, state(model))


def test_parameter_rewrite_restores_the_same_tensor_object(images):
    model = make_small_cnn()
    weight = model.conv1.weight
    with sl.ModelSession(model) as s:
        s.set_attr(model.conv1, "weight", nn.Parameter(weight.detach() * 2))
        assert model.conv1.weight is not weight
    assert model.conv1.weight is weight
    assert model.conv1._parameters["weight"] is weight


def test_attribute_that_did_not_exist_is_removed():
    model = make_small_cnn()
    with sl.ModelSession(model) as s:
        s.set_attr(model.conv1, "fused_attn", True)
        s.set_attr(model, "forward", lambda x: x)  # an instance-level forward swap
        assert model.conv1.fused_attn is True
    assert not hasattr(model.conv1, "fused_attn")
    assert "forward" not in vars(model)


def test_scope_undoes_its_own_edits_only(images):
    model = make_small_cnn()
    calls = []
    with sl.ModelSession(model) as s:
        s.hook(model.relu1, lambda m, a, o: calls.append("outer"))
        with s.scope():
            s.hook(model.relu2, lambda m, a, o: calls.append("inner"))
            s.forward(images)
        assert calls == ["outer", "inner"]
        calls.clear()
        s.forward(images)
        assert calls == ["outer"], "the scope's hook must be gone after the scope"
    calls.clear()
    model(images)
    assert calls == []


def test_scope_undoes_on_error(images):
    model = make_small_cnn()
    with sl.ModelSession(model) as s:
        with pytest.raises(Boom):
            with s.scope():
                s.swap_module("relu2", nn.Identity())
                raise Boom()
        assert isinstance(model.relu2, nn.ReLU)


def test_handle_undo_is_idempotent():
    model = make_small_cnn()
    with sl.ModelSession(model) as s:
        h = s.set_attr(model.conv1, "stride", (2, 2))
        h.undo()
        h.undo()
        assert model.conv1.stride == (1, 1)
    assert model.conv1.stride == (1, 1)


def test_swap_unknown_module_is_one_clear_error():
    model = make_small_cnn()
    with sl.ModelSession(model) as s:
        with pytest.raises(sl.ConfigError, match="no submodule named 'relu9'"):
            s.swap_module("relu9", nn.Identity())


def test_differentiable_session_keeps_mode_and_flags(images):
    model = make_small_cnn().train()
    model.fc.bias.requires_grad_(False)
    with sl.ModelSession(model, differentiable=True) as s:
        assert model.training and model.conv1.weight.requires_grad and not model.fc.bias.requires_grad
        x = images.clone().requires_grad_(True)
        g = s.grad(s.forward(x)[:, 0], x)
        assert g.requires_grad, "a differentiable session builds the graph of its gradients"
    assert model.training


def test_model_fingerprint_changes_with_weights():
    a, b = make_small_cnn(0), make_small_cnn(0)
    assert model_fingerprint(a) == model_fingerprint(b)
    with torch.no_grad():
        b.fc.bias[0] += 1e-3
    assert model_fingerprint(a) != model_fingerprint(b)
