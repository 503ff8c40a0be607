"""The user's model is sacred: one generated test over every registered method, on success and failure.

After any call the model has the same hooks, train/eval flags, requires_grad flags, the same parameter and
buffer tensor objects with the same values, the same module tree and the same module attributes.
"""

import pytest
import torch
from torch import nn

import saliencylab as sl
from saliencylab import methods
from conftest import make_small_cnn

# Cheap settings so that every method runs in a fraction of a second on the small model.
CHEAP = {"steps": 3, "samples": 3, "gan_epochs": 1, "iterations": 2, "masks": 16, "epochs": 1}
# Attributes that the user's own code changes during a call (their hook counts calls).
USER_COUNTERS = {"user_hook_calls", "calls"}


def cheap_params(name, **extra):
    known = methods.parameters(name)
    params = {k: v for k, v in {**CHEAP, **extra}.items() if k in known}
    if methods.get(name).needs_data and "data" in known:
        params["data"] = feature_data()
    return params


def model_for(name=None):
    """The model a method's contract tests run on: the small CNN, or a small B-cos CNN for a method that
    declares `requires = "bcos_model"`, or a small ViT for `requires = "vit"` (its class metadata)."""
    if name is not None and getattr(methods.get(name), "requires", None) == "bcos_model":
        from saliencylab.models.bcos import BcosCNN

        torch.manual_seed(0)
        return BcosCNN(num_classes=5, width=4).eval()
    if name is not None and getattr(methods.get(name), "requires", None) == "vit":
        from saliencylab.models.vit import small_vit

        torch.manual_seed(0)
        return small_vit(num_classes=5, img_size=12, patch_size=4, dim=16, depth=2, heads=2).eval()
    return make_small_cnn()


def feature_data():
    g = torch.Generator().manual_seed(7)
    return torch.randn(16, 3, 12, 12, generator=g)


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


_HOOK_DICTS = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks",
               "_forward_hooks_with_kwargs", "_forward_hooks_always_called", "_forward_pre_hooks_with_kwargs",
               "_state_dict_hooks", "_state_dict_pre_hooks", "_load_state_dict_pre_hooks",
               "_load_state_dict_post_hooks")


def state(model):
    """Everything a call could change, by value and by identity."""
    tensors = model.state_dict(keep_vars=True)  # the Parameter and buffer objects themselves
    return {
        "training": {n: m.training for n, m in model.named_modules()},
        "requires_grad": {n: p.requires_grad for n, p in model.named_parameters()},
        "hooks": {n: {d: dict(getattr(m, d)) for d in _HOOK_DICTS if hasattr(m, d)}
                  for n, m in model.named_modules()},
        "tensor_ids": {n: id(t) for n, t in tensors.items()},
        "tensor_ptrs": {n: t.data_ptr() for n, t in tensors.items()},
        "tensors": {n: t.detach().clone() for n, t in tensors.items()},
        "grads": {n: (None if p.grad is None else p.grad.clone()) for n, p in model.named_parameters()},
        "tree": [(n, type(m), id(m)) for n, m in model.named_modules()],
        "attributes": {n: {k: (v if isinstance(v, (bool, int, float, str, type(None))) else id(v))
                           for k, v in vars(m).items() if k not in USER_COUNTERS and k not in _HOOK_DICTS}
                       for n, m in model.named_modules()},
        "forward": {n: m.__dict__.get("forward") for n, m in model.named_modules()},
    }


def assert_same_state(before, after):
    assert before["tree"] == after["tree"], "the module tree changed"
    assert before["training"] == after["training"]
    assert before["requires_grad"] == after["requires_grad"]
    assert before["hooks"] == after["hooks"]
    assert before["tensor_ids"] == after["tensor_ids"], "a parameter or buffer was replaced by another tensor"
    assert before["tensor_ptrs"] == after["tensor_ptrs"], "a parameter or buffer was re-allocated"
    for n, t in before["tensors"].items():
        assert torch.equal(t, after["tensors"][n]), f"tensor {n} changed"
    for n, g in before["grads"].items():
        if g is None:
            assert after["grads"][n] is None, f".grad of {n} appeared"
        else:
            assert torch.equal(g, after["grads"][n]), f".grad of {n} changed"
    assert before["attributes"] == after["attributes"], "a module attribute changed"
    assert before["forward"] == after["forward"], "a module's forward was replaced"


def user_model(name=None):
    """A model in train mode, with a frozen parameter and a hook of the user's own."""
    model = model_for(name)
    model.train()
    first = getattr(model, "conv1", None) or model.patch_embed.proj  # a ViT has no conv1/conv2
    (first.bias if hasattr(first, "bias") else first.linear.weight).requires_grad_(False)
    model.user_hook_calls = 0

    def user_hook(module, args, out):
        model.user_hook_calls += 1

    (getattr(model, "conv2", None) or model.blocks[0]).register_forward_hook(user_hook)
    return model


@pytest.mark.parametrize("name", methods.available())
def test_model_untouched_after_success(name, images):
    model = user_model(name)
    before = state(model)
    sl.explain(model, images, method=name, **cheap_params(name))
    assert_same_state(before, state(model))
    assert model.user_hook_calls > 0  # the user's own hook kept working during the call


@pytest.mark.parametrize("mode,after", [("forward", 0), ("forward", 1), ("backward", 0)])
@pytest.mark.parametrize("name", methods.available())
def test_model_untouched_after_failure(name, mode, after, images):
    if mode == "backward" and not methods.get(name).uses_gradients:
        pytest.skip("forward-only method: no backward pass to fail")
    inner = user_model(name)
    model = Failing(inner, mode, after)
    model.train()
    before = state(model)
    with pytest.raises(Boom):  # batch_size=1: several forward calls, so "after 1" fails mid-method
        sl.explain(model, images, method=name, **cheap_params(name, batch_size=1))
    assert_same_state(before, state(model))


@pytest.mark.parametrize("name", methods.available(differentiable=True))
def test_model_untouched_by_differentiable_call(name, images):
    model = user_model(name)
    before = state(model)
    e = sl.explain(model, images, method=name, create_graph=True, **cheap_params(name))
    assert e.maps.requires_grad
    assert_same_state(before, state(model))  # train mode kept, flags kept, nothing left behind


def test_session_restores_and_counts(images):
    model = user_model()
    before = state(model)
    with sl.ModelSession(model) as s:
        assert not model.training
        assert all(not p.requires_grad for p in model.parameters())
        s.add_forward_hook(model.relu1, lambda m, a, o: None)
        model.relu2.register_forward_hook(lambda m, a, o: None)  # not via the session: removed anyway
        s.forward(images)
        assert s.cost.forward_images == 3 and s.cost.forward_calls == 1
    assert_same_state(before, state(model))
    assert s.cost.seconds > 0


def test_session_rejects_non_module():
    with pytest.raises(sl.InputError, match="torch.nn.Module"):
        sl.ModelSession(lambda x: x)
