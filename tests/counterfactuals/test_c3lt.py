"""C3LT: each loss term against hand-computed values, the total loss as the authors combine it, the
norm-preserving latent step, cycle consistency after training on a toy, exact resume after an
interrupt, the user's networks left untouched, one-line errors."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from saliencylab.core.errors import ConfigError, InputError
from saliencylab.counterfactuals.c3lt import (C3LT, LatentMap, adversarial_loss, change_mask, classification_loss,
                                              entropy_loss, latent_step, perceptual_loss, proximity_loss,
                                              smoothness_loss)

pytestmark = pytest.mark.usefixtures("one_thread")


# -- the loss terms, by hand -----------------------------------------------------------------------
def test_latent_step_is_residual_and_keeps_the_norm():
    z = torch.tensor([[3.0, 4.0]])
    path = latent_step(z, lambda v: torch.tensor([[1.0, 0.0]]).expand_as(v), n_steps=2)
    assert len(path) == 3 and torch.equal(path[0], z)
    s = 5 / math.sqrt(32)  # (3 + 1, 4) = (4, 4), rescaled to norm 5
    assert torch.allclose(path[1], torch.tensor([[4 * s, 4 * s]]))
    # second step from (a, a): (a + 1, a), rescaled to norm 5
    a = 4 * s
    v = torch.tensor([[a + 1, a]])
    assert torch.allclose(path[2], v * 5 / v.norm())
    # (B, D, 1, 1) latents: the norm is taken per sample over the flattened code
    z4 = torch.randn(3, 5, 1, 1)
    out = latent_step(z4, LatentMap(5, conv=True), 1)[-1]
    assert out.shape == z4.shape
    assert torch.allclose(out.flatten(1).norm(dim=1), z4.flatten(1).norm(dim=1), atol=1e-5)


def test_change_mask_abs_and_mse():
    x = torch.zeros(1, 1, 2, 2)
    y = torch.tensor([[[[0.0, 1.0], [-1.0, 3.0]]]])
    assert torch.allclose(change_mask(x, y, "abs"), torch.tensor([[[0.0, 1 / 3], [1 / 3, 1.0]]]))
    assert torch.allclose(change_mask(x, y, "mse"), torch.tensor([[[0.0, 1 / 9], [1 / 9, 1.0]]]))
    # several channels: the channel mean; equal images: zeros, not NaN
    y3 = torch.stack([y[0, 0], 3 * y[0, 0], torch.zeros(2, 2)])[None]
    assert torch.allclose(change_mask(torch.zeros(1, 3, 2, 2), y3, "abs"), change_mask(x, y, "abs"))
    assert torch.equal(change_mask(y, y.clone()), torch.zeros(1, 2, 2))
    with pytest.raises(ConfigError, match="mode"):
        change_mask(x, y, "l2")


def test_smoothness_and_entropy():
    m = torch.tensor([[[0.0, 1.0], [1.0, 1.0]]])
    # vertical differences (0 - 1, 1 - 1): mean of squares 0.5; horizontal (0 - 1, 1 - 1): 0.5
    assert float(smoothness_loss(m)) == pytest.approx(0.5)
    assert float(entropy_loss(torch.tensor([[[0.0, 0.25], [0.75, 1.0]]]))) == pytest.approx(0.125)
    assert float(entropy_loss(torch.tensor([[[0.0, 1.0], [1.0, 0.0]]]))) == 0.0


def test_proximity_loss_by_hand():
    x = torch.zeros(1, 1, 2, 2)
    y = torch.tensor([[[[0.0, 1.0], [0.0, 2.0]]]])
    # mse mask [[0, .25], [0, 1]]; L1 0.75; smoothness ((0 + .5625) / 2 + (.0625 + 1) / 2) / 2 = .40625;
    # entropy (0 + .25 + 0 + 0) / 4 = .0625; (0.75 + 10 * .40625 + .0625) / 12
    assert float(proximity_loss(x, y, 10.0, 1.0)) == pytest.approx((0.75 + 4.0625 + 0.0625) / 12)
    assert float(proximity_loss(x, y, 0.0, 0.0)) == pytest.approx(0.75)


def test_classification_losses():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.2]]))
    assert float(classification_loss(logits, 1, "nll")) == pytest.approx(-math.log(0.3))
    # log-probabilities in (the authors' MnistNet): the same number
    assert float(classification_loss(logits.log_softmax(1), 1)) == pytest.approx(-math.log(0.3))
    assert float(classification_loss(logits, 1, "hinge", 0.05)) == pytest.approx(0.5 - 0.3 + 0.05)
    assert float(classification_loss(logits, 0, "hinge", 0.05)) == 0.0
    with pytest.raises(ConfigError, match="cls_type"):
        classification_loss(logits, 0, "bce")


def test_perceptual_and_adversarial():
    x, y = torch.zeros(1, 1, 2, 2), torch.ones(1, 1, 2, 2)
    assert float(perceptual_loss(x, y)) == pytest.approx(1.0)
    assert float(perceptual_loss(x, y, lambda t: [2 * t])) == pytest.approx((1 + 2) / 2)
    assert float(perceptual_loss(x, y, lambda t: [2 * t, 3 * t + 1])) == pytest.approx((1 + 2 + 3) / 3)
    p = torch.tensor([0.5, 0.25])
    assert float(adversarial_loss(p)) == pytest.approx((math.log(2) + math.log(4)) / 2)


# -- a toy domain ----------------------------------------------------------------------------------
class ToyGenerator(nn.Module):
    def __init__(self, d=4, s=4):
        super().__init__()
        self.lin = nn.Linear(d, s * s)
        self.s = s

    def forward(self, z):
        return torch.tanh(self.lin(z.flatten(1))).view(-1, 1, self.s, self.s)


class ToyEncoder(nn.Module):
    """The generator's exact inverse on its range (least squares through atanh)."""

    def __init__(self, gen: ToyGenerator):
        super().__init__()
        self.register_buffer("pinv", torch.linalg.pinv(gen.lin.weight.detach()))
        self.register_buffer("bias", gen.lin.bias.detach().clone())
        self.scale = nn.Parameter(torch.ones(()))  # a parameter, to check it is left alone

    def forward(self, x):
        pre = torch.atanh(x.flatten(1).clamp(-0.999, 0.999)) - self.bias
        return (self.scale * pre @ self.pinv.T)[:, :, None, None]


class ToyClassifier(nn.Module):
    """Class 2 for bright images, 0 for dark ones, 1 never wins by much: logits (-k m, 0, k m) of the
    mean brightness m, computed through a conv + ReLU feature layer (the perceptual layer)."""

    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(1, 2, 1), nn.ReLU())
        with torch.no_grad():
            self.features[0].weight.copy_(torch.tensor([1.0, -1.0]).view(2, 1, 1, 1))
            self.features[0].bias.zero_()
        self.fc = nn.Linear(2, 3)
        with torch.no_grad():
            self.fc.weight.copy_(torch.tensor([[-8.0, 8.0], [0.0, 0.0], [8.0, -8.0]]))
            self.fc.bias.zero_()

    def forward(self, x):
        return self.fc(self.features(x).mean((2, 3)))


class ToyDiscriminator(nn.Module):
    def __init__(self, s=4):
        super().__init__()
        self.lin = nn.Linear(s * s, 1)

    def forward(self, x):
        return torch.sigmoid(self.lin(x.flatten(1))).flatten()


def toy(seed=0):
    """Images from the generator, split by the classifier's class (0: source, 2: target)."""
    torch.manual_seed(seed)
    gen = ToyGenerator()
    nets = gen, ToyEncoder(gen), ToyClassifier(), ToyDiscriminator()
    with torch.no_grad():
        x = gen(torch.randn(200, 4))
        y = nets[2](x).argmax(1)
    return nets, x[y == 0][:24], x[y == 2][:20]


def make(nets, **kw):
    g, e, c, d = nets
    return C3LT(g, e, c, d, source=0, target=2, perceptual_layers=("features.1",), **{"batch_size": 8, **kw})


def test_total_loss_combines_the_terms_as_the_authors():
    nets, x1, x2 = toy()
    gen, enc, clf, disc = nets
    model = make(nets)
    with torch.no_grad():
        enc.scale.fill_(0.7)  # reconstructions away from the queries (an exact inverse makes the mask noise)
        model._maps(enc(x1[:1]))
        for m in (model.g, model.h):  # zero maps: a step leaves z as it is
            m.T2[0].weight.zero_()
            m.T2[0].bias.zero_()
    x1, x2 = x1[:8], x2[:8]
    with model._frozen() as features:
        t = model.loss_terms(x1, x2, features)
    r1, r2 = gen(enc(x1)), gen(enc(x2))  # counterfactuals = cycled images = reconstructions here
    cls = (F.cross_entropy(clf(r1), torch.full((8,), 2)) + F.cross_entropy(clf(r2), torch.full((8,), 0))) / 2
    prox = (proximity_loss(x1, r1) + proximity_loss(x2, r2)) / 2

    def perc(a, b):
        return (F.l1_loss(b, a) + F.l1_loss(clf.features(b), clf.features(a))) / 2

    cyc = (perc(x1, r1) + perc(x2, r2)) / 4  # the latent L1 terms are 0
    adv = (2 * adversarial_loss(disc(r1)) + 2 * adversarial_loss(disc(r2))) / 4
    for name, want in (("cls", cls), ("prox", prox), ("cyc", cyc), ("adv", adv)):
        assert float(t[name].detach()) == pytest.approx(float(want), rel=1e-5), name
    assert float(t["loss"].detach()) == pytest.approx(float(cls + 0.1 * prox + 0.1 * cyc + 0.001 * adv), rel=1e-5)
    # alpha = beta = gamma = 0: the classification term alone; no discriminator: no adversarial term
    t0 = make(nets, alpha=0.0, beta=0.0, gamma=0.0)
    t0.g, t0.h = model.g, model.h
    with t0._frozen() as f:
        assert float(t0.loss_terms(x1, x2, f)["loss"].detach()) == pytest.approx(float(cls), rel=1e-5)
    assert C3LT(gen, enc, clf, None, source=0, target=2).config["gamma"] == 0.0


def test_loss_terms_with_moving_maps_follow_the_authors_train_loop():
    # khorrams/c3lt c3lt/train.py (train_c3lt): x1 -> g -> x1_cf -> h -> x1_cyc, x2 -> h -> x2_cf -> g -> x2_cyc;
    # the cycle compares the images and the latents with the queries', the adversarial term scores the
    # two counterfactuals and the two cycled images (zero maps, above, cannot tell these apart)
    nets, x1, x2 = toy()
    gen, enc, clf, disc = nets
    model = make(nets)
    with torch.no_grad():
        model._maps(enc(x1[:1]))
        model.g.T2[0].weight.mul_(4)
        model.h.T2[0].weight.mul_(-3)
    x1, x2 = x1[:8], x2[:8]
    with model._frozen() as features:
        t = model.loss_terms(x1, x2, features)
    with torch.no_grad():
        z1, z2 = enc(x1), enc(x2)
        z1_cf, z2_cf = latent_step(z1, model.g)[-1], latent_step(z2, model.h)[-1]
        z1_cyc, z2_cyc = latent_step(z1_cf, model.h)[-1], latent_step(z2_cf, model.g)[-1]
        c1, c2, y1, y2 = gen(z1_cf), gen(z2_cf), gen(z1_cyc), gen(z2_cyc)
        assert (c1 - y1).abs().mean() > 0.05 and (z1_cyc - z1_cf).abs().mean() > 0.05  # the test can tell

        def feats(v):
            return [clf.features(v)]

        want = {
            "cls": (F.cross_entropy(clf(c1), torch.full((8,), 2)) + F.cross_entropy(clf(c2), torch.full((8,), 0))) / 2,
            "prox": (proximity_loss(x1, c1) + proximity_loss(x2, c2)) / 2,
            "cyc": (perceptual_loss(x1, y1, feats) + perceptual_loss(x2, y2, feats) + F.l1_loss(z1, z1_cyc)
                    + F.l1_loss(z2, z2_cyc)) / 4,
            "adv": (adversarial_loss(disc(c2)) + adversarial_loss(disc(c1)) + adversarial_loss(disc(y1))
                    + adversarial_loss(disc(y2))) / 4}
    for name, v in want.items():
        assert float(t[name].detach()) == pytest.approx(float(v), rel=1e-5), name


def test_learning_rate_halves_per_epoch_not_per_batch():
    # the authors' StepLR steps once per epoch (train_c3lt: scheduler.step() after the batches);
    # 20 target images at batch 8: three batches an epoch
    nets, x1, x2 = toy()
    history = make(nets, decay_step=2, decay_gamma=0.5).fit(x1, x2, epochs=5, progress=False)
    assert [r["lr"] for r in history] == pytest.approx([1e-3, 1e-3, 5e-4, 5e-4, 2.5e-4])


def test_training_gives_cycle_consistent_valid_counterfactuals_and_leaves_the_networks_alone():
    nets, x1, x2 = toy()
    gen, enc, clf, disc = nets
    clf.train()
    flags = [p.requires_grad for n in nets for p in n.parameters()]
    weights = [p.detach().clone() for n in nets for p in n.parameters()]
    hooks = len(clf.features[1]._forward_hooks)
    # the toy's codes need a strong cycle term (beta 1) to come back within the steps a test affords
    model = make(nets, lr=1e-2, batch_size=32, beta=1.0)
    model.fit(x1, x2, epochs=1)  # builds the maps; barely trained
    valid_before = float(model.explain(x1).valid.float().mean())
    history = model.fit(x1, x2, epochs=100)

    def errors(m):
        with torch.no_grad():
            z = enc(x1)
            z_cf = latent_step(z, m.g)[-1]
            back = latent_step(z_cf, m.h)[-1]
        return float((z_cf - z).abs().mean()), float((back - z).abs().mean())

    move, cycle = errors(model)
    cf = model.explain(x1)
    assert len(history) == 100 and history[-1]["loss"] < history[0]["loss"]
    assert cycle < 0.25 * move, (move, cycle)  # g moves the codes far; h brings them back
    no_cycle = make(nets, lr=1e-2, batch_size=32, beta=0.0)
    no_cycle.fit(x1, x2, epochs=100)
    assert errors(no_cycle)[1] > 2 * cycle  # and that is the cycle term's doing
    assert float(cf.valid.float().mean()) >= 0.75 > valid_before
    assert cf.images.shape == x1.shape and cf.masks.shape == (len(x1), 4, 4)
    assert torch.allclose(cf.probabilities.sum(1), torch.ones(len(x1)))
    assert float(cf.masks.min()) >= 0 and float(cf.masks.max()) <= 1
    back = model.explain(x2, direction="backward")
    assert back.target == 0 and back.source == 2
    # the user's networks: weights, grads, flags, mode, hooks unchanged
    assert all(p.grad is None for n in nets for p in n.parameters())
    assert [p.requires_grad for n in nets for p in n.parameters()] == flags
    assert all(torch.equal(a, b.detach()) for a, b in zip(weights, (p for n in nets for p in n.parameters())))
    assert clf.training
    assert len(clf.features[1]._forward_hooks) == hooks


def test_resume_after_an_interrupt_is_bit_identical(tmp_path):
    nets, x1, x2 = toy()
    full = make(nets)
    full.fit(x1, x2, epochs=5, out_dir=tmp_path / "a")

    class Stop(Exception):
        pass

    def stop(event, info):
        if event == "epoch" and info["epoch"] == 3:
            raise Stop

    part = make(nets)
    with pytest.raises(Stop):
        part.fit(x1, x2, epochs=5, out_dir=tmp_path / "b", callback=stop)
    resumed = make(nets)
    history = resumed.fit(x1, x2, epochs=5, out_dir=tmp_path / "b")
    for a, b in ((full.g, resumed.g), (full.h, resumed.h)):
        for (k, v), (_, w) in zip(a.state_dict().items(), b.state_dict().items()):
            assert torch.equal(v, w), k
    strip = [{k: v for k, v in row.items() if k != "seconds"} for row in history]
    assert strip == [{k: v for k, v in row.items() if k != "seconds"} for row in full.history]
    assert len(list((tmp_path / "b" / "checkpoints").glob("epoch_*.pt"))) == 2  # keep_checkpoints
    # other settings in the same folder: refused, one line
    with pytest.raises(ConfigError, match="other settings"):
        make(nets, alpha=0.5).fit(x1, x2, epochs=5, out_dir=tmp_path / "b")
    # a saved state explains the same as the trained object
    again = make(nets).load_state_dict(resumed.state_dict())
    assert torch.equal(again.explain(x1).images, resumed.explain(x1).images)
    # a state of another class pair or step count is refused (it would explain under the wrong labels)
    gen, enc, clf, disc = nets
    with pytest.raises(ConfigError, match="source"):
        C3LT(gen, enc, clf, disc, source=2, target=0).load_state_dict(resumed.state_dict())
    with pytest.raises(ConfigError, match="n_steps"):
        make(nets, n_steps=2).load_state_dict(resumed.state_dict())
    # batch invariance: explaining in batches of 5 gives what one batch gives
    whole, parts = resumed.explain(x1), resumed.explain(x1, batch_size=5)
    for name in ("images", "masks", "probabilities", "latents_cf"):
        assert torch.allclose(getattr(whole, name), getattr(parts, name), atol=1e-6), name


def test_fit_starts_from_the_seeded_maps_unless_it_resumes(tmp_path):
    # a second fit (another folder, or resume=False) starts over as the docstring says, instead of
    # training on from the maps of the first: the same result as a fresh object
    nets, x1, x2 = toy()
    fresh = make(nets)
    fresh.fit(x1, x2, epochs=2)
    twice = make(nets)
    twice.fit(x1, x2, epochs=2)
    twice.fit(x1, x2, epochs=2)
    over = make(nets)
    over.fit(x1, x2, epochs=2, out_dir=tmp_path)
    over.fit(x1, x2, epochs=2, out_dir=tmp_path, resume=False)
    with pytest.raises(ConfigError, match="already holds"):  # a refused run leaves the trained maps
        over.fit(x1, x2, epochs=1, out_dir=tmp_path)
    for other in (twice, over):
        for a, b in ((fresh.g, other.g), (fresh.h, other.h)):
            for (k, v), (_, w) in zip(a.state_dict().items(), b.state_dict().items()):
                assert torch.equal(v, w), k


def test_errors_are_one_line():
    nets, x1, x2 = toy()
    gen, enc, clf, disc = nets
    with pytest.raises(ConfigError, match="not trained"):
        make(nets).explain(x1)
    with pytest.raises(ConfigError, match="differ"):
        C3LT(gen, enc, clf, source=3, target=3)
    with pytest.raises(ConfigError, match="perceptual layer"):
        C3LT(gen, enc, clf, perceptual_layers=("nope",))
    with pytest.raises(ConfigError, match="alpha"):
        C3LT(gen, enc, clf, alpha=-1)
    with pytest.raises(InputError, match="x_source"):
        make(nets).fit(x1[0], x2, epochs=1)
    with pytest.raises(ConfigError, match="direction"):
        m = make(nets)
        m.fit(x1, x2, epochs=1)
        m.explain(x1, direction="sideways")
    with pytest.raises(ConfigError, match="batch_size"):
        m.explain(x1, batch_size=0)
    with pytest.raises(InputError, match="same image shape"):
        make(nets).fit(x1, x2[:, :, :3], epochs=1)
    with pytest.raises(ConfigError, match="source"):
        C3LT(gen, enc, clf, source="a", target=2)
    with pytest.raises(InputError, match="target 7"):
        C3LT(gen, enc, clf, source=0, target=7).fit(x1, x2, epochs=1)
    with pytest.raises(ConfigError, match="decay_gamma"):
        C3LT(gen, enc, clf, decay_gamma=-1.0)
    with pytest.raises(ConfigError, match="keep_checkpoints"):
        make(nets).fit(x1, x2, epochs=1, keep_checkpoints=0)


def test_defaults_are_the_authors():
    # khorrams/c3lt args.py: --alpha 0.1 --beta 0.1 --gamma 0.001 --p1 10 --p2 1 --cls_type nll --kappa 0.05
    # --lr_map 1e-3 --batch_size 128 --epochs 200 --decay_step 25 --decay_gamma 0.5 --n_steps 1
    from saliencylab.counterfactuals.c3lt import DEFAULTS

    assert DEFAULTS == dict(alpha=0.1, beta=0.1, gamma=0.001, p1=10.0, p2=1.0, cls_type="nll", kappa=0.05, lr=1e-3,
                            batch_size=128, epochs=200, decay_step=25, decay_gamma=0.5, n_steps=1)
    nets, _, _ = toy()
    config = C3LT(*nets).config
    assert {k: config[k] for k in DEFAULTS if k != "epochs"} == {k: v for k, v in DEFAULTS.items() if k != "epochs"}
