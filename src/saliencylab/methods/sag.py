"""Structured attention graphs (Shitole et al. 2021): several minimal explanations and how they degrade.

1. A coarse I-GOS mask (`size` x `size` patches, default 7x7, 2 iterations) orders the patches.
2. Beam search (width `beam_width`) over sets of revealed patches (the rest blurred, as in I-GOS):
   starting from the empty set, each state grows by one of the `candidates` most important patches;
   a set whose score reaches `threshold` x the full image's score is sufficient, is recorded and not
   grown further (its supersets are not minimal); the others compete for the beam. At most
   `max_patches` patches per set.
3. Roots: sufficient sets that are minimal (no recorded subset), smallest and highest-scoring first,
   kept only if they share at most `max_overlap` of their patches with every root already kept
   (diverse roots), at most `roots` of them.
4. The graph: from every root, children remove one patch at a time, down `depth` levels; each node
   carries its patches and its score, each edge the patch removed. Nodes shared by several roots
   are merged.

Every set is scored by one forward pass through the perturbation engine (all sets of a step in
chunks of `batch_size`). The map returned for the method contract is, per patch, the fraction of
roots that contain it plus a small tie-break from the coarse I-GOS importance (lowres: the same at the
patch grid). `explain(...)` returns extras "graphs" (one `AttentionGraph` per image, exportable with
`to_json` and drawable with `draw`), "roots" (each image's root patch sets), "igos" (B, H, W) the coarse
I-GOS importance that ordered the patches and "igos_mask" its keep-mask at the patch grid. The coarse
I-GOS runs through its public `explain` with this call's image ids, so its noise is keyed to the
images as everywhere else.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

import torch

from ..core.errors import ConfigError
from ..core.explanation import Explanation
from ..perturbation import Perturber, fit_masks
from .base import Method, Param, check_batch_size, clean_outputs, register
from .igos import IGOS, igos_baseline


@dataclass
class AttentionGraph:
    """One image's structured attention graph. Patches are indices r * grid[1] + c."""

    grid: tuple[int, int]
    image_size: tuple[int, int]
    target: int | None
    full_score: float
    threshold: float
    nodes: list[dict] = field(default_factory=list)  # {"id", "patches", "score", "root", "sufficient", "level"}
    edges: list[dict] = field(default_factory=list)  # {"parent", "child", "removed"}
    sufficient_sets: list[list[int]] = field(default_factory=list)  # every minimal set the search found
    order: list[int] = field(default_factory=list)  # patches by coarse I-GOS importance

    @property
    def roots(self) -> list[dict]:
        return [n for n in self.nodes if n["root"]]

    def to_dict(self) -> dict:
        return {"grid": list(self.grid), "image_size": list(self.image_size), "target": self.target,
                "full_score": self.full_score, "threshold": self.threshold, "order": self.order,
                "sufficient_sets": self.sufficient_sets, "nodes": self.nodes, "edges": self.edges}

    def to_json(self, path=None, **kwargs) -> str:
        text = json.dumps(self.to_dict(), **{"indent": 1, **kwargs})
        if path is not None:
            with open(path, "w", encoding="utf-8") as f:
                f.write(text)
        return text

    @classmethod
    def from_json(cls, text: str) -> "AttentionGraph":
        d = json.loads(text)
        return cls(tuple(d["grid"]), tuple(d["image_size"]), d["target"], d["full_score"], d["threshold"],
                   d["nodes"], d["edges"], d["sufficient_sets"], d["order"])

    def patch_mask(self, patches) -> torch.Tensor:
        """(H, W) keep-mask revealing the given patches."""
        low = torch.zeros(1, 1, *self.grid)
        for p in patches:
            low.view(-1)[p] = 1
        return fit_masks(low, self.image_size)[0, 0]

    def draw(self, image, path=None, *, baseline=None, title: str | None = None):
        """Draw the graph: one tile per node (revealed patches over a dimmed image), edges between them.

        image: (3, H, W) tensor or (H, W, 3) array with values in [0, 1] (e.g. `LoadedModel.denormalize`);
        baseline: the same for what replaces hidden patches (default: the image dimmed to 25%).
        Returns the matplotlib figure (its own Agg canvas, no pyplot: a notebook's backend is untouched);
        saves it to `path` (PNG) if given.
        """
        import numpy as np

        from ..report.plots import new_figure

        def to_hwc(a):
            a = a.detach().cpu().float().numpy() if isinstance(a, torch.Tensor) else np.asarray(a, dtype=np.float32)
            return np.transpose(a, (1, 2, 0)) if a.ndim == 3 and a.shape[0] in (1, 3) and a.shape[-1] not in (1, 3) \
                else a

        img = to_hwc(image)
        base = to_hwc(baseline) if baseline is not None else img * 0.25
        levels: dict[int, list[dict]] = {}
        for n in self.nodes:
            levels.setdefault(n["level"], []).append(n)
        n_levels = max(levels) + 1 if levels else 1
        width = max((len(v) for v in levels.values()), default=1)
        fig = new_figure(figsize=(max(4.0, 1.6 * width), 1.9 * n_levels + 0.6))
        pos = {}
        tile_w, tile_h = 0.8 / max(width, 1), 0.75 / n_levels
        for lvl, nodes in sorted(levels.items()):
            for j, n in enumerate(nodes):
                cx = (j + 0.5) / len(nodes)
                cy = 1 - (lvl + 0.5) / n_levels - 0.03
                pos[n["id"]] = (cx, cy)
                ax = fig.add_axes([cx - tile_w / 2, cy - tile_h / 2 + 0.02, tile_w * 0.95, tile_h * 0.8])
                m = self.patch_mask(n["patches"]).numpy()[..., None]
                ax.imshow(np.clip(img * m + base * (1 - m), 0, 1))
                ax.set_xticks([])
                ax.set_yticks([])
                colour = "tab:green" if n["sufficient"] else "tab:red"
                for s in ax.spines.values():
                    s.set_edgecolor(colour)
                    s.set_linewidth(3 if n["root"] else 1.5)
                ax.set_title(f"{n['score'] / max(self.full_score, 1e-12):.0%}", fontsize=8, color=colour, pad=2)
        overlay = fig.add_axes([0, 0, 1, 1], facecolor="none")
        overlay.set_xlim(0, 1)
        overlay.set_ylim(0, 1)
        overlay.axis("off")
        for e in self.edges:
            (x0, y0), (x1, y1) = pos[e["parent"]], pos[e["child"]]
            overlay.annotate("", xy=(x1, y1 + tile_h * 0.45), xytext=(x0, y0 - tile_h * 0.3),
                             arrowprops=dict(arrowstyle="->", color="0.4", lw=0.8))
        fig.suptitle(title or f"structured attention graph (threshold {self.threshold:.0%} of "
                              f"{self.full_score:.2f})", fontsize=9)
        overlay.set_zorder(-1)
        if path is not None:
            fig.savefig(path, dpi=100)
        return fig


def _key(patches) -> tuple[int, ...]:
    return tuple(sorted(int(p) for p in patches))


@register
class StructuredAttentionGraph(Method):
    name = "structured_attention_graph"
    description = "SAG: diverse minimal patch sets that keep the score (beam search on coarse I-GOS), as a graph."
    stochastic = True  # the coarse I-GOS's path-point noise (keyed to the images)

    size = Param(7, "patch grid side (and the coarse I-GOS mask's)")
    iterations = Param(2, "coarse I-GOS iterations")
    steps = Param(20, "coarse I-GOS path points")
    threshold = Param(0.9, "a set is sufficient at this fraction of the full image's score")
    beam_width = Param(3, "beam width")
    candidates = Param(15, "most important patches a state may grow by")
    max_patches = Param(15, "largest set searched")
    roots = Param(3, "roots (diverse minimal sufficient sets) kept")
    max_overlap = Param(0.5, "largest shared fraction between two roots")
    depth = Param(2, "levels of patch removal below the roots")
    baseline = Param(None, "what hidden patches become (None: the I-GOS blur)")
    score = Param("softmax", "score explained: 'softmax', 'logit' or 'log_softmax'")
    seed = Param(0, "coarse I-GOS noise seed")
    batch_size = Param(10, "rows per pass (None: picked for the device)")

    def check(self):
        for key in ("size", "iterations", "steps", "beam_width", "candidates", "max_patches", "roots"):
            v = getattr(self, key)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ConfigError(f"{key} must be a positive int, got {v!r}")
        if not 0 < self.threshold <= 1:
            raise ConfigError(f"threshold must be in (0, 1], got {self.threshold!r}")
        if not isinstance(self.depth, int) or self.depth < 0:
            raise ConfigError(f"depth must be a non-negative int, got {self.depth!r}")
        if self.batch_size is not None:
            check_batch_size(self.batch_size)
        self._perturber = Perturber(igos_baseline() if self.baseline is None else self.baseline, self.score,
                                    self.batch_size)

    # -- scoring sets of patches -------------------------------------------------------------
    def _score_sets(self, session, x, target, sets_per_image: list[list[tuple[int, ...]]], grid):
        """Scores of revealing each set of patches (rest: baseline); one list per image."""
        n = max((len(s) for s in sets_per_image), default=0)
        if n == 0:
            return [[] for _ in sets_per_image]
        B = x.shape[0]
        h, w = grid
        low = torch.zeros(B, n, h * w, dtype=x.dtype, device=x.device)
        for b, sets in enumerate(sets_per_image):
            for k, s in enumerate(sets):
                low[b, k, list(s)] = 1
        low = low.view(B, n, 1, h, w)
        scores = self._perturber.scores(session, x, target, n, lambda image, k: low[image, k], desc=self.name)
        return [scores[b, : len(sets)].tolist() for b, sets in enumerate(sets_per_image)]

    def compute(self, session, x, target):
        resolved, outputs = clean_outputs(session, x, target)
        full = resolved.with_score(self.score)(outputs).detach()
        B, _, H, W = x.shape
        grid = (min(self.size, H), min(self.size, W))
        U = grid[0] * grid[1]
        # 1. coarse I-GOS ordering, through its public path (same images, same ids: same noise keys);
        # its passes are added to this call's cost
        igos = IGOS(self.model, size=self.size, steps=self.steps, iterations=self.iterations,
                    baseline=self.baseline, score=self.score, seed=self.seed, batch_size=self.batch_size)
        coarse = igos.explain(x, target if resolved.classes is None else resolved.classes,
                              image_ids=session.image_ids)
        session.charge(coarse.cost)
        low_imp = coarse.lowres.reshape(B, -1)  # (B, U): 1 - mask at the patch grid, higher = more important
        order = torch.argsort(-low_imp, dim=1, stable=True)
        need = [self.threshold * float(f) for f in full]
        cand = [order[b, : min(self.candidates, U)].tolist() for b in range(B)]

        # 2. beam search, all images together
        beams: list[list[tuple[int, ...]]] = [[()] for _ in range(B)]
        found: list[dict[tuple[int, ...], float]] = [{} for _ in range(B)]
        seen: list[set] = [set() for _ in range(B)]
        for _ in range(min(self.max_patches, U)):
            children = []
            for b in range(B):
                kids = []
                for state in beams[b]:
                    for p in cand[b]:
                        if p in state:
                            continue
                        k = _key(state + (p,))
                        if k in seen[b] or any(set(f) <= set(k) for f in found[b]):
                            continue
                        seen[b].add(k)
                        kids.append(k)
                children.append(kids)
            if not any(children):
                break
            scores = self._score_sets(session, x, resolved, children, grid)
            for b in range(B):
                ranked = []
                for k, s in zip(children[b], scores[b]):
                    if s >= need[b]:
                        found[b][k] = s
                    else:
                        ranked.append((s, k))
                ranked.sort(key=lambda t: -t[0])
                beams[b] = [k for _, k in ranked[: self.beam_width]]
            if not any(beams):
                break

        # 3. diverse minimal roots, 4. the graph
        graphs = []
        level_sets: list[list[tuple[int, ...]]] = []
        for b in range(B):
            minimal = {k: s for k, s in found[b].items() if not any(set(o) < set(k) for o in found[b])}
            ranked = sorted(minimal.items(), key=lambda t: (len(t[0]), -t[1], t[0]))
            roots = []
            for k, s in ranked:
                if len(roots) >= self.roots:
                    break
                if all(len(set(k) & set(r)) <= self.max_overlap * min(len(k), len(r)) for r, _ in roots):
                    roots.append((k, s))
            t = None if resolved.classes is None else int(resolved.classes[b])
            g = AttentionGraph(grid, (H, W), t, float(full[b]), float(self.threshold),
                               sufficient_sets=[list(k) for k, _ in ranked], order=order[b].tolist())
            ids = {}
            for k, s in roots:
                ids[k] = len(g.nodes)
                g.nodes.append({"id": ids[k], "patches": list(k), "score": s, "root": True,
                                "sufficient": s >= need[b], "level": 0})
            graphs.append((g, ids))
            level_sets.append([k for k, _ in roots])
        for level in range(1, self.depth + 1):
            todo = []
            for b, (g, ids) in enumerate(graphs):
                kids = []
                for parent in level_sets[b]:
                    for p in parent:
                        k = _key(q for q in parent if q != p)
                        if len(k) and k not in ids and k not in kids:
                            kids.append(k)
                todo.append(kids)
            scores = self._score_sets(session, x, resolved, todo, grid)
            for b, (g, ids) in enumerate(graphs):
                for k, s in zip(todo[b], scores[b]):
                    ids[k] = len(g.nodes)
                    g.nodes.append({"id": ids[k], "patches": list(k), "score": s, "root": False,
                                    "sufficient": s >= need[b], "level": level})
                for parent in level_sets[b]:
                    for p in parent:
                        k = _key(q for q in parent if q != p)
                        if k in ids and ids[k] != ids[parent]:
                            g.edges.append({"parent": ids[parent], "child": ids[k], "removed": int(p)})
                level_sets[b] = todo[b]
        graphs = [g for g, _ in graphs]

        # the map: share of roots containing each patch, tie-broken by the coarse I-GOS importance
        share = torch.zeros(B, U, dtype=x.dtype, device=x.device)
        for b, g in enumerate(graphs):
            for r in g.roots:
                share[b, r["patches"]] += 1.0 / max(len(g.roots), 1)
        tie = low_imp / low_imp.abs().amax(1, keepdim=True).clamp_min(1e-12)
        low = (share + 1e-3 * tie).view(B, 1, *grid)
        return Explanation(maps=fit_masks(low, (H, W)), targets=resolved.classes, outputs=outputs, lowres=low[:, 0],
                           extras={"graphs": graphs, "roots": [[r["patches"] for r in g.roots] for g in graphs],
                                   "igos": coarse.maps, "igos_mask": coarse.extras["mask"]})
