"""The concepts page: FaCT-style concepts of a small B-cos network (`saliencylab concepts`).

`run_concepts(out_dir, ...)` trains (or loads from the cache) the shipped small B-cos network
(`saliencylab.concepts.bcos_concepts.trained_bcos_model`), fits a bias-free top-k SAE at a layer
(`fit_concepts`, checkpoints under `out_dir/sae`, resumed when run again), measures the concept
contributions on held-out images and writes `out_dir/index.html` (and `concepts.json`, PNGs under
`out_dir/img`):

- accuracy of the network and of the network with the SAE spliced in, reconstruction error, SAE history;
- a gallery per concept (the concepts with the largest mean |contribution|): its top-activating
  held-out images (FaCT's `explain_concepts`: largest presence), each with the concept's trace
  (the B-cos colour image of W_j(x), `gradient_to_image`, smooth 3 as FaCT's `explain_images`);
- per image: the predicted logit split into its concepts' contributions (share of the positive
  contributions, as FaCT's plots), the reconstruction-error term (splice "residual") and the bias,
  with the traces of the top contributing concepts and the B-cos explanation of the logit.
"""

from __future__ import annotations

import datetime
import json
import platform
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

__all__ = ["run_concepts", "ConceptsRun"]

SCALE = 3  # image pixels per source pixel on the page (the images are 32 px)
PER_IMAGE_CONCEPTS = 3


@dataclass
class ConceptsRun:
    index: Path
    accuracy: float
    spliced_accuracy: float
    shown: list = field(default_factory=list)
    seconds: float = 0.0


def _png(path: Path, rgb: np.ndarray) -> str:
    from PIL import Image

    from .render import save_png

    arr = np.clip(np.rint(rgb * 255.0), 0, 255).astype(np.uint8)
    h, w = arr.shape[:2]
    img = Image.fromarray(arr).resize((w * SCALE, h * SCALE), Image.NEAREST)
    save_png(path, np.asarray(img))
    return path.parent.name + "/" + path.name


def _on_white(rgba: torch.Tensor) -> np.ndarray:
    """(4, H, W) RGBA in [0, 1] -> (H, W, 3) composited on white, as matplotlib shows FaCT's traces."""
    rgb, alpha = rgba[:3], rgba[3:4]
    return (rgb * alpha + (1 - alpha)).permute(1, 2, 0).numpy()


def run_concepts(out_dir, *, layer: str = "features", concepts: int = 32, k: int = 4, images: int = 6,
                 top: int = 6, show: int = 8, sae_epochs: int = 16, train_images: int = 1024, epochs: int = 12,
                 probe: int = 256, splice: str = "replace", seed: int = 0, resume: bool = True,
                 progress: bool = True, command: str | None = None) -> ConceptsRun:
    """Train or load, measure, write the page; see the module docstring."""
    from .. import __version__
    from ..api import explain
    from ..concepts.bcos_concepts import (DOMAIN, concept_contributions, concept_traces, domain_data, fit_concepts,
                                          top_activating, trained_bcos_model)
    from ..core.errors import ConfigError
    from ..models.bcos import gradient_to_image
    from .html import _environment

    t0 = time.perf_counter()
    for name, v in (("images", images), ("top", top), ("show", show), ("probe", probe)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ConfigError(f"{name} must be a positive integer, got {v!r}")
    from ..concepts.bcos_concepts import _build
    from ..core.layers import get_layer

    get_layer(_build(seed), layer)  # a bad layer fails before anything is trained
    out_dir = Path(out_dir)
    img_dir = out_dir / "img"
    img_dir.mkdir(parents=True, exist_ok=True)
    model, info = trained_bcos_model(n=train_images, epochs=epochs, seed=seed, progress=progress)
    names = info["class_names"]
    train = domain_data("train", train_images, seed)
    held = domain_data("test", probe, seed)
    fitted = fit_concepts(model, train.images, layer, concepts=concepts, k=k, epochs=sae_epochs, seed=seed,
                          out_dir=out_dir / "sae", resume=resume, progress=progress)
    sae = fitted.sae
    cc = concept_contributions(model, sae, held.images, layer=layer, splice=splice)
    labels = held.labels
    accuracy = float((cc.original_logits.argmax(1) == labels).float().mean())
    spliced = float((cc.logits.argmax(1) == labels).float().mean())

    # the concepts shown: largest mean |contribution| over the held-out images, alive ones only
    importance = cc.contributions.abs().mean(0)
    alive = cc.activations.sum(0) > 0
    order = [int(j) for j in importance.argsort(descending=True) if bool(alive[j])][:show]
    galleries = []
    if order:
        best = top_activating(cc.activations, top)  # (top, concepts)
        idx = best[:, order].T.reshape(-1)  # concept by concept
        per = best.shape[0]
        traced = concept_traces(model, sae, held.images[idx], torch.tensor(order).repeat_interleave(per)[:, None],
                                layer=layer, return_weights=True)
        colour = gradient_to_image(traced.encoded, traced.weights[:, 0], smooth=3)
        for c, j in enumerate(order):
            items = []
            for r in range(per):
                i = c * per + r
                n = int(idx[i])
                if float(traced.activations[i, 0]) <= 0:
                    continue  # fewer images than `top` hold the concept at all
                items.append({
                    "image": _png(img_dir / f"c{j}_{r}_image.png", held.images[n].permute(1, 2, 0).numpy()),
                    "trace": _png(img_dir / f"c{j}_{r}_trace.png", _on_white(colour[i])),
                    "activation": float(traced.activations[i, 0]), "index": n,
                    "label": names[int(labels[n])], "predicted": names[int(cc.logits[n].argmax())]})
            galleries.append({"concept": j, "importance": float(importance[j]),
                              "share": float((cc.activations[:, j] > 0).float().mean()), "items": items})

    # per image: the logit in concept contributions
    n_img = min(images, len(labels))
    sel = torch.arange(n_img)
    top_c = cc.contributions[sel].topk(min(PER_IMAGE_CONCEPTS, cc.contributions.shape[1]), dim=1).indices
    traced = concept_traces(model, sae, held.images[sel], top_c, layer=layer, return_weights=True)
    logit_map = explain(model, held.images[sel], "bcos", target=cc.targets[sel], return_weights=True)
    logit_colour = gradient_to_image(logit_map.extras["encoded"], logit_map.extras["weights"], smooth=3)
    rows = []
    for i in range(n_img):
        contrib = cc.contributions[i]
        positive = float(contrib.clamp_min(0).sum()) or 1.0
        colours = gradient_to_image(traced.encoded[i:i + 1].expand(top_c.shape[1], -1, -1, -1), traced.weights[i],
                                    smooth=3)
        parts = []
        for r, j in enumerate(top_c[i].tolist()):
            if float(contrib[j]) == 0:
                continue  # fewer active concepts than shown
            parts.append({"concept": j, "contribution": float(contrib[j]), "percent": 100 * float(contrib[j]) / positive,
                          "activation": float(cc.activations[i, j]),
                          "trace": _png(img_dir / f"i{i}_c{j}_trace.png", _on_white(colours[r]))})
        shown = sum(p["contribution"] for p in parts)
        rows.append({
            "image": _png(img_dir / f"i{i}_image.png", held.images[i].permute(1, 2, 0).numpy()),
            "logit_trace": _png(img_dir / f"i{i}_logit.png", _on_white(logit_colour[i])),
            "label": names[int(labels[i])], "target": names[int(cc.targets[i])],
            "logit": float(cc.target_logits[i]), "bias": float(cc.bias[i]), "error": float(cc.error[i]),
            "others": float(contrib.sum()) - shown, "others_percent": 100 * (float(contrib.sum()) - shown) / positive,
            "active": int((contrib != 0).sum()), "gap": float(cc.completeness_gap()[i]), "parts": parts})

    history = [{k: r.get(k) for k in ("epoch", "loss", "fve", "l0", "dead")} for r in fitted.history]
    facts = {
        "domain": {**DOMAIN, "classes": list(DOMAIN["classes"]), "train_images": train_images, "held_out": probe},
        "network": {"class": type(model).__name__, "epochs": epochs, "accuracy": accuracy},
        "sae": {"layer": layer, "concepts": concepts, "k": k, "epochs": sae_epochs, "splice": splice,
                "spliced_accuracy": spliced, "relative_error": float(cc.relative_error.mean()),
                "alive": int(alive.sum()), "max_completeness_gap": float(cc.completeness_gap().abs().max()),
                "resumed_from": fitted.resumed_from},
        "history": history,
        "concepts": [{k: g[k] for k in ("concept", "importance", "share")} |
                     {"top": [{"index": it["index"], "activation": it["activation"]} for it in g["items"]]}
                     for g in galleries],
        "images": [{k: r[k] for k in ("label", "target", "logit", "bias", "error", "others", "gap")} |
                   {"concepts": [{k: p[k] for k in ("concept", "contribution", "percent")} for p in r["parts"]]}
                   for r in rows],
    }
    (out_dir / "concepts.json").write_text(json.dumps(facts, indent=1), encoding="utf-8")
    page = {"facts": facts, "galleries": galleries, "rows": rows, "history": history, "command": command,
            "versions": {"saliencylab": __version__, "torch": torch.__version__, "python": platform.python_version()},
            "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")}
    html = _environment().from_string(TEMPLATE).render(page=page, title="saliencylab concepts (FaCT on a B-cos network)")
    index = out_dir / "index.html"
    tmp = index.with_name(index.name + ".tmp")
    tmp.write_text(html, encoding="utf-8")
    tmp.replace(index)
    return ConceptsRun(index, accuracy, spliced, order, time.perf_counter() - t0)


TEMPLATE = """<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{{ title }}</title>
<style>
{% include "_style.css.j2" %}
  .gallery { display: flex; flex-wrap: wrap; gap: 10px; }
  .item { text-align: center; font-size: 0.8em; }
  .item img { display: block; image-rendering: pixelated; }
  table.parts td { vertical-align: top; text-align: center; padding: 4px 8px; font-size: 0.85em; }
</style>
</head>
<body>
<h1>{{ title }}</h1>
{% set f = page.facts %}
<p class="sub">A {{ f.network.class }} trained on generated images ({{ f.domain.classes|join(", ") }} on two textures,
{{ f.domain.size }} px); a bias-free top-k sparse autoencoder ({{ f.sae.concepts }} concepts, {{ f.sae.k }} active per
position) at layer <strong>{{ f.sae.layer }}</strong> (FaCT, Parchami-Araghi et al., NeurIPS 2025). The network in explanation mode is dynamic linear above the layer, so a
concept's contribution (d logit / d concept) &times; concept is exact: the contributions sum to the logit minus its bias
(largest gap here {{ '%.2g'|format(f.sae.max_completeness_gap) }}).</p>
<ul>
<li>Network accuracy on {{ f.domain.held_out }} held-out images: {{ '%.3f'|format(f.network.accuracy) }};
with the SAE spliced in ({{ f.sae.splice }}): {{ '%.3f'|format(f.sae.spliced_accuracy) }}.</li>
<li>Mean relative reconstruction error ||h - D f|| / ||h||: {{ '%.3f'|format(f.sae.relative_error) }};
concepts active on some held-out image: {{ f.sae.alive }} of {{ f.sae.concepts }}.</li>
<li>SAE training: {{ page.history|length - 1 }} epochs{% if f.sae.resumed_from is not none %} (resumed from epoch {{ f.sae.resumed_from }}){% endif %};
fraction of variance explained {{ '%.3f'|format(page.history[-1].fve or 0) }}.</li>
</ul>

<section>
<h2>Concepts</h2>
<p class="sub">The concepts with the largest mean |contribution|; per concept its top-activating held-out images (largest summed activation),
each above its trace: the B-cos explanation of the concept's activation (colour: the direction of the dynamic linear map W(x), opacity: its norm on positively contributing pixels).</p>
{% for g in page.galleries %}
<h3>Concept {{ g.concept }}</h3>
<p class="sub">mean |contribution| {{ '%.3g'|format(g.importance) }}; active on {{ '%.0f'|format(100 * g.share) }}% of the held-out images</p>
<div class="gallery">
{% for it in g["items"] %}
<div class="item"><img src="{{ it.image }}" alt="image {{ it.index }}"><img src="{{ it.trace }}" alt="trace of concept {{ g.concept }}">
{{ it.label }} &rarr; {{ it.predicted }}<br>activation {{ '%.3g'|format(it.activation) }}</div>
{% endfor %}
</div>
{% else %}
<p class="sub">No concept is active on the held-out images.</p>
{% endfor %}
</section>

<section>
<h2>Decisions in concepts</h2>
<p class="sub">Per image: the explained logit (the predicted class) as the sum of its concepts' contributions; percentages are of the positive contributions.</p>
{% for r in page.rows %}
<h3>{{ r.label }} &rarr; {{ r.target }}: logit {{ '%.3f'|format(r.logit) }} = concepts {{ '%.3f'|format(r.logit - r.bias - r.error) }}{% if r.error %} + error {{ '%.3f'|format(r.error) }}{% endif %} + bias {{ '%.3f'|format(r.bias) }}</h3>
<table class="parts"><tr>
<td><img src="{{ r.image }}" alt="image"><br>image</td>
<td><img src="{{ r.logit_trace }}" alt="logit explanation"><br>B-cos explanation of the logit</td>
{% for p in r.parts %}
<td><img src="{{ p.trace }}" alt="trace of concept {{ p.concept }}"><br>concept {{ p.concept }}: {{ '%.3f'|format(p.contribution) }} ({{ '%.1f'|format(p.percent) }}%)</td>
{% endfor %}
<td>other concepts ({{ r.active }} active in all):<br>{{ '%.3f'|format(r.others) }} ({{ '%.1f'|format(r.others_percent) }}%)</td>
</tr></table>
{% endfor %}
</section>

<section>
<h2>SAE training</h2>
<table class="scores"><tr><th>epoch</th><th>loss</th><th>FVE</th><th>L0</th><th>dead</th></tr>
{% for h in page.history %}<tr><td>{{ h.epoch }}</td><td>{{ '%.4f'|format(h.loss) if h.loss is not none else '—' }}</td>
<td>{{ '%.4f'|format(h.fve) if h.fve is not none else '—' }}</td><td>{{ '%.2f'|format(h.l0) }}</td><td>{{ h.dead if h.dead is not none else '—' }}</td></tr>
{% endfor %}</table>
</section>
<p class="sub">{% if page.command %}<code>{{ page.command }}</code> &middot; {% endif %}saliencylab {{ page.versions.saliencylab }}, torch {{ page.versions.torch }},
Python {{ page.versions.python }} &middot; {{ page.date }}</p>
</body>
</html>
"""
