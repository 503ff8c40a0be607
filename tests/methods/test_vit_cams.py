"""The CAM family and the gradient methods on token grids: timm-style ViTs (with and without register
tokens) and the torchvision layout, at a block's output, with no reshape function.

The Grad-CAM reference is the pytorch-grad-cam way (jacobgil/pytorch-grad-cam, usage_examples/
vit_example.py `reshape_transform` and pytorch_grad_cam/grad_cam.py `GradCAM.get_cam_weights`): hook the
layer, drop the prefix tokens, reshape to (B, h, w, D), move channels first, weights = the mean
gradient over the grid, relu(sum_c w_c A_c) (before pytorch-grad-cam's min-max scaling)."""

import pytest
import torch

import saliencylab as sl
from saliencylab import methods
from saliencylab.models.vit import small_vit
from test_torchvision_vit import make_tv_vit

CAMS = sorted(n for n in methods.available() if methods.get(n).__module__ == "saliencylab.methods.cam")
GRADIENTS = {"gradient": {}, "input_x_gradient": {}, "integrated_gradients": dict(steps=4),
             "smoothgrad": dict(samples=3, seed=1)}


def make_timm(reg_tokens=0):
    torch.manual_seed(0)
    model = small_vit(num_classes=5, img_size=16, patch_size=4, dim=16, depth=3, heads=2, reg_tokens=reg_tokens).eval()
    with torch.no_grad():
        for block in model.blocks:
            block.attn.qkv.weight.normal_(0, 0.5)
        model.cls_token.normal_(0, 0.5)
        if model.reg_token is not None:
            model.reg_token.normal_(0, 0.5)
    return model


# name -> (model, prefix tokens, a block's output, the last block's first norm as pytorch-grad-cam's example)
MODELS = {
    "timm": (lambda: make_timm(), 1, "blocks.1", "blocks.2.norm1"),
    "timm_registers": (lambda: make_timm(reg_tokens=4), 5, "blocks.1", "blocks.2.norm1"),
    "torchvision": (make_tv_vit, 1, "encoder.layers.encoder_layer_1", "encoder.layers.encoder_layer_2.ln_1"),
}


@pytest.fixture(scope="module")
def images():
    return torch.randn(3, 3, 16, 16, generator=torch.Generator().manual_seed(7))


def assert_close(a, b, atol=1e-5):
    assert torch.allclose(a, b, rtol=1e-4, atol=atol), float((a - b).abs().max())


@pytest.mark.parametrize("model_name", sorted(MODELS))
@pytest.mark.parametrize("method", CAMS)
def test_cams_on_token_grids(model_name, method, images):
    make, _, block, _ = MODELS[model_name]
    model = make()
    targets = torch.tensor([1, 4, 2])
    whole = sl.explain(model, images, method, target=targets, layer=block)
    assert whole.maps.shape == (3, 16, 16) and whole.lowres.shape == (3, 4, 4), whole.lowres.shape
    assert whole.extras["layer"] == block
    assert whole.lowres.abs().sum() > 0 and not torch.allclose(whole.lowres[0], whole.lowres[1])
    # batch invariance: one image per pass, and an image explained alone
    one = sl.explain(model, images, method, target=targets, layer=block, batch_size=1)
    assert_close(one.maps, whole.maps)
    alone = sl.explain(model, images[1:2], method, target=targets[1:2], layer=block)
    assert_close(alone.maps[0], whole.maps[1])


@pytest.mark.parametrize("model_name", sorted(MODELS))
def test_default_layer_on_token_grids(model_name, images):
    model = MODELS[model_name][0]()
    e = sl.explain(model, images[:2], "gradcam")  # found by the probe, no reshape
    assert e.lowres.shape == (2, 4, 4) and e.lowres.abs().sum() > 0


def _reshape_transform(tensor, prefix, height, width):
    # pytorch-grad-cam's reshape_transform with the prefix count as a parameter
    result = tensor[:, prefix:, :].reshape(tensor.size(0), height, width, tensor.size(2))
    return result.transpose(2, 3).transpose(1, 2)


def reference_gradcam(model, images, targets, layer, prefix):
    module = model.get_submodule(layer)
    kept = {}

    def hook(m, args, output):
        output.retain_grad()
        kept["a"] = output

    handle = module.register_forward_hook(hook)
    try:
        logits = model(images)
        logits[torch.arange(len(images)), targets].sum().backward()
    finally:
        handle.remove()
    acts = _reshape_transform(kept["a"].detach(), prefix, 4, 4)
    grads = _reshape_transform(kept["a"].grad, prefix, 4, 4)
    weights = grads.mean(dim=(2, 3))
    return (weights[:, :, None, None] * acts).sum(1).clamp(min=0)


@pytest.mark.parametrize("model_name", sorted(MODELS))
@pytest.mark.parametrize("which", ["block", "norm"])
def test_gradcam_equals_the_reshape_reference(model_name, which, images):
    make, prefix, block, norm = MODELS[model_name]
    layer = block if which == "block" else norm
    model = make()
    targets = torch.tensor([1, 4, 2])
    e = sl.explain(model, images, "gradcam", target=targets, layer=layer)
    reference = reference_gradcam(model, images, targets, layer, prefix)
    assert reference.abs().sum() > 0
    assert_close(e.lowres, reference, 1e-6)
    declared = sl.explain(model, images, "gradcam", target=targets, layer=layer, layout="tokens")
    assert torch.equal(declared.lowres, e.lowres)  # the declared layout reads the same grid


@pytest.mark.parametrize("model_name", ["timm", "torchvision"])
@pytest.mark.parametrize("method", sorted(GRADIENTS))
def test_gradient_methods(model_name, method, images):
    model = MODELS[model_name][0]()
    targets = torch.tensor([0, 3, 3])
    kwargs = GRADIENTS[method]
    whole = sl.explain(model, images, method, target=targets, **kwargs)
    assert whole.maps.shape == (3, 16, 16) and whole.maps.abs().sum() > 0
    one = sl.explain(model, images, method, target=targets, batch_size=1, **kwargs)
    assert_close(one.maps, whole.maps)
    # an image explained alone, under its own id (SmoothGrad's noise is keyed by it)
    alone = sl.explain(model, images[2:], method, target=targets[2:], image_ids=[2], **kwargs)
    assert_close(alone.maps[0], whole.maps[2])


def test_register_tokens_on_a_grid_the_shape_cannot_tell():
    torch.manual_seed(0)
    model = small_vit(num_classes=5, img_size=8, patch_size=4, dim=16, depth=2, heads=2, reg_tokens=4).eval()
    x = torch.randn(2, 3, 8, 8)
    assert sl.explain(model, x, "attention_rollout").lowres.shape == (2, 2, 2)  # rollout knows the prefix
    assert sl.explain(model, x, "gradcam", layer="blocks.0").lowres.shape == (2, 2, 2)  # the model's num_prefix_tokens
    assert sl.explain(model, x, "score_cam", layer="blocks.0").lowres.shape == (2, 2, 2)
    assert sl.explain(model, x, "gradcam", layer="patch_embed").lowres.shape == (2, 2, 2)  # no prefix tokens there


def test_default_cam_layer_on_a_timm_vit_is_the_last_block_norm_not_its_fused_qkv():
    """The last token output with gradient is `attn.qkv` (keys and values of every patch reach the class
    token); its channels mix queries, keys and values, so the default is the norm before it, as in
    pytorch-grad-cam's ViT example (`target_layers = [model.blocks[-1].norm1]`)."""
    torch.manual_seed(0)
    model = small_vit(num_classes=5, img_size=16, patch_size=4, dim=16, depth=2, heads=2).eval()
    e = sl.explain(model, torch.randn(2, 3, 16, 16), "gradcam")
    assert e.extras["layer"] == "blocks.1.norm1"
    assert e.lowres.shape == (2, 4, 4)
