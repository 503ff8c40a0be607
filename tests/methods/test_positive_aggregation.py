"""The positive-aggregation study's methods and toggles (Khakzar, Baselizadeh, Navab 2020): DeconvNet,
RectGrad, Score-CAM, and the signed/positive switches of Grad-CAM++, LayerCAM and FullGrad."""

import torch
import torch.nn.functional as F
from torch import nn

import saliencylab as sl
from saliencylab.methods.cam import gradcam_plus_plus_combine, layercam_combine
from saliencylab.methods.fullgrad import postprocess
from saliencylab.methods.guided import nearest_percentile
from zoo import VGGLike


def relu_net(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.ReLU(), nn.Conv2d(6, 8, 3, padding=1), nn.ReLU(),
                         nn.MaxPool2d(2), nn.Flatten(), nn.Linear(8 * 4 * 4, 5)).double().eval()


def images(n=3, size=8, seed=1):
    return torch.randn(n, 3, size, size, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))


def test_deconvnet_matches_captum():
    from captum.attr import Deconvolution
    model, x = relu_net(), images()
    targets = model(x).argmax(1)
    theirs = Deconvolution(model).attribute(x.clone().requires_grad_(True), target=targets).detach()
    ours = sl.explain(model, x, "deconvnet", channels=True).maps
    assert torch.allclose(ours, theirs, atol=1e-12)
    plain = sl.explain(model, x, "gradient", channels=True).maps
    guided = sl.explain(model, x, "guided_backprop", channels=True).maps
    assert not torch.allclose(ours, plain) and not torch.allclose(ours, guided)


def test_deconvnet_on_in_place_relus_is_not_guided_backprop():
    model = VGGLike().double().eval()  # torchvision's structure: ReLU(inplace=True)
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64, generator=torch.Generator().manual_seed(8))
    deconv = sl.explain(model, x, "deconvnet", channels=True).maps
    guided = sl.explain(model, x, "guided_backprop", channels=True).maps
    assert not torch.allclose(deconv, guided)
    for m in model.modules():
        if isinstance(m, nn.ReLU):
            m.inplace = False
    assert torch.allclose(sl.explain(model, x, "deconvnet", channels=True).maps, deconv, atol=1e-14)
    assert all(m.inplace for m in VGGLike().modules() if isinstance(m, nn.ReLU))


def reference_rectgrad(model, x, q, zero_border):
    """One image at a time with tensor hooks: the gradient reaching each ReLU output is kept where
    output x gradient > its 'nearest' q-th percentile (numpy, per image); conv outputs of 'same'
    convolutions get their 1-pixel gradient border zeroed; map = gradient x input."""
    import numpy as np
    maps = []
    for i in range(x.shape[0]):
        inp = x[i:i + 1].clone().requires_grad_(True)
        h = inp
        for layer in model:
            h = layer(h)
            if isinstance(layer, nn.ReLU):
                out = h

                def rect(g, out=out):
                    imp = (out * g).detach().numpy().ravel()
                    t = np.percentile(imp, q, method="nearest")
                    return torch.where(out * g > t, g, torch.zeros_like(g))
                h.register_hook(rect)
            elif isinstance(layer, nn.Conv2d) and zero_border:
                def border(g):
                    g = g.clone()
                    g[..., 0, :] = 0
                    g[..., -1, :] = 0
                    g[..., :, 0] = 0
                    g[..., :, -1] = 0
                    return g
                h.register_hook(border)
        target = int(h.argmax(1))
        (g,) = torch.autograd.grad(h[0, target], inp)
        maps.append((g * inp).detach())
    return torch.cat(maps)


def test_rectgrad_matches_a_hook_reference():
    model, x = relu_net(2), images(seed=3)
    for zero_border in (False, True):
        ours = sl.explain(model, x, "rectgrad", percentile=90, zero_border=zero_border, channels=True).maps
        theirs = reference_rectgrad(model, x, 90, zero_border)
        assert torch.allclose(ours, theirs, atol=1e-12), zero_border
    # the default 98th percentile passes far less than the plain gradient x input
    ours = sl.explain(model, x, "rectgrad", channels=True).maps
    ixg = sl.explain(model, x, "input_x_gradient", channels=True).maps
    assert (ours != 0).sum() < (ixg != 0).sum()


def test_nearest_percentile_is_numpys():
    import numpy as np
    v = torch.randn(3, 777, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    for q in (0, 50, 90, 98, 100):
        theirs = torch.tensor([np.percentile(r.numpy(), q, method="nearest") for r in v], dtype=torch.float64)
        assert torch.equal(nearest_percentile(v, q), theirs), q


def test_score_cam_matches_the_authors_loop():
    model = VGGLike().double().eval()
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    e = sl.explain(model, x, "score_cam", layer="features.10", batch_size=5)
    for i in range(2):
        xi = x[i:i + 1]
        acts = {}
        handle = model.features[10].register_forward_hook(lambda m, a, o: acts.__setitem__("A", o.detach()))
        with torch.no_grad():
            cls = int(model(xi).argmax(1))
        handle.remove()
        A = acts["A"]
        total = torch.zeros(1, 1, 32, 32, dtype=torch.float64)
        for k in range(A.shape[1]):
            up = F.interpolate(A[:, k:k + 1], size=(32, 32), mode="bilinear", align_corners=False)
            if up.max() == up.min():
                continue
            norm = (up - up.min()) / (up.max() - up.min())
            with torch.no_grad():
                p = F.softmax(model(xi * norm), dim=1)[0, cls]
            total += p * up
        assert torch.allclose(e.maps[i], F.relu(total)[0, 0], rtol=1e-9, atol=1e-12)
    assert e.cost.backward_images == 0


def test_signed_toggles_follow_their_formulas():
    g = torch.Generator().manual_seed(6)
    acts = torch.rand(2, 4, 5, 5, generator=g, dtype=torch.float64)
    grads = torch.randn(2, 4, 5, 5, generator=g, dtype=torch.float64)
    assert torch.allclose(layercam_combine(acts, grads, positive_gradients=False), (grads * acts).sum(1))
    assert torch.allclose(layercam_combine(acts, grads), (grads.clamp(min=0) * acts).sum(1))
    g2, g3 = grads ** 2, grads ** 3
    alpha = g2 / (2 * g2 + acts.sum((2, 3), keepdim=True) * g3)
    signed = ((alpha * grads).sum((2, 3), keepdim=True) * acts).sum(1)
    assert torch.allclose(gradcam_plus_plus_combine(acts, grads, positive_gradients=False), signed)
    t = torch.randn(2, 3, 4, 4, generator=g, dtype=torch.float64)
    assert torch.allclose(postprocess(t, eps=0, mode="signed"), t / t.flatten(1).abs().amax(1).view(-1, 1, 1, 1))
    r = t.clamp(min=0)
    assert torch.allclose(postprocess(t, eps=0, mode="relu"), r / r.flatten(1).amax(1).view(-1, 1, 1, 1))
    model, x = relu_net(), images()
    for method, key in (("gradcam_plus_plus", "positive_gradients"), ("layercam", "positive_gradients")):
        on = sl.explain(model, x, method, layer="2", relu=False).maps
        off = sl.explain(model, x, method, layer="2", relu=False, **{key: False}).maps
        assert not torch.allclose(on, off), method
    abs_map = sl.explain(model, x, "fullgrad").maps
    signed_map = sl.explain(model, x, "fullgrad", postprocess="signed").maps
    assert (signed_map < 0).any() and (abs_map >= 0).all()


def test_score_cam_channels_keeps_the_most_varying_channels():
    model = VGGLike().double().eval()
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64, generator=torch.Generator().manual_seed(7))
    full = sl.explain(model, x, "score_cam", layer="features.10")
    few = sl.explain(model, x, "score_cam", layer="features.10", top_channels=3)
    assert few.cost.forward_images == 2 * (3 + 1) and full.cost.forward_images == 2 * (16 + 1)
    A = {}
    h = model.features[10].register_forward_hook(lambda m, a, o: A.__setitem__("A", o.detach()))
    model(x)
    h.remove()
    top = A["A"].flatten(2).var(2).topk(3, dim=1).indices
    w_full, w_few = full.extras["weights"], few.extras["weights"]
    for i in range(2):
        assert torch.allclose(w_few[i, top[i]], w_full[i, top[i]])  # the same scores for the chosen channels
        others = torch.ones(16, dtype=torch.bool)
        others[top[i]] = False
        assert (w_few[i, others] == 0).all()
