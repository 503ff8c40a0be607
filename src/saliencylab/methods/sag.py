"""Structured attention graphs (Shitole et al. 2021): several minimal explanations and how they degrade.

Ported from the semantics of the authors' code, viv92/structured-attention-graphs (NeurIPS'21 release,
`main_generate_sag.py` and the functions it calls); no code copied. "Probability" is the softmax
probability of the target, p(S), of the image with the patches of S revealed and the rest replaced by
the baseline; "relative" is p(S) / p(full image).

1. Ordering (`get_perturbation_mask.Integrated_Mask`): a coarse I-GOS mask, `size` x `size` (7x7),
   2 iterations of 20 path points, L1 1, TV 20, largest step 200, black baseline; patches are ranked
   by it (low mask = important). It runs through I-GOS's public `explain` with this call's image ids.
2. Patch masks (`search.get_mask_insertion_prob`): a set S is a binary `size` x `size` grid upsampled
   *bilinearly* (align_corners=True, torch's UpsamplingBilinear2d) to the image: x * M + b * (1 - M)
   with the black image b (`baseline="black"`: 0 in pixel space, i.e. -mean/std in the model's input
   space; `normalization="auto"` knows the embedded EfficientNet-Lite0's, else takes the ImageNet
   normalization of the authors' VGG-19; give `(mean, std)` or a `LoadedModel` for another model).
3. Beam search (`search.beamSearch_topKSuccessors_roots`): from the empty set, every beam state
   grows by each of its `candidates` (15) best *remaining* patches (`beamSearch_get_successor_indices`:
   the ranking without the state's own patches). All successors are sorted by p (stable); those with
   p > `threshold` (0.9) x p(full) become roots, the others fill the next beam. The authors' loop
   (`beamSearch_get_topk_masks_roots`) appends before testing `len > beam_width`, so it keeps
   `beam_width + 1` states, and never merges a set reached from two states: `beam="authors"` (default)
   reproduces both; `beam="distinct"` keeps `beam_width` distinct states. The search stops when the
   beam is empty, after `max_patches` (49) steps, or once more than `max_found` (10) roots were found.
4. Minimal roots (`search.remove_extra_patches`): every sufficient successor is pruned greedily: in
   ascending patch order, a patch is dropped if p stays > threshold x p(full); passes repeat until one
   drops nothing. So removing any one patch of a root drops p to <= the threshold. A root already
   found is not added again; roots keep their discovery order and their pruned p.
5. Diverse roots (`diverse_subset_selection.maximal_overlapThresh_set`): the largest set of roots that
   pairwise share at most `max_overlap` (1) patches, the first such set in discovery order (the
   authors' depth-first search; ours is an exact branch-and-bound with the same answer); the first
   `roots` (3) of it are shown (`num_roots_sag`).
6. The graph (`patch_deletion_tree.build_tree`): a node whose relative probability is >
   `node_threshold` (0.4) gets children that each remove one patch: the node's first `max_children`
   (3) patches in ascending index order (`get_subconjuncts`); single patches have no children.

Deliberate differences (and the option that restores the authors' behaviour where there is one):
- Nodes: the authors draw a tree in which a set reached along two paths appears twice; we merge
  equal sets into one node (a DAG, as in the paper) with an edge from every parent. The edges
  (parent set, child set, patch removed) are the same.
- Node expansion compares relative p > 0.4 exactly; the authors compare the displayed whole percent
  (int(100 * round(p, 3)) > 40, i.e. about >= 41%).
- Every distinct set is scored once per image (cached): the authors rescore repeated sets (duplicate
  successors, the roots again in the tree), so for one image our pass count is at most theirs; the
  scores are the same. With several images, each step pads every image to the largest number of new
  sets of that step (padding rows are scored too), so a batch can cost more passes than one image at a
  time.
- The passes are batched: all successors of all beam states of all images of a step in one
  Perturber call (then chunked by `batch_size`), the greedy pruning of all pending roots in lockstep
  (one patch test per root per call, the authors' sequential order), the graph one level at a time.
- `depth` caps the graph's levels (None, default: unbounded as the authors).
- The coarse I-GOS is ours (`igos.py`: keyed noise, its own line-search schedule; `igos={...}` passes
  extra I-GOS parameters, e.g. {"line_search": "authors"}).
- Ties in the coarse I-GOS mask (patches it did not move) rank by patch index (a stable sort); the
  authors' `np.argsort` (quicksort) leaves their order unspecified.
- The target: the authors explain the top-1 class; any target works here, p(full) is its probability.
- An image with no root keeps an empty graph (the authors skip it).

Cost, measured (EfficientNet-Lite0, the bundled chelsea and coffee photos, defaults): 2334 forward
images and 80 backward for the two (the coarse I-GOS's gradient passes, 40 per image), 13 and 12 roots
found, one diverse root each (their roots of 11 and 7 patches share more than one patch).

The map (Explanation.maps): the sum of the shown roots' bilinear patch masks (what the search scored),
plus 1e-3 x the normalized coarse I-GOS importance so that pixels outside every root are still ranked;
lowres is the same at the patch grid (count of shown roots containing the patch + tie-break). An image
with no root gets the I-GOS importance alone.

extras:
- "graphs": one `AttentionGraph` per image (`to_json`, `draw`): nodes {"id", "patches" (ascending
  patch indices r * grid[1] + c), "score" (p), "relative", "root", "sufficient" (p > threshold x
  p(full)), "expanded", "level"}, edges {"parent", "child", "removed"}, `found` (every root of the
  search, discovery order, {"patches", "score", "relative"}), `diverse` (indices into `found` of the
  maximum low-overlap set; its first `roots` entries are the graph's roots), `order` (the ranking).
- "roots": per image, the shown roots as {"patches", "score", "relative"}.
- "igos" (B, H, W) the coarse I-GOS importance and "igos_mask" (B, h, w) its keep-mask.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from ..baselines import Tensor, baseline_images, make_baseline
from ..core.errors import ConfigError
from ..core.explanation import Explanation
from ..perturbation import Perturber, check_normalization, fit_masks
from .base import Method, Param, check_batch_size, clean_outputs, register
from .igos import IGOS, igos_baseline

UPSAMPLES = ("bilinear", "nearest")
BEAMS = ("authors", "distinct")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def black(normalization, model=None) -> torch.Tensor:
    """The black image (0 in pixel space) in the model's input space, (1, C, 1, 1): -mean / std.

    normalization: "auto" (the embedded EfficientNet-Lite0's when `model` is it, else ImageNet's, the
    authors' VGG-19 preprocessing), (mean, std), an object with `mean` and `std` (a `models.LoadedModel`),
    or "none"/None (inputs in pixel units: black = 0)."""
    wrong = ConfigError(f"normalization must be 'auto', 'none', (mean, std) or a model bundle, got {normalization!r}")
    if normalization is None or (isinstance(normalization, str) and normalization == "none"):
        return torch.zeros(1, 1, 1, 1)
    if isinstance(normalization, str):
        if normalization != "auto":
            raise wrong
        from ..models import LITE_MEAN, LITE_STD
        from ..models.efficientnet_lite import EfficientNetLite

        mean, std = (LITE_MEAN, LITE_STD) if isinstance(model, EfficientNetLite) else (IMAGENET_MEAN, IMAGENET_STD)
    elif hasattr(normalization, "mean") and hasattr(normalization, "std") and not isinstance(normalization, tuple):
        mean, std = normalization.mean, normalization.std
    elif isinstance(normalization, (tuple, list)) and len(normalization) == 2:
        mean, std = normalization
    else:
        raise wrong
    mean, std = check_normalization(mean, std)
    return (-torch.tensor(mean, dtype=torch.float64) / torch.tensor(std, dtype=torch.float64)).float().view(1, -1, 1, 1)


def grid_masks(low: torch.Tensor, size, upsample: str = "bilinear") -> torch.Tensor:
    """(N, 1, h, w) binary patch grids -> (N, 1, H, W) keep-masks: bilinear with align_corners=True (the
    authors' UpsamplingBilinear2d), or nearest tiles."""
    if upsample == "nearest":
        return fit_masks(low, size)
    if tuple(low.shape[-2:]) == tuple(size):
        return low
    return F.interpolate(low, size=tuple(size), mode="bilinear", align_corners=True)


@dataclass
class AttentionGraph:
    """One image's structured attention graph. Patches are indices r * grid[1] + c."""

    grid: tuple[int, int]
    image_size: tuple[int, int]
    target: int | None
    full_score: float
    threshold: float
    nodes: list[dict] = field(default_factory=list)  # see the module docstring
    edges: list[dict] = field(default_factory=list)  # {"parent", "child", "removed"}
    sufficient_sets: list[list[int]] = field(default_factory=list)  # every root the search found
    order: list[int] = field(default_factory=list)  # patches by coarse I-GOS importance
    found: list[dict] = field(default_factory=list)  # {"patches", "score", "relative"}, discovery order
    diverse: list[int] = field(default_factory=list)  # indices into `found`: the maximum low-overlap set
    upsample: str = "bilinear"
    node_threshold: float = 0.4

    @property
    def roots(self) -> list[dict]:
        return [n for n in self.nodes if n["root"]]

    def children(self, node_id: int) -> list[dict]:
        ids = [e["child"] for e in self.edges if e["parent"] == node_id]
        return [self.nodes[i] for i in ids]

    def to_dict(self) -> dict:
        return {"grid": list(self.grid), "image_size": list(self.image_size), "target": self.target,
                "full_score": self.full_score, "threshold": self.threshold, "order": self.order,
                "sufficient_sets": self.sufficient_sets, "found": self.found, "diverse": self.diverse,
                "upsample": self.upsample, "node_threshold": self.node_threshold,
                "nodes": self.nodes, "edges": self.edges}

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
                   d["nodes"], d["edges"], d["sufficient_sets"], d["order"], d.get("found", []),
                   d.get("diverse", []), d.get("upsample", "nearest"), d.get("node_threshold", 0.4))

    def patch_mask(self, patches) -> torch.Tensor:
        """(H, W) keep-mask revealing the given patches (upsampled as the search did)."""
        low = torch.zeros(1, 1, *self.grid)
        for p in patches:
            low.view(-1)[p] = 1
        return grid_masks(low, self.image_size, self.upsample)[0, 0]

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


def max_low_overlap_set(sets: list[tuple[int, ...]], max_overlap: int) -> list[int]:
    """Indices of the largest subset of `sets` whose members pairwise share <= max_overlap elements;
    among the largest, the lexicographically first in index order (what the authors' depth-first
    `maximal_overlapThresh_set` returns). Exact branch and bound: a branch that cannot beat the best
    size found so far is cut, which never cuts a lexicographically earlier set of the best size."""
    n = len(sets)
    ok = [[len(set(a) & set(b)) <= max_overlap for b in sets] for a in sets]
    best: list[int] = []

    def grow(chosen: list[int], rest: list[int]):
        nonlocal best
        if len(chosen) > len(best):
            best = list(chosen)
        for pos, j in enumerate(rest):
            if len(chosen) + len(rest) - pos <= len(best):
                return
            grow(chosen + [j], [k for k in rest[pos + 1:] if ok[j][k]])

    grow([], list(range(n)))
    return best


@register
class StructuredAttentionGraph(Method):
    name = "structured_attention_graph"
    description = "SAG: diverse minimal patch sets that keep the probability (beam search on coarse I-GOS), as a graph."
    stochastic = True  # the coarse I-GOS's path-point noise (keyed to the images)
    uses_gradients = True  # the coarse I-GOS
    revision = 1  # 1: the authors' search, pruning, diverse roots and graph (issue 13)

    size = Param(7, "patch grid side (and the coarse I-GOS mask's)")
    iterations = Param(2, "coarse I-GOS iterations")
    steps = Param(20, "coarse I-GOS path points")
    threshold = Param(0.9, "a set is sufficient when p > threshold x p(full image)")
    beam_width = Param(3, "beam width (the authors keep beam_width + 1 states, see beam)")
    beam = Param("authors", "'authors' (beam_width + 1 states, repeats kept) or 'distinct'")
    candidates = Param(15, "best remaining patches each beam state grows by")
    max_patches = Param(None, "beam steps, i.e. largest set searched (None: every patch)")
    max_found = Param(10, "the search stops once more than this many roots are found (None: never)")
    roots = Param(3, "roots shown (the first of the diverse set)")
    max_overlap = Param(1, "most patches two diverse roots may share")
    node_threshold = Param(0.4, "a node gets children while its relative probability is above this")
    max_children = Param(3, "children per node (the node's first patches, ascending; None: all)")
    depth = Param(None, "graph levels below the roots (None: until single patches or the node threshold)")
    upsample = Param("bilinear", "patch masks: 'bilinear' (align_corners=True, the authors') or 'nearest' tiles")
    baseline = Param("black", "what hidden patches become: 'black' (-mean/std), None (the I-GOS blur), any baseline")
    normalization = Param("auto", "the model's input normalization, for baseline='black': 'auto' (the embedded "
                                  "model's, else ImageNet's), (mean, std), a model bundle, or 'none' (black = 0)")
    igos = Param(None, "extra coarse I-GOS parameters (dict), e.g. {'line_search': 'authors'}")
    score = Param("softmax", "score explained: 'softmax' (the authors'), 'logit' or 'log_softmax'")
    seed = Param(0, "coarse I-GOS noise seed")
    batch_size = Param(10, "rows per pass (None: picked for the device)")

    def check(self):
        for key in ("size", "iterations", "steps", "beam_width", "candidates", "roots"):
            v = getattr(self, key)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ConfigError(f"{key} must be a positive int, got {v!r}")
        for key, low in (("max_patches", 1), ("max_found", 0), ("max_children", 1), ("depth", 0)):
            v = getattr(self, key)
            if v is not None and (not isinstance(v, int) or isinstance(v, bool) or v < low):
                raise ConfigError(f"{key} must be None or an int >= {low}, got {v!r}")
        if not isinstance(self.max_overlap, int) or isinstance(self.max_overlap, bool) or self.max_overlap < 0:
            raise ConfigError(f"max_overlap must be a number of patches (int >= 0), got {self.max_overlap!r}")
        if not 0 < self.threshold <= 1:
            raise ConfigError(f"threshold must be in (0, 1], got {self.threshold!r}")
        if not 0 <= self.node_threshold < float("inf"):
            raise ConfigError(f"node_threshold must be >= 0, got {self.node_threshold!r}")
        if self.upsample not in UPSAMPLES:
            raise ConfigError(f"unknown upsample {self.upsample!r}; choose one of {', '.join(UPSAMPLES)}")
        if self.beam not in BEAMS:
            raise ConfigError(f"unknown beam {self.beam!r}; choose one of {', '.join(BEAMS)}")
        if self.igos is not None and not isinstance(self.igos, dict):
            raise ConfigError(f"igos must be a dict of I-GOS parameters, got {self.igos!r}")
        if self.batch_size is not None:
            check_batch_size(self.batch_size)
        if isinstance(self.baseline, str) and self.baseline == "black":
            self._base = Tensor(black(self.normalization, self.model))
        elif self.baseline is None:
            self._base = igos_baseline()
        else:
            self._base = make_baseline(self.baseline)

    # -- scoring sets of patches -------------------------------------------------------------
    def _score(self, session, x, target, base, grid, cache: list[dict], wanted: list[list[tuple]]) -> None:
        """Score every set of wanted[b] not yet in cache[b], all images in one Perturber call; fill cache."""
        todo = [[k for k in dict.fromkeys(w) if k not in cache[b]] for b, w in enumerate(wanted)]
        active = [b for b, t in enumerate(todo) if t]
        if not active:
            return
        n = max(len(todo[b]) for b in active)
        h, w = grid
        low = torch.zeros(len(active), n, h * w, dtype=x.dtype, device=x.device)
        for i, b in enumerate(active):
            for k, s in enumerate(todo[b]):
                low[i, k, list(s)] = 1
        low = low.view(len(active), n, 1, h, w)
        size, mode = x.shape[-2:], self.upsample
        idx = torch.tensor(active, device=x.device)
        # the images still searching only (padding rows, if any, only up to the longest list)
        perturber = Perturber(Tensor(base[idx]), self.score, self.batch_size)
        scores = perturber.scores(session, x[idx], target.for_images(idx), n,
                                  lambda image, k: grid_masks(low[image, k], size, mode), desc=self.name)
        for i, b in enumerate(active):
            for k, s in enumerate(todo[b]):
                cache[b][s] = float(scores[i, k])

    @staticmethod
    def _prune(score, cache, need, sets: list[list[tuple]]) -> list[dict]:
        """The authors' `remove_extra_patches` for every set: in ascending patch order drop a patch while
        p stays > need; repeat passes until one drops nothing. All sets of all images advance one test
        per call (the same sequential order as the authors', batched). Returns {set: pruned set} per image."""
        jobs = []  # [image, start, current, pass patches, position, dropped in this pass]
        for b, ss in enumerate(sets):
            for k in dict.fromkeys(ss):
                jobs.append([b, k, k, list(k), 0, False])
        while True:
            for j in jobs:  # finish passes and jobs
                while j[4] >= len(j[3]) and j[5]:
                    j[3], j[4], j[5] = list(j[2]), 0, False
            pending = [j for j in jobs if j[4] < len(j[3])]
            if not pending:
                break
            wanted = [[] for _ in sets]
            for j in pending:
                wanted[j[0]].append(tuple(q for q in j[2] if q != j[3][j[4]]))
            score(wanted)
            for j in pending:
                trial = tuple(q for q in j[2] if q != j[3][j[4]])
                if cache[j[0]][trial] > need[j[0]]:
                    j[2], j[5] = trial, True
                j[4] += 1
        out = [{} for _ in sets]
        for j in jobs:
            out[j[0]][j[1]] = j[2]
        return out

    def _build_graphs(self, score, cache, need, full, graphs: list[AttentionGraph], kept: list[list[tuple]]):
        """The authors' `build_tree` (see the module docstring), one level of all images per call; equal
        sets are one node."""
        ids: list[dict] = [{} for _ in graphs]

        def add(b, k, level, root):
            g, s = graphs[b], cache[b][k]
            ids[b][k] = len(g.nodes)
            g.nodes.append({"id": ids[b][k], "patches": list(k), "score": s, "relative": s / max(float(full[b]), 1e-30),
                            "root": root, "sufficient": s > need[b], "expanded": False, "level": level})

        frontier = [[] for _ in graphs]
        for b, roots in enumerate(kept):
            for k in roots:
                add(b, k, 0, True)
                frontier[b].append(k)
        level = 0
        while any(frontier) and (self.depth is None or level < self.depth):
            level += 1
            plans = [[] for _ in graphs]  # (parent, child, removed)
            for b, g in enumerate(graphs):
                for k in frontier[b]:
                    node = g.nodes[ids[b][k]]
                    if len(k) < 2 or not node["relative"] > self.node_threshold:
                        continue
                    node["expanded"] = True
                    first = k if self.max_children is None else k[: self.max_children]
                    plans[b] += [(k, tuple(q for q in k if q != p), p) for p in first]
            score([[c for _, c, _ in plan] for plan in plans])
            frontier = [[] for _ in graphs]
            for b, g in enumerate(graphs):
                for parent, child, removed in plans[b]:
                    if child not in ids[b]:
                        add(b, child, level, False)
                        frontier[b].append(child)
                    g.edges.append({"parent": ids[b][parent], "child": ids[b][child], "removed": int(removed)})

    @staticmethod
    def _entry(k, s, full) -> dict:
        return {"patches": list(k), "score": s, "relative": s / max(full, 1e-30)}

    def compute(self, session, x, target):
        resolved, outputs = clean_outputs(session, x, target)
        full = resolved.with_score(self.score)(outputs).detach()
        B, _, H, W = x.shape
        grid = (min(self.size, H), min(self.size, W))
        U = grid[0] * grid[1]
        base = baseline_images(self._base, x, session)
        # 1. coarse I-GOS ordering, through its public path (same ids: same noise keys); its passes
        # are added to this call's cost
        options = {"alpha": 200.0, **(self.igos or {})}
        classes = target if resolved.classes is None else resolved.classes
        igos = IGOS(self.model, size=self.size, steps=self.steps, iterations=self.iterations, baseline=self._base,
                    score=self.score, seed=self.seed, batch_size=self.batch_size, **options)
        coarse = igos.explain(x, classes, image_ids=session.image_ids)
        session.charge(coarse.cost)
        low_imp = coarse.lowres.reshape(B, -1).to(x.dtype)  # 1 - mask: higher = more important
        order = torch.argsort(-low_imp, dim=1, stable=True).tolist()
        need = [self.threshold * float(f) for f in full]
        cache: list[dict] = [{} for _ in range(B)]

        def score(wanted):
            self._score(session, x, resolved, base, grid, cache, wanted)

        # 2.-4. beam search with greedy pruning of every sufficient successor, all images together
        found: list[list[tuple]] = [[] for _ in range(B)]
        beams: list[list[tuple]] = [[()] for _ in range(B)]
        live = [True] * B
        steps = U if self.max_patches is None else min(self.max_patches, U)
        for _ in range(steps):
            succ = [[] for _ in range(B)]
            for b in range(B):
                if not live[b]:
                    continue
                for state in beams[b]:
                    rest = [p for p in order[b] if p not in state][: self.candidates]
                    succ[b] += [_key(state + (p,)) for p in rest]
                if not succ[b]:
                    live[b] = False
            if not any(live):
                break
            score(succ)
            prune = [[] for _ in range(B)]
            for b in range(B):
                if not live[b]:
                    continue
                ranked = sorted(succ[b], key=lambda k: -cache[b][k])  # stable: ties keep generation order
                good = [k for k in ranked if cache[b][k] > need[b]]
                bad = [k for k in ranked if cache[b][k] <= need[b]]
                if self.beam == "distinct":
                    bad = list(dict.fromkeys(bad))
                    beams[b] = bad[: self.beam_width]
                else:
                    beams[b] = bad[: self.beam_width + 1]
                prune[b] = good
            pruned = self._prune(score, cache, need, prune)
            for b in range(B):
                for k in prune[b]:
                    r = pruned[b][k]
                    if r not in found[b]:
                        found[b].append(r)
                if self.max_found is not None and len(found[b]) > self.max_found:
                    live[b] = False
            if not any(live):
                break

        # 5. diverse roots, 6. the graph
        graphs, kept = [], []
        for b in range(B):
            diverse = max_low_overlap_set(found[b], self.max_overlap)
            kept.append([found[b][i] for i in diverse[: self.roots]])
            t = None if resolved.classes is None else int(resolved.classes[b])
            fb = float(full[b])
            g = AttentionGraph(grid, (H, W), t, fb, float(self.threshold), order=list(order[b]),
                               sufficient_sets=[list(k) for k in found[b]],
                               found=[self._entry(k, cache[b][k], fb) for k in found[b]], diverse=diverse,
                               upsample=self.upsample, node_threshold=float(self.node_threshold))
            graphs.append(g)
        self._build_graphs(score, cache, need, full, graphs, kept)

        # the map: shown roots' patch masks summed, I-GOS importance as a small tie-break
        counts = torch.zeros(B, U, dtype=x.dtype, device=x.device)
        for b, roots in enumerate(kept):
            for r in roots:
                counts[b, list(r)] += 1.0
        tie = low_imp / low_imp.abs().amax(1, keepdim=True).clamp_min(1e-12)
        low = (counts + 1e-3 * tie).view(B, 1, *grid)
        return Explanation(maps=grid_masks(low, (H, W), self.upsample)[:, 0], targets=resolved.classes,
                           outputs=outputs, lowres=low[:, 0],
                           extras={"graphs": graphs,
                                   "roots": [[self._entry(r, cache[b][r], float(full[b])) for r in roots]
                                             for b, roots in enumerate(kept)],
                                   "igos": coarse.maps, "igos_mask": coarse.extras["mask"]})
