"""XNN (saliencylab.concepts.xnn): loss terms against hand values, training, resume, the model untouched,
explain_concepts' contributions and batch invariance."""

import math

import pytest
import torch
from torch import nn

from saliencylab.concepts import xnn as X
from saliencylab.core.errors import ConfigError, InputError

pytestmark = pytest.mark.usefixtures("one_thread")


# -- loss terms on tiny tensors ----------------------------------------------------------------------
def test_faithfulness_loss_is_the_mean_squared_error():
    pred = torch.tensor([[1.0], [3.0]])
    target = torch.tensor([[0.0], [1.0]])
    assert float(X.faithfulness_loss(pred, target)) == pytest.approx((1 + 4) / 2)


def test_sparse_reconstruction_is_a_log_penalty_per_feature():
    rec = torch.tensor([[1.0, 0.0], [3.0, 0.0]])
    feats = torch.tensor([[0.0, 0.0], [1.0, 0.0]])
    # per-feature mean squared error over the images: [2.5, 0]; log(1 + q * .) averaged over features
    assert float(X.sparse_reconstruction_loss(rec, feats, q=2.0)) == pytest.approx(math.log(1 + 2 * 2.5) / 2)
    assert float(X.sparse_reconstruction_loss(rec, feats, q=100.0)) == pytest.approx(math.log(1 + 250) / 2)
    assert float(X.sparse_reconstruction_loss(rec, feats, q=None)) == pytest.approx(5 / 4)


def test_pull_away_along_images_and_concepts():
    e = torch.tensor([[1.0, 0.0], [1.0, 1.0]])
    # images: rows (1, 0) and (1, 1): cos^2 = 1/2, counted twice, / (2 * 1)
    one = X.pull_away_loss(e, torch.tensor([[1.0, 1.0]]), "images", eps=0.0)
    assert float(one) == pytest.approx(0.5)
    # weight (2, 1): rows (2, 0), (2, 1): cos^2 = 16 / 20; summed over the two outputs
    two = X.pull_away_loss(e, torch.tensor([[1.0, 1.0], [2.0, 1.0]]), "images", eps=0.0)
    assert float(two) == pytest.approx(0.5 + 0.8)
    # concepts: columns (1, 1) and (0, 1): cos^2 = 1/2
    cols = X.pull_away_loss(e, torch.tensor([[1.0, 1.0]]), "concepts", eps=0.0)
    assert float(cols) == pytest.approx(0.5)
    # three orthogonal-ish images: rows (1,0), (0,1), (1,1): cos^2 = 0, 1/2, 1/2 -> 2 * 1 / 6
    e3 = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    assert float(X.pull_away_loss(e3, torch.tensor([[1.0, 1.0]]), "images")) == pytest.approx(1 / 3, abs=1e-6)
    # the authors' + 1e-8 keeps an all-zero concept vector finite
    assert torch.isfinite(X.pull_away_loss(torch.zeros(3, 2), torch.ones(1, 2)))
    with pytest.raises(ConfigError, match="pull_away"):
        X.pull_away_loss(e, torch.ones(1, 2), "pixels")


def test_sparsity_and_the_weighted_total():
    e = torch.tensor([[1.0, 0.0], [0.5, 2.0]])
    assert float(X.concept_sparsity_loss(e)) == pytest.approx(3.5 / 4)
    torch.manual_seed(0)
    net = X.XNN(6, concepts=3, outputs=2, hidden=(4,), dropout=0.0).eval()
    f, y = torch.rand(5, 6), torch.randn(5, 2)
    weights = {"faithfulness": 2.0, "reconstruction": 3.0, "pull_away": 0.5, "sparsity": 7.0}
    total, terms = X.xnn_losses(net, f, y, weights=weights, q=10.0, pull_away="concepts")
    e, rec, pred = net(f)
    assert float(terms["faithfulness"]) == pytest.approx(float(((pred - y) ** 2).mean()))
    assert float(terms["reconstruction"]) == pytest.approx(float(torch.log1p(10 * ((rec - f) ** 2).mean(0)).mean()))
    assert float(terms["sparsity"]) == pytest.approx(float(e.abs().mean()))
    assert float(total) == pytest.approx(sum(weights[k] * float(terms[k]) for k in terms), rel=1e-6)
    with pytest.raises(ConfigError, match="unknown loss weight"):
        X.xnn_losses(net, f, y, weights={"recon": 1.0})


# -- a toy network -----------------------------------------------------------------------------------
class Toy(nn.Module):
    """conv-ReLU features, then a linear head: the logits vary with the images' content."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.features = nn.ReLU()
        self.fc = nn.Linear(4 * 8 * 8, 3)

    def forward(self, x):
        return self.fc(self.features(self.conv(x)).flatten(1))


def toy(seed=0):
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        net = Toy().eval()
    with torch.no_grad():  # logits of a few units' spread around 0, as a trained network's
        net.fc.weight.mul_(30)
        net.fc.bias.sub_(net(toy_images()).mean(0))
    return net


def toy_images(n=96, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 1, 8, 8, generator=g) * torch.rand(n, 1, 1, 1, generator=g) * 2


FAST = dict(concepts=3, hidden=(32, 8), batch_size=16, progress=False)


def test_faithfulness_improves_with_training():
    model, x = toy(), toy_images()
    feats, logits = X.layer_features(model, "features", x)
    fast = {**FAST, "lr": 1e-2, "pretrain": 5}  # a tiny SRAE on 96 images: a larger step than the authors' 1e-3
    for c in (1, 2):  # one-vs-all, the authors' set-up, with their default loss weights
        before = X.fit_xnn(model, "features", x, steps=0, classes=c, **fast)
        after = X.fit_xnn(model, "features", x, steps=200, classes=c, **fast)
        with torch.no_grad():
            mse = [float(X.faithfulness_loss(n(feats)[2][:, 0], logits[:, c])) for n in (before, after)]
            pred = after(feats)[2][:, 0]
        assert mse[1] < 0.3 * mse[0], mse
        assert float(torch.corrcoef(torch.stack([pred, logits[:, c]]))[0, 1]) > 0.85
        assert after.history[-1]["step"] == 200 and after.history[-1]["faithfulness"] < after.history[0]["faithfulness"]


def test_deterministic_and_resume_equals_one_run(tmp_path):
    model, x = toy(), toy_images()
    one = X.fit_xnn(model, "features", x, steps=30, seed=3, log_every=10, **FAST)
    again = X.fit_xnn(model, "features", x, steps=30, seed=3, log_every=10, **FAST)
    other = X.fit_xnn(model, "features", x, steps=30, seed=4, log_every=10, **FAST)
    part = X.fit_xnn(model, "features", x, steps=25, seed=3, out_dir=tmp_path, checkpoint_every=20, log_every=10, **FAST)
    assert (tmp_path / X.CHECKPOINT).is_file() and not list(tmp_path.glob("*.tmp"))
    resumed = X.fit_xnn(model, "features", x, steps=30, seed=3, out_dir=tmp_path, checkpoint_every=20, log_every=10, **FAST)
    for k, v in one.state_dict().items():
        assert torch.equal(v, again.state_dict()[k])
        assert torch.equal(v, resumed.state_dict()[k]), k
    assert any(not torch.equal(v, other.state_dict()[k]) for k, v in one.state_dict().items())
    strip = lambda h: [{k: v for k, v in r.items() if k != "seconds"} for r in h]  # noqa: E731
    assert strip(resumed.history) == strip(one.history)
    assert [r["step"] for r in part.history] == [10, 20, 25]  # the last row off the grid is redone on resume
    with pytest.raises(ConfigError, match="other settings"):
        X.fit_xnn(model, "features", x, steps=40, seed=5, out_dir=tmp_path, **FAST)
    fresh = X.fit_xnn(model, "features", x, steps=30, seed=5, out_dir=tmp_path, resume=False, **FAST)
    assert fresh.history[-1]["step"] == 30
    # save / load round trip
    X.save_xnn(one, tmp_path / "x.pt")
    back = X.load_xnn(tmp_path / "x.pt")
    assert back.layer == "features" and all(torch.equal(v, back.state_dict()[k]) for k, v in one.state_dict().items())


def test_iterable_of_batches_equals_tensor():
    model, x = toy(), toy_images(48)
    a = X.fit_xnn(model, "features", x, steps=10, **FAST)
    b = X.fit_xnn(model, "features", [(x[:20], None), (x[20:],)], steps=10, **FAST)
    assert all(torch.equal(v, b.state_dict()[k]) for k, v in a.state_dict().items())


def _snapshot(model):
    return ({k: v.clone() for k, v in model.state_dict().items()},
            [(m.training, len(m._forward_hooks), len(m._forward_pre_hooks), len(m._backward_hooks)) for m in model.modules()],
            [p.requires_grad for p in model.parameters()], [id(p) for p in model.parameters()])


def test_model_untouched_by_fit_and_explain():
    model, x = toy(), toy_images(24)
    model.train()  # a mode the session must restore
    before = _snapshot(model)
    net = X.fit_xnn(model, model.features, x, steps=5, **FAST)
    X.explain_concepts(model, net, x[:4], k=2)
    after = _snapshot(model)
    assert before[1:] == after[1:]
    assert all(torch.equal(v, after[0][k]) for k, v in before[0].items())


def test_explain_concepts_contributions_and_batch_invariance():
    model, x = toy(), toy_images(64)
    net = X.fit_xnn(model, "features", x, steps=80, **FAST)
    xs = x[:6]
    ex = X.explain_concepts(model, net, xs, k=2)
    assert ex.maps.shape == (6, 2, 8, 8) and ex.concepts.shape == (6, 2)
    assert torch.isfinite(ex.maps).all()
    # contributions: W[t, i] * e_i; sorted descending; all of them plus the bias = the XNN's prediction
    assert bool((ex.contributions[:, 0] >= ex.contributions[:, 1]).all())
    bias = net.head.bias.detach()[ex.targets]
    assert torch.allclose(ex.all_contributions.sum(1) + bias, ex.prediction, atol=1e-5)
    feats, logits = X.layer_features(model, "features", xs)
    assert torch.equal(ex.targets, logits.argmax(1))
    with torch.no_grad():
        e = net.encode(feats)
    assert torch.allclose(ex.activations, e.gather(1, ex.concepts))
    # the map of a concept is the gradient of its activation: check one image against autograd
    xi = xs[:1].clone().requires_grad_(True)
    c = int(ex.concepts[0, 0])
    g, = torch.autograd.grad(X.ConceptNet(model, net)(xi)[0, c], xi)
    assert torch.allclose(ex.maps[0, 0], g[0].sum(0), atol=1e-6)
    # batch invariance: two halves give the same results as the whole batch
    parts = [X.explain_concepts(model, net, xs[i:i + 3], k=2) for i in (0, 3)]
    for name in ("concepts", "contributions", "activations", "maps", "prediction", "logits"):
        joined = torch.cat([getattr(p, name) for p in parts])
        assert torch.allclose(getattr(ex, name), joined, atol=1e-6), name
    # an explicit target, and a one-class (one-vs-all) XNN
    ex1 = X.explain_concepts(model, net, xs, target=1, k=1)
    assert ex1.targets.tolist() == [1] * 6 and ex1.maps.shape == (6, 1, 8, 8)
    ova = X.fit_xnn(model, "features", x, steps=5, classes=2, **FAST)
    assert ova.head.out_features == 1
    assert X.explain_concepts(model, ova, xs, k=1).targets.tolist() == [2] * 6
    with pytest.raises(InputError, match="explains classes"):
        X.explain_concepts(model, ova, xs, target=0, k=1)


def test_bad_inputs_are_one_clear_line():
    model, x = toy(), toy_images(16)
    with pytest.raises(ConfigError, match="did you mean"):
        X.fit_xnn(model, "featurs", x, steps=1, **FAST)
    with pytest.raises(InputError, match=r"\(N, C, H, W\)"):
        X.fit_xnn(model, "features", torch.rand(4, 8), steps=1, **FAST)
    with pytest.raises(ConfigError, match="classes"):
        X.fit_xnn(model, "features", x, steps=1, classes=[7], **FAST)
    with pytest.raises(ConfigError, match="concepts"):
        X.fit_xnn(model, "features", x, steps=1, **{**FAST, "concepts": 0})
    net = X.fit_xnn(model, "features", x, steps=1, **FAST)
    with pytest.raises(ConfigError, match="more than"):
        X.explain_concepts(model, net, x[:2], k=4)
