"""Suites: composed images per axiom with their patch regions and measured independence."""

from __future__ import annotations

import torch
from torch import nn

from ...core.errors import ConfigError
from ...core.session import ModelSession, model_device
from .normalization import _as_normalize
from .placement import _backgrounds, _compose, _two_positions
from .results import AXIOMS, Patches, Suite


def make_suite(model: nn.Module, patches: Patches, n: int = 8, seed: int = 0, *, normalize=None,
               only_converged: bool = True) -> Suite:
    """`n` images per axiom on fresh noise backgrounds, with their patch regions and measured independence.

    Class sensitivity: two patches of different classes. Null player: a patch and a uniform-noise
    patch. Symmetry: one patch twice. Patches that did not converge are left out unless
    `only_converged=False`. Measured (forwarding each image with each patch replaced by background):
    class sensitivity |z_ci(both) - z_ci(i alone)| (the other patch's effect on class i, both ways);
    null player |z_c(both) - z_c(patch alone)|; symmetry |effect of copy 0 - effect of copy 1| on z_c,
    where a patch's effect is z(image) - z(image without it). `interaction` divides each by the
    patch's own effect |z_c(patch alone) - z_c(background)|; `independence` holds the maxima.
    """
    if not isinstance(n, int) or n < 1:
        raise ConfigError(f"n must be a positive int, got {n!r}")
    norm = _as_normalize(normalize)[0] if normalize is not None else (patches.normalize or (lambda x: x))
    usable = torch.arange(len(patches)) if not only_converged else patches.converged.nonzero().flatten()
    if len(usable) < 2:
        raise ConfigError(
            f"a knows-best suite needs at least two converged patches, got {len(usable)} of {len(patches)} "
            f"(probabilities {[round(p, 3) for p in patches.probabilities.tolist()]}); generate with more "
            "steps, or pass only_converged=False")
    size, s = patches.image_size, patches.patch_size
    gen = torch.Generator().manual_seed(int(seed))
    usable = usable.tolist()
    classes = patches.classes.tolist()
    ordered = [(a, b) for a in usable for b in usable if a != b]
    ordered = [ordered[k] for k in torch.randperm(len(ordered), generator=gen).tolist()]
    # pixel bank: the patches, then one noise patch per null-player image
    noise = torch.rand(n, 3, s, s, generator=gen)
    bank = torch.cat([patches.patches.float(), noise])
    null_id = lambda k: len(patches) + k  # noqa: E731
    bgs = _backgrounds(3 * n, size, gen)
    placed, region_classes, kinds = [], [], []
    for k in range(3 * n):
        kind = AXIOMS[k // n]
        pos0, pos1 = _two_positions(size, s, gen)
        if kind == "class_sensitivity":
            a, b = ordered[k % len(ordered)]
            ids, rc = (a, b), (classes[a], classes[b])
        elif kind == "null_player":
            a = usable[k % len(usable)]
            ids, rc = (a, null_id(k - n)), (classes[a], -1)
        else:
            a = usable[k % len(usable)]
            ids, rc = (a, a), (classes[a], classes[a])
        placed.append([(ids[0], *pos0), (ids[1], *pos1)])
        region_classes.append(rc)
        kinds.append(kind)
    idx = list(range(3 * n))
    pixels = _compose(bgs, idx, placed, bank)
    boxes = torch.tensor([[[y, x, y + s, x + s] for _, y, x in p] for p in placed], dtype=torch.long)
    regions = torch.zeros(3 * n, 2, size, size, dtype=torch.bool)
    for k, p in enumerate(placed):
        for r, (_, y, x) in enumerate(p):
            regions[k, r, y:y + s, x:x + s] = True
    region_classes = torch.tensor(region_classes, dtype=torch.long)

    # Measure: full image, without region 0, without region 1, background only.
    without0 = _compose(bgs, idx, [[p[1]] for p in placed], bank)
    without1 = _compose(bgs, idx, [[p[0]] for p in placed], bank)
    device = model_device(model)
    with ModelSession(model) as session, torch.no_grad():
        def logits_of(imgs):
            return torch.cat([session.forward(norm(imgs[i:i + 32].to(device))).float().cpu()
                              for i in range(0, len(imgs), 32)])

        z_full, z_w0, z_w1, z_bg = (logits_of(t) for t in (pixels, without0, without1, bgs))
    c0 = region_classes[:, 0]
    c1 = region_classes[:, 1].clamp_min(0)
    g = lambda z, c: z.gather(1, c[:, None]).squeeze(1)  # noqa: E731
    # effect of region 1 on class 0 (present with region 0), and of region 0 on class 1
    eff1_on_c0 = (g(z_full, c0) - g(z_w1, c0)).abs()
    eff0_on_c1 = (g(z_full, c1) - g(z_w0, c1)).abs()
    own0 = (g(z_w1, c0) - g(z_bg, c0)).abs().clamp_min(1e-6)  # region 0 alone vs background
    own1 = (g(z_w0, c1) - g(z_bg, c1)).abs().clamp_min(1e-6)
    asym = ((g(z_full, c0) - g(z_w0, c0)) - (g(z_full, c0) - g(z_w1, c0))).abs()
    absolute = torch.zeros(3 * n)
    relative = torch.zeros(3 * n)
    ind = {}
    for kind in AXIOMS:
        sel = torch.tensor([i for i, k in enumerate(kinds) if k == kind])
        if kind == "class_sensitivity":
            a = torch.maximum(eff1_on_c0[sel], eff0_on_c1[sel])
            r = torch.maximum(eff1_on_c0[sel] / own0[sel], eff0_on_c1[sel] / own1[sel])
        elif kind == "null_player":
            a, r = eff1_on_c0[sel], eff1_on_c0[sel] / own0[sel]
        else:
            a, r = asym[sel], asym[sel] / own0[sel]
        absolute[sel], relative[sel] = a, r
        ind[f"{kind}_max_logit_change"] = float(a.max())
        ind[f"{kind}_max_relative_change"] = float(r.max())
    probs = z_full.softmax(dim=1).gather(1, c0[:, None]).squeeze(1)
    ind["min_target_probability_alone"] = float(z_w1.softmax(dim=1).gather(1, c0[:, None]).min())
    ind["mean_target_probability"] = float(probs.mean())
    return Suite(x=norm(pixels).detach(), pixels=pixels, targets=c0.clone(), region_classes=region_classes,
                 regions=regions, boxes=boxes, kind=kinds, interaction=relative, independence=ind,
                 patch_size=s)
