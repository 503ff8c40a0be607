"""The counterfactual page: query, counterfactual and change mask per image, the COUT curves, and the
summary numbers; and `digits_counterfactual_report`, the work behind `saliencylab counterfactual`
(train C3LT on the shipped digits domain, explain held-out images, measure, write the page).

The page is one self-contained HTML file (images as inline PNGs, curves as inline SVG).
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
import time
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
import torch

__all__ = ["write_counterfactual_page", "digits_counterfactual_report", "QUICK_DOMAIN", "QUICK_EPOCHS"]

# `--quick`: a tiny domain and a few epochs, for tests of the machinery (its pictures mean nothing).
QUICK_DOMAIN = dict(width=8, latent_dim=8, classifier_epochs=1, ae_epochs=1, adv_epochs=1, train_limit=64,
                    batch_size=32)
QUICK_EPOCHS = 2


def _png(array: np.ndarray, scale: int = 3) -> str:
    """A data URI of an (H, W) grey or (H, W, 3) colour uint8 image, enlarged `scale` times (nearest)."""
    from PIL import Image

    img = Image.fromarray(array)
    img = img.resize((img.width * scale, img.height * scale), Image.NEAREST)
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def _grey(image: torch.Tensor, low: float = -1.0, high: float = 1.0) -> np.ndarray:
    """(C, H, W) in [low, high] -> uint8 (H, W) (channel mean) or (H, W, 3)."""
    x = ((image.detach().float().cpu() - low) / (high - low)).clamp(0, 1)
    x = x[0] if x.shape[0] == 1 else x[:3].permute(1, 2, 0) if x.shape[0] == 3 else x.mean(0)
    return (x.numpy() * 255).round().astype(np.uint8)


def _heat(mask: torch.Tensor) -> np.ndarray:
    """(H, W) in [0, 1] -> a black-red-yellow-white heat map, uint8 (H, W, 3)."""
    m = mask.detach().float().cpu().clamp(0, 1).numpy()
    rgb = np.stack([np.clip(3 * m, 0, 1), np.clip(3 * m - 1, 0, 1), np.clip(3 * m - 2, 0, 1)], -1)
    return (rgb * 255).round().astype(np.uint8)


def _svg_curves(curves: Mapping[str, torch.Tensor], labels: Mapping[str, str], width: int = 360,
                height: int = 220) -> str:
    """Mean curve (bold) and each image's (thin) per key, x = fraction of the change applied, y in [0, 1]."""
    colours = {"source": "#1f77b4", "target": "#d62728"}
    pad = 34
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" class="curves">',
             f'<rect x="{pad}" y="10" width="{width - pad - 10}" height="{height - pad - 10}" fill="none" stroke="#999"/>']

    def xy(i, n, v):
        x = pad + (width - pad - 10) * (i / max(n - 1, 1))
        y = 10 + (height - pad - 10) * (1 - float(v))
        return f"{x:.1f},{y:.1f}"

    for key, c in curves.items():
        c = torch.as_tensor(c, dtype=torch.float64)
        if c.dim() == 1:
            c = c[None]
        colour = colours.get(key, "#555")
        for row in c[:32]:
            pts = " ".join(xy(i, len(row), v) for i, v in enumerate(row.tolist()) if math.isfinite(v))
            parts.append(f'<polyline points="{pts}" fill="none" stroke="{colour}" stroke-opacity="0.2"/>')
        mean = c.nanmean(0)
        pts = " ".join(xy(i, len(mean), v) for i, v in enumerate(mean.tolist()) if math.isfinite(v))
        parts.append(f'<polyline points="{pts}" fill="none" stroke="{colour}" stroke-width="2.5"/>')
    y0 = height - pad
    parts.append(f'<text x="{pad}" y="{y0 + 16}" font-size="11">0</text>'
                 f'<text x="{width - 40}" y="{y0 + 16}" font-size="11">all pixels</text>'
                 f'<text x="4" y="16" font-size="11">1</text><text x="4" y="{y0}" font-size="11">0</text>')
    ly = 24
    for key in curves:
        parts.append(f'<text x="{pad + 8}" y="{ly}" font-size="11" fill="{colours.get(key, "#555")}">'
                     f'{html.escape(labels.get(key, key))}</text>')
        ly += 14
    parts.append("</svg>")
    return "".join(parts)


def _fmt(v) -> str:
    if isinstance(v, float):
        return "n/a" if not math.isfinite(v) else f"{v:.4g}"
    return html.escape(str(v))


def write_counterfactual_page(path, queries: torch.Tensor, counterfactuals: torch.Tensor, masks: torch.Tensor, *,
                              probabilities: torch.Tensor, query_probabilities: torch.Tensor, source: int,
                              target: int, curves: Mapping[str, torch.Tensor] | None = None,
                              scores: torch.Tensor | None = None, summary: Mapping | None = None,
                              class_names: Sequence[str] | None = None, title: str = "Counterfactuals",
                              note: str = "", value_range: tuple[float, float] = (-1.0, 1.0)) -> Path:
    """Write the page to `path` (a file, or a folder: its index.html). queries / counterfactuals
    (B, C, H, W) in `value_range`; masks (B, H, W) in [0, 1]; probabilities (B, K); curves: COUT's
    {"source": (B, S + 1), "target": (B, S + 1)} (None: no curve section); scores (B,) per image."""
    path = Path(path)
    if path.suffix.lower() not in (".html", ".htm"):
        path.mkdir(parents=True, exist_ok=True)
        path = path / "index.html"
    else:
        path.parent.mkdir(parents=True, exist_ok=True)
    name = (lambda k: class_names[k]) if class_names else str
    lo, hi = value_range
    rows = []
    for i in range(len(queries)):
        p_src, p_tgt = float(query_probabilities[i, source]), float(probabilities[i, target])
        top = int(probabilities[i].argmax())
        ok = top == target
        score = f"<br>COUT {float(scores[i]):.3f}" if scores is not None else ""
        rows.append(
            "<tr>"
            f'<td><img src="{_png(_grey(queries[i], lo, hi))}" alt="query {i}"><br>p({html.escape(name(source))}) '
            f"{p_src:.3f}</td>"
            f'<td><img src="{_png(_grey(counterfactuals[i], lo, hi))}" alt="counterfactual {i}"><br>'
            f"p({html.escape(name(target))}) {p_tgt:.3f}<br>"
            f'<span class="{"ok" if ok else "bad"}">{"valid" if ok else "not valid: " + html.escape(name(top))}'
            f"</span>{score}</td>"
            f'<td><img src="{_png(_heat(masks[i]))}" alt="change mask {i}"></td>'
            "</tr>")
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'>",
        f"<title>{html.escape(title)}</title>",
        "<style>body{font-family:system-ui,sans-serif;margin:2em;max-width:60em}"
        "table{border-collapse:collapse}td,th{padding:6px 10px;text-align:center;vertical-align:top}"
        "tr:nth-child(even){background:#f6f6f6}img{image-rendering:pixelated}.ok{color:#1a7f37}"
        ".bad{color:#b42318}.summary td{text-align:left}</style></head><body>",
        f"<h1>{html.escape(title)}</h1>",
        f"<p>{html.escape(name(source))} &rarr; {html.escape(name(target))}. {html.escape(note)}</p>",
    ]
    if summary:
        parts.append("<h2>Summary</h2><table class='summary'>")
        parts += [f"<tr><td>{html.escape(str(k))}</td><td>{_fmt(v)}</td></tr>" for k, v in summary.items()]
        parts.append("</table>")
    if curves:
        labels = {"source": f"p({name(source)})", "target": f"p({name(target)})"}
        parts.append("<h2>COUT curves</h2><p>Class probabilities as the counterfactual's pixels replace the "
                     "query's, most-changed first (thin: each image; bold: the mean). COUT = area under "
                     "p(target) - area under p(source).</p>")
        parts.append(_svg_curves(curves, labels))
    parts.append("<h2>Images</h2><table><tr><th>query</th><th>counterfactual</th><th>change mask</th></tr>")
    parts += rows
    parts.append("</table></body></html>")
    path.write_text("\n".join(parts), encoding="utf-8")
    return path


def _cout(classifier, x, x_cf, source, target):
    """Helper cout's metric (saliencylab.metrics.counterfactual); None when it is not installed."""
    try:
        from ..metrics.counterfactual import cout
    except ImportError:
        return None
    return cout(classifier, x, x_cf, source, target, protocol="c3lt")  # the authors' checkpoints and area


def digits_counterfactual_report(out_dir, *, source: int = 4, target: int = 9, epochs: int | None = None,
                                 images: int = 8, seed: int = 0, quick: bool = False, resume: bool = True,
                                 progress: bool = True, callback=None) -> dict:
    """Train C3LT (the authors' defaults) on the training images of `source` and `target` of the shipped
    digits domain (checkpoints in OUT/c3lt, resumed), explain the first `images` held-out images of
    `source`, measure validity, proximity and COUT (helper metric, when present), and write
    OUT/index.html and OUT/summary.json. Returns the summary."""
    from ..core.errors import ConfigError
    from ..counterfactuals.c3lt import C3LT, DEFAULTS
    from ..counterfactuals.digits import digits_domain

    for k, v in (("source", source), ("target", target)):
        if isinstance(v, bool) or not isinstance(v, int) or not 0 <= v <= 9:
            raise ConfigError(f"{k} must be a digit 0-9, got {v!r}")
    if source == target:
        raise ConfigError(f"source and target must differ, both are {source}")
    if isinstance(images, bool) or not isinstance(images, int) or images < 1:
        raise ConfigError(f"images must be an integer >= 1, got {images!r}")
    epochs = (QUICK_EPOCHS if quick else DEFAULTS["epochs"]) if epochs is None else epochs
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    domain = digits_domain(seed, **(QUICK_DOMAIN if quick else {}))
    model = C3LT(domain.generator, domain.encoder, domain.classifier, domain.discriminator, source=source,
                 target=target, perceptual_layers=domain.perceptual_layers, seed=seed)
    model.fit(domain.images(source, "train"), domain.images(target, "train"), epochs=epochs, out_dir=out / "c3lt",
              resume=resume, progress=progress, callback=callback)
    x = domain.images(source, "test")[:images]
    cf = model.explain(x)
    with torch.no_grad():
        m = _cout(domain.classifier, x, cf.images, source, target)
    curves = {k: m.curves[k].detach().cpu() for k in ("source", "target") if k in (m.curves or {})} \
        if m is not None else None
    scores = m.scores.detach().cpu() if m is not None else None
    summary = {
        "source": source, "target": target, "images": len(x), "epochs": epochs, "seed": seed, "quick": quick,
        "validity": float(cf.valid.double().mean()),
        "mean p(target) at the counterfactual": float(cf.probabilities[:, target].double().mean()),
        "mean p(source) at the query": float(cf.query_probabilities[:, source].double().mean()),
        "proximity (mean |x - x_cf|, images in [-1, 1])": float((cf.images - x).abs().double().mean()),
        "COUT (mean)": float(scores.double().mean()) if scores is not None else float("nan"),
        "classifier accuracy (held out)": float(domain.info.get("accuracy", float("nan"))),
        "seconds": time.perf_counter() - t0,
    }
    note = ("Digits of scikit-learn upsampled to 32 px; C3LT trained with the authors' defaults "
            "(saliencylab.counterfactuals.c3lt)." + (" Quick settings: the networks are barely trained." if quick else "")
            + ("" if m is not None else " COUT curves: saliencylab.metrics.counterfactual is not installed."))
    write_counterfactual_page(out / "index.html", x, cf.images, cf.masks, probabilities=cf.probabilities,
                              query_probabilities=cf.query_probabilities, source=source, target=target,
                              curves=curves, scores=scores, summary=summary,
                              title=f"C3LT counterfactuals: {source} -> {target}", note=note)
    (out / "summary.json").write_text(json.dumps(summary, indent=1), encoding="utf-8")
    summary["page"] = str(out / "index.html")
    return summary
