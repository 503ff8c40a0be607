"""FaCT-style concepts on B-cos networks: the SAE, exact contributions and traces, resume, model untouched."""

import pytest
import torch

from saliencylab.concepts.bcos_concepts import (collect_features, concept_contributions, concept_traces,
                                                top_activating)
from saliencylab.concepts.sae import TopKSAE, lr_factor, train_sae
from saliencylab.core.errors import ConfigError, InputError
from saliencylab.core.session import model_fingerprint
from saliencylab.models.bcos import BcosCNN


def _model(seed=0):
    torch.manual_seed(seed)
    # temperature 1e-3: logits of order 1 (an untrained B-cos net's are ~1e-3), so the sums below are
    # tested at a meaningful scale; the logit bias -log(3) must be taken out
    return BcosCNN(num_classes=4, width=8, logit_temperature=1e-3).eval()


def _images(n=5, seed=1):
    return torch.rand(n, 3, 24, 24, generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def setup():
    model = _model()
    x = _images()
    feats = collect_features(model, x, "features")
    sae = train_sae(feats, concepts=24, k=3, epochs=2, batch_size=64, progress=False).sae
    return model, x, sae


def test_topk_keeps_exactly_k():
    sae = TopKSAE(6, 10, 3, seed=0)
    with torch.no_grad():
        sae.encoder.weight.abs_()  # all pre-activations of a positive input are > 0
    x = torch.rand(50, 6) + 0.1
    codes, pre, kept = sae.encode(x, return_pre=True)
    assert bool(((codes != 0).sum(1) == 3).all())
    # the kept entries are the 3 largest pre-activations, unchanged
    assert torch.equal(codes.topk(3, dim=1).values, pre.topk(3, dim=1).values)
    assert torch.equal(codes.gather(1, kept), pre.gather(1, kept))
    # a general input: never more than k, and zero where ReLU cut
    codes = TopKSAE(6, 10, 3, seed=1).encode(torch.randn(200, 6))
    assert bool(((codes != 0).sum(1) <= 3).all()) and bool((codes >= 0).all())
    # bias-free and unit-norm decoder columns
    assert sae.encoder.bias is None and sae.decoder.bias is None
    assert torch.allclose(TopKSAE(6, 10, 3).decoder.weight.norm(dim=0), torch.ones(10), atol=1e-6)
    with pytest.raises(ConfigError):
        TopKSAE(6, 4, 5)
    # a seeded SAE leaves the global random state alone; unseeded ones draw from it
    state = torch.get_rng_state()
    assert torch.equal(TopKSAE(6, 10, 3, seed=2).decoder.weight, TopKSAE(6, 10, 3, seed=2).decoder.weight)
    assert torch.equal(torch.get_rng_state(), state)
    assert not torch.equal(TopKSAE(6, 10, 3, seed=None).decoder.weight, TopKSAE(6, 10, 3, seed=None).decoder.weight)


def test_lr_schedule_warmup_and_cosine():
    assert lr_factor(0, 30, 10, 20) == 0 and lr_factor(5, 30, 10, 20) == 0.5 and lr_factor(15, 30, 10, 20) == 1
    assert lr_factor(20, 30, 10, 20) == pytest.approx(1) and lr_factor(25, 30, 10, 20) == pytest.approx(0.5)


def test_sae_training_reduces_error_and_renormalises():
    torch.manual_seed(0)
    dictionary = torch.randn(8, 16)
    codes = torch.rand(600, 16) * (torch.rand(600, 16) < 0.15)
    feats = codes @ dictionary.T
    result = train_sae(feats, concepts=16, k=3, epochs=6, batch_size=100, lr=1e-2, progress=False)
    first, last = result.history[0], result.history[-1]
    assert last["fve"] > first["fve"] + 0.2
    assert last["l0"] <= 3
    assert torch.allclose(result.sae.decoder.weight.norm(dim=0), torch.ones(16), atol=1e-5)


def test_contributions_sum_to_logit_minus_bias(setup):
    model, x, sae = setup
    bias = model.logit.bias
    for splice in ("replace", "residual"):
        cc = concept_contributions(model, sae, x, splice=splice, batch_size=2)
        assert torch.allclose(cc.bias, torch.full((len(x),), bias), atol=1e-6)
        total = cc.contributions.sum(1) + cc.error
        assert (cc.target_logits - bias).abs().min() > 1e-2  # a meaningful scale
        assert torch.allclose(total, cc.target_logits - bias, atol=1e-5, rtol=0)
        # several concepts contribute (not one trivially equal to the logit)
        assert bool(((cc.contributions != 0).sum(1) >= 2).all())
    replaced = concept_contributions(model, sae, x, splice="replace")
    pairs = concept_contributions(model, sae, x, splice="replace", batch_size=2)  # batch invariance
    for name in ("contributions", "activations", "logits", "bias", "relative_error"):
        assert torch.allclose(getattr(pairs, name), getattr(replaced, name), atol=1e-6), name
    residual = concept_contributions(model, sae, x, splice="residual", target=replaced.targets)
    with torch.no_grad():
        plain = model(x)
    # residual: the original network's logits; the error term is what the concepts miss
    assert torch.allclose(residual.logits, plain, atol=1e-6)
    assert torch.allclose(replaced.original_logits, plain, atol=1e-6)
    assert residual.error.abs().max() > 1e-4
    assert torch.allclose(residual.contributions.sum(1) + residual.error, plain.gather(1, replaced.targets[:, None])[:, 0]
                          - bias, atol=1e-5, rtol=0)
    # replace: the spliced network's logits, the predicted class by default
    assert torch.equal(replaced.targets, replaced.logits.argmax(1))
    # a fixed target class is explained too
    cc = concept_contributions(model, sae, x, target=2)
    assert torch.equal(cc.targets, torch.full((len(x),), 2))
    assert torch.allclose(cc.contributions.sum(1), cc.logits[:, 2] - bias, atol=1e-5)


def test_traces_sum_to_concept_activation(setup):
    model, x, sae = setup
    cc = concept_contributions(model, sae, x)
    top = cc.activations.topk(3, dim=1).indices  # per image: its 3 most present concepts
    tr = concept_traces(model, sae, x, top, batch_size=2, return_weights=True)
    assert tr.maps.shape == (len(x), 3, 24, 24)
    expected = cc.activations.gather(1, top)
    assert expected.min() > 1e-3
    assert torch.allclose(tr.activations, expected, atol=1e-6)
    assert torch.allclose(tr.maps.sum((2, 3)), expected, atol=1e-5, rtol=1e-5)
    # the maps are W_j(x) * x from the returned weights (pairs (x, 1 - x) folded)
    contrib = (tr.encoded[:, None] * tr.weights)
    assert torch.allclose(contrib[:, :, :3] .sum(2) + contrib[:, :, 3:].sum(2), tr.maps, atol=1e-7)
    # the same concepts for every image
    shared = concept_traces(model, sae, x, torch.tensor([top[0, 0]]))
    assert torch.allclose(shared.maps[0, 0], tr.maps[0, 0], atol=1e-7)
    whole = concept_traces(model, sae, x, top, batch_size=len(x))  # batch invariance
    assert torch.allclose(whole.maps, tr.maps, atol=1e-7)
    with pytest.raises(InputError):
        concept_traces(model, sae, x, torch.tensor([sae.concepts]))


def test_top_activating_and_feature_sampling(setup):
    model, x, sae = setup
    acts = torch.tensor([[0.0, 3.0], [2.0, 1.0], [5.0, 0.0]])
    assert top_activating(acts, 2).tolist() == [[2, 0], [1, 1]]
    all_rows = collect_features(model, x, "features")
    h, w = 6, 6  # 24 px, two stride-2 convs
    assert all_rows.shape == (len(x) * h * w, 16)
    some = collect_features(model, x, "features", samples_per_image=4, seed=3)
    assert some.shape == (len(x) * 4, 16)
    # sampled rows are rows of the map, and the sample does not depend on batching
    assert all(bool((all_rows == r).all(1).any()) for r in some)
    again = collect_features(model, x, "features", samples_per_image=4, seed=3, batch_size=2)
    assert torch.allclose(some, again, rtol=1e-5, atol=1e-9)


def test_resume_equals_uninterrupted(tmp_path):
    torch.manual_seed(0)
    feats = torch.randn(300, 8)
    kw = dict(concepts=12, k=2, epochs=4, batch_size=64, seed=5, progress=False)
    straight = train_sae(feats, **kw)

    def stop(event, row):
        if row["epoch"] == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train_sae(feats, out_dir=tmp_path, callback=stop, **kw)
    resumed = train_sae(feats, out_dir=tmp_path, **kw)
    assert resumed.resumed_from == 2
    for k, v in straight.sae.state_dict().items():
        assert torch.equal(v, resumed.sae.state_dict()[k]), k
    assert [r["loss"] for r in straight.history] == [r["loss"] for r in resumed.history]
    with pytest.raises(ConfigError):  # other settings in the same folder
        train_sae(feats, out_dir=tmp_path, **{**kw, "k": 3})


def test_model_untouched_and_errors(setup):
    model, x, sae = setup
    before = model_fingerprint(model)
    flags = [m.detach for m in model.modules() if hasattr(m, "detach") and isinstance(m.detach, bool)]
    grads = [p.requires_grad for p in model.parameters()]
    concept_contributions(model, sae, x, splice="residual")
    concept_traces(model, sae, x, torch.tensor([0, 1]))
    collect_features(model, x, "features", samples_per_image=2)
    assert model_fingerprint(model) == before
    assert [m.detach for m in model.modules() if hasattr(m, "detach") and isinstance(m.detach, bool)] == flags
    assert [p.requires_grad for p in model.parameters()] == grads
    assert all(not getattr(m, "_forward_hooks") for m in model.modules())
    assert "forward" not in vars(model.features)
    with pytest.raises(ConfigError):
        concept_contributions(model, sae, x, splice="add")
    with pytest.raises(ConfigError):
        concept_contributions(torch.nn.Conv2d(3, 4, 3), sae, x)
    with pytest.raises(ConfigError):
        concept_contributions(model, sae, x, layer="nope")
    with pytest.raises(InputError, match="channels"):  # an SAE trained at another layer
        concept_contributions(model, sae, x, layer="conv1")
    # one-line errors for the traces' inputs too
    with pytest.raises(InputError, match="sae must be"):
        concept_traces(model, None, x, [0])
    with pytest.raises(InputError, match="integer"):
        concept_traces(model, sae, x, [0.5])


def test_training_steps_follow_fact_and_dictionary_learning():
    """Three epochs against a step-by-step reading of FaCT's MyTopKTrainer.update / .loss and
    dictionary_learning's TopKTrainer (auxk on latents dead for n / 2 rows, normalised by the residual's
    variance; decoder gradient made orthogonal to the columns, clipped to norm 1, columns renormalised;
    warm-up over epoch 1, cosine decay from epoch 3; rows divided by sqrt(mean ||h||^2))."""
    import math

    from saliencylab.training.loop import _key

    torch.manual_seed(0)
    # rows far from unit norm (the norm factor matters), some far larger than others (clipping acts)
    feats = 7 * torch.randn(96, 6)
    feats[:3] *= 30
    kw = dict(concepts=64, k=1, epochs=3, batch_size=32, lr=1e-2, seed=4)
    result = train_sae(feats, progress=False, **kw)
    assert any(row["dead"] for row in result.history[1:])  # the auxiliary loss was active

    sae = TopKSAE(6, 64, 1, seed=4)
    opt = torch.optim.Adam(sae.parameters(), lr=kw["lr"], betas=(0.9, 0.999))
    xs = feats / feats.pow(2).sum(1).mean().sqrt()
    since = torch.zeros(64, dtype=torch.long)
    per_epoch, total = 3, 9
    norms = []
    step = 0
    for epoch in (1, 2, 3):
        order = torch.randperm(96, generator=torch.Generator().manual_seed(_key(4, epoch, "sae-shuffle")))
        for idx in order.split(32):
            x = xs[idx]
            lr_f = step / per_epoch if step < per_epoch else \
                0.5 * (1 + math.cos(math.pi * (1 - (total - step) / (total - 2 * per_epoch)))) if step >= 2 * per_epoch else 1.0
            for g in opt.param_groups:
                g["lr"] = kw["lr"] * lr_f
            pre = torch.relu(x @ sae.encoder.weight.T)
            top = pre.topk(1, dim=-1)
            f = torch.zeros_like(pre).scatter(-1, top.indices, top.values)
            e = x - f @ sae.decoder.weight.T
            since += len(idx)
            since[top.indices.flatten()] = 0
            loss = e.pow(2).sum(-1).mean()
            dead = since >= 96 // 2
            if dead.any():
                aux = torch.where(dead[None], pre, torch.tensor(-math.inf)).topk(min(256, int(dead.sum())), dim=-1)
                fa = torch.zeros_like(pre).scatter(-1, aux.indices, aux.values)
                r = e.detach()
                loss = loss + (r - fa @ sae.decoder.weight.T).pow(2).sum(-1).mean() / \
                    (r - r.mean(0)).pow(2).sum(-1).mean() / 32
            opt.zero_grad()
            loss.backward()
            W = sae.decoder.weight
            u = W.detach() / (W.detach().norm(dim=0, keepdim=True) + 1e-6)
            W.grad -= (W.grad * u).sum(0, keepdim=True) * u
            norms.append(float(torch.nn.utils.clip_grad_norm_(sae.parameters(), 1.0)))
            opt.step()
            with torch.no_grad():
                W /= W.norm(dim=0, keepdim=True) + torch.finfo(W.dtype).eps
            step += 1
    assert max(norms) > 1  # the clipping acted
    for name, v in sae.state_dict().items():
        assert torch.allclose(result.sae.state_dict()[name], v, atol=1e-5), name


def test_feature_sampling_weights_are_position_contributions(setup, monkeypatch):
    """FaCT load_good_features: positions drawn without replacement with probability proportional to
    |sum_c h_c d logit_pred / d h_c| (explanation mode); on a B-cos network the signed position
    contributions sum to the predicted logit minus the logit bias."""
    from saliencylab.concepts import bcos_concepts as bc
    from saliencylab.core.layers import get_layer
    from saliencylab.core.session import ModelSession
    from saliencylab.models.bcos import is_bcos_module

    model, x, sae = setup
    with ModelSession(model) as session:
        bc._explanation_mode(session, [m for m in model.modules() if is_bcos_module(m)])
        pc = bc._position_contributions(session, get_layer(model, "features"), x)
    with torch.no_grad():
        logits = model(x)
    assert pc.shape == (len(x), 6, 6)
    assert torch.allclose(pc.sum((1, 2)), logits.max(1).values - model.logit.bias, atol=1e-5)
    # the draw follows the weights: with weight on 4 positions per image (two of them negative), exactly
    # those 4 positions are drawn
    chosen = torch.stack([torch.randperm(36, generator=torch.Generator().manual_seed(i))[:4] for i in range(len(x))])
    weights = torch.zeros(len(x), 36).scatter(1, chosen, torch.tensor([0.5, -1.0, 2.0, -0.25]).expand(len(x), -1))
    monkeypatch.setattr(bc, "_position_contributions", lambda s, m, xb: weights[: len(xb)].view(-1, 6, 6))
    rows = collect_features(model, x, "features", samples_per_image=4, batch_size=len(x))
    all_rows = collect_features(model, x, "features").view(len(x), 36, -1)
    for i in range(len(x)):
        want = all_rows[i, chosen[i]]
        got = rows[4 * i: 4 * i + 4]
        assert all(bool((want == r).all(1).any()) for r in got) and all(bool((got == r).all(1).any()) for r in want)
