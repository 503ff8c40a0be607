"""SAG against a small port of the authors' semantics (viv92/structured-attention-graphs, NeurIPS'21
release: search.py, diverse_subset_selection.py, patch_deletion_tree.py), written here from their
description, one set per forward pass and one image at a time, with no batching:

- p(S): softmax probability of the target for x * M + black * (1 - M), M the binary 7x7 grid of S
  upsampled bilinearly with align_corners=True;
- beam search: each beam state grows by its 15 best *remaining* patches (ranked by the coarse I-GOS
  mask, low = important); successors sorted by p (stable); p > 0.9 p(full) -> greedy pruning (ascending
  patch order, repeated passes) to a root, added unless already found; the others are appended to the
  next beam until it holds more than beam_width states; stop once more than 10 roots are found;
- diverse roots: the authors' depth-first search for the largest set of roots pairwise sharing <= 1
  patch (first found in discovery order), the first 3 shown;
- the graph: recursive deletion of each of a node's first 3 patches while its p / p(full) > 0.4.

The ordering itself comes from the method's own coarse I-GOS (its `igos_mask` extra), so this
compares everything downstream of it."""

import itertools

import pytest
import torch
import torch.nn.functional as F

from saliencylab.methods import build
from saliencylab.methods.igos import IGOS
from zoo import ColourNet


pytestmark = pytest.mark.usefixtures("one_thread")


RED, GREEN = (1.0, -1.0, -1.0), (-1.0, 1.0, -1.0)


def colour_patches(n=2, seed=0, red=6, green=3):
    """28x28 black images with 4x4 red and green squares on random cells of the 7x7 grid."""
    g = torch.Generator().manual_seed(seed)
    x = torch.zeros(n, 3, 28, 28, dtype=torch.float64)
    for b in range(n):
        for colour, count in ((RED, red), (GREEN, green)):
            for _ in range(count):
                r, c = torch.randint(0, 7, (2,), generator=g).tolist()
                x[b, :, 4 * r:4 * r + 4, 4 * c:4 * c + 4] = torch.tensor(colour, dtype=torch.float64)[:, None, None]
    return x


class Port:
    """The authors' algorithm for one image (see the module docstring)."""

    def __init__(self, model, x, cls, ref_mask, *, grid=7, candidates=15, beam_width=3, threshold=0.9,
                 max_found=10, overlap=1, n_roots=3, node_threshold=0.4, children=3):
        self.model, self.x, self.cls, self.grid = model, x, cls, grid
        self.base = torch.zeros_like(x)  # black with mean 0, std 1
        self.rank = torch.argsort(ref_mask.flatten(), stable=True).tolist()
        self.q, self.k, self.t, self.max_found = candidates, beam_width, threshold, max_found
        self.overlap, self.n_roots, self.node_t, self.children = overlap, n_roots, node_threshold, children
        self.pruned = 0  # roots that pruning made smaller
        self.passes = 0
        self.memo = {}
        self.full = self.p(None)

    def p(self, patches):
        key = None if patches is None else tuple(sorted(patches))
        if key not in self.memo:  # the model is deterministic: a memo only saves time
            self.memo[key] = self._p(patches)
        return self.memo[key]

    def _p(self, patches):
        self.passes += 1
        if patches is None:
            inp = self.x[None]
        else:
            low = torch.zeros(1, 1, self.grid * self.grid, dtype=self.x.dtype)
            low[0, 0, list(patches)] = 1
            m = F.interpolate(low.view(1, 1, self.grid, self.grid), size=self.x.shape[-2:], mode="bilinear",
                              align_corners=True)
            inp = self.x[None] * m + self.base[None] * (1 - m)
        with torch.no_grad():
            return float(self.model(inp).softmax(1)[0, self.cls])

    def prune(self, s, p):
        s = list(s)
        changed = True
        while changed:
            changed = False
            for patch in list(s):  # this pass's patches, ascending; s shrinks as it goes
                trial = [q for q in s if q != patch]
                pt = self.p(trial)
                if pt > self.t * self.full:
                    s, p, changed = trial, pt, True
        return tuple(s), p

    def search(self):
        roots, beam = [], [()]
        for _ in range(self.grid * self.grid):
            succ = []
            for state in beam:
                for patch in [q for q in self.rank if q not in state][: self.q]:
                    s = tuple(sorted(state + (patch,)))
                    succ.append((s, self.p(s)))
            if not succ:
                break
            succ.sort(key=lambda t: -t[1])
            beam = []
            for s, p in succ:
                if p > self.t * self.full:
                    r, pr = self.prune(s, p)
                    self.pruned += len(r) < len(s)
                    if r not in [q for q, _ in roots]:
                        roots.append((r, pr))
                else:
                    beam.append(s)
                    if len(beam) > self.k:
                        break
            if len(roots) > self.max_found:
                break
        return roots

    def diverse(self, roots):
        n = len(roots)
        shared = [[len(set(a) & set(b)) for b, _ in roots] for a, _ in roots]

        def dfs(ref):
            best = ref
            for j in range(ref[-1] + 1, n):
                if all(shared[j][k] <= self.overlap for k in ref):
                    cand = dfs(ref + [j])
                    if len(cand) > len(best):
                        best = cand
            return best

        best = []
        for i in range(n):
            cand = dfs([i])
            if len(cand) > len(best):
                best = cand
        return best

    def tree(self, roots):
        nodes, edges = {}, set()

        def visit(conj, parent, removed):
            rel = self.p(conj) / self.full
            nodes[conj] = rel
            if parent is not None:
                edges.add((parent, conj, removed))
            if rel > self.node_t and len(conj) > 1:
                for i in range(min(self.children, len(conj))):
                    visit(tuple(q for q in conj if q != conj[i]), conj, conj[i])

        for r in roots:
            visit(r, None, None)
        return nodes, edges


def run_both(x, scale=30.0, **params):
    model = ColourNet(scale=scale).double().eval()
    e = build("structured_attention_graph", model, normalization="none", steps=5, **params).explain(x)
    ports = []
    for b in range(x.shape[0]):
        port = Port(model, x[b], int(e.targets[b]), e.extras["igos_mask"][b],
                    beam_width=params.get("beam_width", 3), candidates=params.get("candidates", 15))
        ports.append(port)
    return e, ports


@pytest.mark.parametrize("scale", [30.0, 12.0])  # at 12, roots of 4 patches: the 3-children rule binds
def test_search_roots_diversity_and_graph_match_the_port(scale):
    x = colour_patches(2 if scale == 30.0 else 1)
    e, ports = run_both(x, scale)
    pruned = 0
    for b, (g, port) in enumerate(zip(e.extras["graphs"], ports)):
        roots = port.search()
        pruned += port.pruned
        assert [tuple(f["patches"]) for f in g.found] == [r for r, _ in roots]  # same roots, same order
        assert [f["score"] for f in g.found] == pytest.approx([p for _, p in roots], rel=1e-9)
        assert g.diverse == port.diverse(roots)
        shown = [roots[i][0] for i in g.diverse[:3]]
        assert [tuple(r["patches"]) for r in e.extras["roots"][b]] == shown
        nodes, edges = port.tree(shown)
        ours = {tuple(n["patches"]): n for n in g.nodes}
        assert set(ours) == set(nodes)
        for k, rel in nodes.items():
            assert ours[k]["relative"] == pytest.approx(rel, rel=1e-9)
        assert {(tuple(g.nodes[d["parent"]]["patches"]), tuple(g.nodes[d["child"]]["patches"]), d["removed"])
                for d in g.edges} == edges
        assert len(g.found) > 3 and max(len(r) for r in shown) >= 2
        if scale == 12.0:
            assert max(len(r) for r in shown) >= 4
            # one image: every pass is the clean image, the coarse I-GOS's, or a distinct set the port scored
            igos = IGOS(ColourNet(scale=scale).double().eval(), size=7, steps=5, iterations=2, alpha=200.0,
                        baseline=torch.zeros(1, 3, 1, 1)).explain(x, target=e.targets)
            assert e.cost.forward_images == igos.cost.forward_images + port.passes
        else:
            assert len(g.diverse) > 1
    assert pruned > 0  # the pruning step was exercised


def test_authors_beam_keeps_one_more_state_and_repeats():
    """beam='authors' (their loop appends, then tests len > beam_width) vs 'distinct': with beam_width=1
    the authors' beam holds two states, which the port reproduces."""
    x = colour_patches(1, seed=3, red=8, green=4)
    e, (port,) = run_both(x, beam_width=1, candidates=4)
    roots = port.search()
    assert [tuple(f["patches"]) for f in e.extras["graphs"][0].found] == [r for r, _ in roots]
    distinct = build("structured_attention_graph", ColourNet(scale=30.0).double().eval(), normalization="none",
                     steps=5, beam_width=1, candidates=4, beam="distinct").explain(x)
    assert distinct.cost.forward_images < e.cost.forward_images  # one state per step, not two


def test_every_root_is_minimal_and_the_map_sums_the_shown_roots():
    x = colour_patches(2, seed=1)
    e, ports = run_both(x)
    for b, (g, port) in enumerate(zip(e.extras["graphs"], ports)):
        need = 0.9 * port.full
        assert g.full_score == pytest.approx(port.full, rel=1e-9)
        for f in g.found:
            assert port.p(f["patches"]) > need
            for patch in f["patches"]:  # removing any one patch breaks it
                assert port.p([q for q in f["patches"] if q != patch]) <= need
        # the map: the shown roots' bilinear masks summed, plus a 1e-3 tie-break
        total = torch.zeros(28, 28, dtype=torch.float64)
        for r in e.extras["roots"][b]:
            total += g.patch_mask(r["patches"]).double()
        assert (e.maps[b] - total).abs().max() <= 1e-3 + 1e-9
        assert (e.maps[b] - total).abs().max() > 0  # the tie-break is there


def test_diverse_set_is_the_first_largest_low_overlap_set():
    x = colour_patches(2)
    e, _ = run_both(x)
    for g in e.extras["graphs"]:
        sets = [set(f["patches"]) for f in g.found]
        ok = lambda combo: all(len(sets[i] & sets[j]) <= 1 for i, j in itertools.combinations(combo, 2))  # noqa: E731
        assert ok(g.diverse)
        size = len(g.diverse)
        assert not any(ok(c) for c in itertools.combinations(range(len(sets)), size + 1))
        assert g.diverse == list(next(c for c in itertools.combinations(range(len(sets)), size) if ok(c)))
