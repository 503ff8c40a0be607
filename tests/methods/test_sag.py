"""Structured attention graphs on designed models whose answers are known: the candidate rule, the graph
rule, baselines (black, per-image tensors), the coarse I-GOS, the pass count and batching, JSON, drawing."""

import json
import math

import pytest
import torch
from torch import nn

import saliencylab as sl
from saliencylab.core.errors import ConfigError
from saliencylab.methods import build
from saliencylab.methods.igos import IGOS
from saliencylab.methods.sag import AttentionGraph
from zoo import RegionModel


pytestmark = pytest.mark.usefixtures("one_thread")


# 43x43 images, 7x7 grid: grid point (r, c) is pixel (7r, 7c), where the bilinear (align_corners=True)
# mask of patch r * 7 + c is exactly 1 and every other patch's is 0. One bright pixel per chosen grid
# point on black: revealing a set S shows exactly its dots.
SIDE = 43
BLACK = {"normalization": "none"}  # black = 0
# The answers are found within 5 beam steps (the authors' search would go on to 49 while <= 10 roots are
# found). The coarse I-GOS without noise (the whole-image mean amplifies it) and without TV (which pulls
# the dots' neighbours along) ranks the dots first.
FAST = {"steps": 5, "max_patches": 6, "batch_size": 64, "igos": {"l2": 0.0, "noise": 0.0}}


def dots(cells, n=1, value=1.0):
    x = torch.zeros(n, 3, SIDE, SIDE, dtype=torch.float64)
    for p in cells:
        r, c = divmod(p, 7)
        x[:, 0, 7 * r, 7 * c] = value
    return x


def counting_model(per_dot, offset):
    """RegionModel over the whole image: logit_1 = per_dot * (number of dots shown) - offset, logit_0 = 0."""
    n = SIDE * SIDE
    return RegionModel(slice(None), slice(None), scale=per_dot * n, offset=offset / (per_dot * n)).double()


def sigmoid(v):
    return 1 / (1 + math.exp(-v))


def test_candidates_are_the_best_remaining_patches():
    """Three dots, all needed (p(2 dots) / p(3 dots) = 0.68): with 2 candidates, only growing each state by
    its 2 best *remaining* patches reaches the set of 3 (a fixed global top 2 never does)."""
    cells = [8, 25, 37]
    model = counting_model(1.0, 2.0)
    e = build("structured_attention_graph", model, candidates=2, **FAST, **BLACK).explain(dots(cells), target=1)
    g = e.extras["graphs"][0]
    assert set(g.order[:3]) == set(cells)  # the coarse I-GOS ranks the dots first
    assert [f["patches"] for f in g.found] == [cells]
    assert g.found[0]["relative"] == pytest.approx(1.0)
    assert e.extras["roots"] == [[{"patches": cells, "score": pytest.approx(sigmoid(1.0)),
                                   "relative": pytest.approx(1.0)}]]


def test_graph_removes_the_first_three_patches_while_above_forty_percent():
    """Five dots, all needed. Relative p of k dots: sigmoid(k - 3) / sigmoid(2): 4 -> 0.83, 3 -> 0.57,
    2 -> 0.31. Nodes of 5, 4 and 3 dots are expanded (their first 3 patches removed one at a time); nodes
    of 2 dots (<= 40%) are leaves."""
    cells = [8, 12, 25, 37, 40]
    model = counting_model(1.0, 3.0)
    e = build("structured_attention_graph", model, **FAST, **BLACK).explain(dots(cells), target=1)
    g = e.extras["graphs"][0]
    assert [f["patches"] for f in g.found] == [cells]
    full = sigmoid(2.0)
    expected_nodes, expected_edges = {}, set()

    def visit(s, level):
        expected_nodes.setdefault(s, level)
        if len(s) > 1 and sigmoid(len(s) - 3) / full > 0.4:
            for p in s[:3]:
                child = tuple(q for q in s if q != p)
                expected_edges.add((s, child, p))
                visit(child, level + 1)

    visit(tuple(cells), 0)
    nodes = {tuple(n["patches"]): n for n in g.nodes}
    assert len(nodes) == len(g.nodes) and set(nodes) == set(expected_nodes)  # one node per set
    assert {k: n["level"] for k, n in nodes.items()} == expected_nodes
    for k, n in nodes.items():
        assert n["relative"] == pytest.approx(sigmoid(len(k) - 3) / full)
        assert n["expanded"] == (len(k) > 1 and n["relative"] > 0.4)
        assert n["root"] == (len(k) == 5) and n["sufficient"] == (len(k) == 5)
    edges = {(tuple(g.nodes[d["parent"]]["patches"]), tuple(g.nodes[d["child"]]["patches"]), d["removed"])
             for d in g.edges}
    assert edges == expected_edges and len(edges) == len(g.edges)
    assert min(len(k) for k in nodes) == 2 and max(len(g.children(n["id"])) for n in g.nodes) == 3
    # depth caps the levels; max_children=None removes every patch
    capped = build("structured_attention_graph", model, depth=1, max_children=None, **FAST, **BLACK)
    g1 = capped.explain(dots(cells), target=1).extras["graphs"][0]
    assert sorted(len(n["patches"]) for n in g1.nodes) == [4] * 5 + [5]


def test_the_map_ranks_root_patches_first():
    cells = [8, 25, 37]
    e = build("structured_attention_graph", counting_model(1.0, 2.0), **FAST, **BLACK).explain(dots(cells), target=1)
    low = e.lowres.reshape(-1)
    assert set(torch.topk(low, 3).indices.tolist()) == set(cells)
    assert low[cells].min() >= 1 and low.max() <= 1 + 1e-3 + 1e-12
    r, c = divmod(cells[0], 7)
    assert float(e.maps[0, 7 * r, 7 * c]) == pytest.approx(float(low[cells[0]]))  # bilinear: exact at grid points


def test_black_is_minus_mean_over_std_and_the_default_is_imagenet():
    from types import SimpleNamespace

    from saliencylab.methods.sag import black
    from saliencylab.models.efficientnet_lite import EfficientNetLite

    model = counting_model(1.0, 2.0)
    x = dots([8, 25, 37])
    mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    imagenet = (-torch.tensor(mean) / torch.tensor(std)).double().view(1, 3, 1, 1)
    a = build("structured_attention_graph", model, **FAST).explain(x, target=1)  # auto: ImageNet's
    b = build("structured_attention_graph", model, baseline=imagenet, **FAST).explain(x, target=1)
    c = build("structured_attention_graph", model, normalization=SimpleNamespace(mean=mean, std=std), **FAST)
    assert torch.equal(a.maps, b.maps) and a.extras["roots"] == b.extras["roots"]
    assert torch.equal(a.maps, c.explain(x, target=1).maps)
    assert a.extras["roots"] != build("structured_attention_graph", model, **FAST, **BLACK).explain(
        x, target=1).extras["roots"]  # a different black: different probabilities
    # the embedded network's own normalization, (x * 255 - 127) / 128
    assert torch.allclose(black("auto", EfficientNetLite()), torch.full((1, 3, 1, 1), -127 / 128))
    assert torch.equal(black(((0.5,), (0.25,))), torch.full((1, 1, 1, 1), -2.0))


def test_per_image_baseline_tensor():
    """A (B, C, H, W) baseline: each image is explained against its own baseline, as if alone."""
    model = counting_model(1.0, 2.0)
    x = torch.cat([dots([8, 25, 37]), dots([3, 17, 30, 45])])
    base = torch.zeros_like(x)
    base[1] = 0.5 * x[1]  # image 1's baseline shows its dots at half strength: 3 of its 4 dots suffice
    e = build("structured_attention_graph", model, baseline=base, **FAST).explain(x, target=1, image_ids=["a", "b"])
    for b, key in enumerate(["a", "b"]):
        alone = build("structured_attention_graph", model, baseline=base[b:b + 1], **FAST).explain(
            x[b:b + 1], target=1, image_ids=[key])
        assert e.extras["roots"][b] == alone.extras["roots"][0]
        assert torch.allclose(e.maps[b], alone.maps[0], atol=1e-12)
        assert torch.allclose(e.extras["igos_mask"][b], alone.extras["igos_mask"][0], atol=1e-12)
    assert [f["patches"] for f in e.extras["graphs"][0].found] == [[8, 25, 37]]
    found = e.extras["graphs"][1].found  # 3 of the 4 dots, each at sigmoid(0.5 * 4 + 0.5 * 3 - 2)
    assert found and all(len(set(f["patches"]) & {3, 17, 30, 45}) == len(f["patches"]) == 3 for f in found)
    assert [f["score"] for f in found] == [pytest.approx(sigmoid(1.5))] * len(found)


def test_the_coarse_igos_is_the_public_one_with_the_same_image_ids():
    """The ordering comes from igos.explain (7x7, 2 iterations, largest step 200, black) with this call's ids."""
    model = counting_model(1.0, 2.0)
    x = torch.cat([dots([8, 25, 37]), dots([3, 17, 30])])
    ids = ["p.png", "q.png"]
    plain = {"steps": 5, "max_patches": 6, "batch_size": 64, **BLACK}  # the coarse I-GOS with its noise
    e = build("structured_attention_graph", model, **plain).explain(x, target=1, image_ids=ids)
    direct = IGOS(model, size=7, steps=5, iterations=2, alpha=200.0, baseline=torch.zeros(1, 3, 1, 1),
                  batch_size=10).explain(x, target=1, image_ids=ids)
    assert torch.allclose(e.extras["igos"], direct.maps, atol=1e-10)
    assert torch.allclose(e.extras["igos_mask"], direct.extras["mask"], atol=1e-10)
    halves = [build("structured_attention_graph", model, **plain).explain(x[j:j + 1], target=1, image_ids=ids[j:j + 1])
              for j in range(2)]
    assert torch.allclose(e.maps, torch.cat([h.maps for h in halves]), atol=1e-12)
    options = build("structured_attention_graph", model, steps=5, igos={"line_search": "authors"}, **BLACK)
    assert options.explain(x, target=1).extras["igos_mask"].shape == (2, 7, 7)


class Counting(nn.Module):
    def __init__(self, inner):
        super().__init__()
        self.inner, self.rows, self.calls = inner, 0, 0

    def forward(self, x):
        self.rows += x.shape[0]
        self.calls += 1
        return self.inner(x)


def test_passes_are_counted_and_a_beam_step_is_one_batch():
    x = torch.cat([dots([8, 25, 37]), dots([3, 17, 30, 45])])
    runs = {}
    for name, xs in (("both", x), ("first", x[:1]), ("second", x[1:])):
        model = Counting(counting_model(1.0, 2.0))
        e = sl.explain(model, xs, "structured_attention_graph", target=1, steps=5, max_patches=6, batch_size=10_000,
                       **BLACK)
        assert e.cost.forward_images == model.rows and e.cost.forward_calls == model.calls
        assert e.cost.backward_images == 2 * 5 * xs.shape[0]  # the coarse I-GOS gradient passes
        runs[name] = model.calls
    # all images' sets of a step share one pass: together, fewer calls than one after the other
    assert runs["both"] < runs["first"] + runs["second"]


def test_json_round_trip_and_drawing(tmp_path):
    cells = [8, 12, 25, 37, 40]
    g = build("structured_attention_graph", counting_model(1.0, 3.0), **FAST, **BLACK).explain(
        dots(cells), target=1).extras["graphs"][0]
    text = g.to_json(tmp_path / "sag.json")
    data = json.loads((tmp_path / "sag.json").read_text())
    assert data == json.loads(text) and data["grid"] == [7, 7] and data["target"] == 1
    assert data["upsample"] == "bilinear" and data["found"][0]["patches"] == cells
    again = AttentionGraph.from_json(text)
    assert again.nodes == g.nodes and again.edges == g.edges and again.found == g.found
    assert torch.equal(again.patch_mask([8]), g.patch_mask([8])) and float(g.patch_mask([8])[7, 7]) == 1.0
    img = dots(cells)[0].float().clamp(0, 1)
    g.draw(img, tmp_path / "sag.png")
    from PIL import Image

    with Image.open(tmp_path / "sag.png") as im:
        assert im.size[0] > 100 and im.size[1] > 100


def test_options_and_errors():
    model = counting_model(1.0, 2.0)
    x = dots([8, 25, 37])
    tiles = build("structured_attention_graph", model, steps=5, upsample="nearest", **BLACK).explain(x, target=1)
    assert tiles.maps.shape == (1, SIDE, SIDE)
    for bad in ({"max_overlap": 0.5}, {"upsample": "bicubic"}, {"beam": "wide"}, {"threshold": 1.5},
                {"max_children": 0}, {"igos": 3}, {"normalization": "imagenet"},
                {"normalization": ((0, 0), (1, 1, 1))}):
        with pytest.raises(ConfigError):
            build("structured_attention_graph", model, **bad)
