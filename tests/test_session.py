"""The user's model is sacred: one generated test over every registered method, on success and failure."""

import pytest
import torch
from torch import nn

import saliencylab as sl
from saliencylab import methods
from conftest import make_small_cnn

# Cheap settings so that every method runs in a fraction of a second on the small model.
CHEAP = {"steps": 3, "samples": 3, "gan_epochs": 1}


def cheap_params(name, **extra):
    known = methods.parameters(name)
    return {k: v for k, v in {**CHEAP, **extra}.items() if k in known}


class Boom(RuntimeError):
    pass


class _FailInBackward(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        raise Boom("backward failed on purpose")


class Failing(nn.Module):
    """Wraps a model; raises in the forward pass after `after` calls, or in every backward pass."""

    def __init__(self, inner, mode, after=0):
        super().__init__()
        self.inner, self.mode, self.after, self.calls = inner, mode, after, 0

    def forward(self, x):
        self.calls += 1
        if self.mode == "forward" and self.calls > self.after:
            raise Boom("forward failed on purpose")
        out = self.inner(x)
        return _FailInBackward.apply(out) if self.mode == "backward" else out


def state(model):
    hooks = {
        name: {d: len(getattr(m, d)) for d in ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks",
                                                "_backward_pre_hooks") if hasattr(m, d)}
        for name, m in model.named_modules()
    }
    return {
        "training": {n: m.training for n, m in model.named_modules()},
        "requires_grad": {n: p.requires_grad for n, p in model.named_parameters()},
        "hooks": hooks,
        "tensors": {n: t.detach().clone() for n, t in list(model.state_dict().items())},
        "grads": {n: (None if p.grad is None else p.grad.clone()) for n, p in model.named_parameters()},
    }


def assert_same_state(before, after):
    assert before["training"] == after["training"]
    assert before["requires_grad"] == after["requires_grad"]
    assert before["hooks"] == after["hooks"]
    for n, t in before["tensors"].items():
        assert torch.equal(t, after["tensors"][n]), f"tensor {n} changed"
    for n, g in before["grads"].items():
        if g is None:
            assert after["grads"][n] is None, f".grad of {n} appeared"
        else:
            assert torch.equal(g, after["grads"][n]), f".grad of {n} changed"


def user_model():
    """A model in train mode, with a frozen parameter and a hook of the user's own."""
    model = make_small_cnn()
    model.train()
    model.conv1.bias.requires_grad_(False)
    model.user_hook_calls = 0

    def user_hook(module, args, out):
        model.user_hook_calls += 1

    model.conv2.register_forward_hook(user_hook)
    return model


@pytest.mark.parametrize("name", methods.available())
def test_model_untouched_after_success(name, images):
    model = user_model()
    before = state(model)
    sl.explain(model, images, method=name, **cheap_params(name))
    assert_same_state(before, state(model))
    assert model.user_hook_calls > 0  # the user's own hook kept working during the call


@pytest.mark.parametrize("mode,after", [("forward", 0), ("forward", 1), ("backward", 0)])
@pytest.mark.parametrize("name", methods.available())
def test_model_untouched_after_failure(name, mode, after, images):
    if mode == "backward" and not methods.get(name).uses_gradients:
        pytest.skip("forward-only method: no backward pass to fail")
    inner = user_model()
    model = Failing(inner, mode, after)
    model.train()
    before = state(model)
    with pytest.raises(Boom):  # batch_size=1: several forward calls, so "after 1" fails mid-method
        sl.explain(model, images, method=name, **cheap_params(name, batch_size=1))
    assert_same_state(before, state(model))


def test_session_restores_and_counts(images):
    model = user_model()
    before = state(model)
    with sl.ModelSession(model) as s:
        assert not model.training
        assert all(not p.requires_grad for p in model.parameters())
        s.add_forward_hook(model.relu1, lambda m, a, o: None)
        model.relu2.register_forward_hook(lambda m, a, o: None)  # not via the session: removed anyway
        out = s.forward(images)
        assert s.cost.forward_images == 3 and s.cost.forward_calls == 1
    assert_same_state(before, state(model))
    assert s.cost.seconds > 0


def test_session_rejects_non_module():
    with pytest.raises(sl.InputError, match="torch.nn.Module"):
        sl.ModelSession(lambda x: x)
