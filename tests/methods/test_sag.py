"""Structured attention graphs: the beam search finds the known minimal patch sets; JSON and drawing."""

import json

import pytest
import torch
from torch import nn

import saliencylab as sl
from saliencylab.methods import build
from saliencylab.methods.sag import AttentionGraph


@pytest.fixture(autouse=True)
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


# 16x16 images, 4x4 patches of 4x4 pixels; patch index = row * 4 + col
A, B_, C = 1, 6, 14


def patch_slices(p):
    r, c = divmod(p, 4)
    return slice(4 * r, 4 * r + 4), slice(4 * c, 4 * c + 4)


class PatchModel(nn.Module):
    """Class 1's logit = 4 (r_A + r_B) + 8 r_C - 25, r_P = mean of channel 0 over patch P.

    Revealed patches are bright (3), hidden ones blurred (about 0.6): C alone or A and B together
    keep > 90% of the full image's probability; A or B alone, or any other patch, do not. The minimal
    sufficient sets are exactly {C} and {A, B}.
    """

    def forward(self, x):
        r = {p: x[:, 0, patch_slices(p)[0], patch_slices(p)[1]].mean((1, 2)) for p in (A, B_, C)}
        logit = 4 * (r[A] + r[B_]) + 8 * r[C] - 25
        return torch.stack([torch.zeros_like(logit), logit], 1)


def patch_image(n=2):
    torch.manual_seed(0)
    x = 0.05 * torch.randn(n, 3, 16, 16, dtype=torch.float64)
    for p in (A, B_, C):
        rs, cs = patch_slices(p)
        x[:, :, rs, cs] += 3.0
    return x


def test_beam_search_finds_the_known_minimal_sets():
    model = PatchModel().double()
    x = patch_image()
    method = build("structured_attention_graph", model, size=4, steps=5, iterations=2, candidates=16,
                   max_patches=4, depth=1)
    e = method.explain(x, target=1)
    assert e.maps.shape == (2, 16, 16)
    assert e.extras["igos"].shape == (2, 16, 16) and e.extras["igos_mask"].shape == (2, 4, 4)
    assert [sorted(map(tuple, r)) for r in e.extras["roots"]] == [[(A, B_), (C,)]] * 2
    for g in e.extras["graphs"]:
        assert sorted(map(tuple, g.sufficient_sets)) == [(A, B_), (C,)]
        assert sorted(tuple(r["patches"]) for r in g.roots) == [(A, B_), (C,)]  # disjoint: both kept
        # the graph: removing A or B from {A, B} breaks it; removing C leaves the empty set (not a node)
        children = {tuple(n["patches"]): n for n in g.nodes if n["level"] == 1}
        assert set(children) == {(A,), (B_,)}
        assert not any(n["sufficient"] for n in children.values())
        assert {(e["removed"]) for e in g.edges} == {A, B_}
        full = g.full_score
        assert all(r["score"] >= 0.9 * full for r in g.roots)
    # the map ranks root patches first
    low = e.lowres.reshape(2, -1)
    top = set(torch.topk(low[0], 3).indices.tolist())
    assert top == {A, B_, C}


def test_diverse_roots_limit_overlap():
    model = PatchModel().double()
    x = patch_image(1)
    m = build("structured_attention_graph", model, size=4, steps=5, iterations=2, candidates=16, max_patches=4,
              roots=1, depth=0)
    (g,) = m.explain(x, target=1).extras["graphs"]
    assert [r["patches"] for r in g.roots] == [[C]]  # the smallest first, one root only
    assert g.edges == []


def test_json_round_trip_and_drawing(tmp_path):
    model = PatchModel().double()
    x = patch_image(1)
    m = build("structured_attention_graph", model, size=4, steps=5, iterations=2, candidates=16, max_patches=3)
    g = m.explain(x, target=1).extras["graphs"][0]
    text = g.to_json(tmp_path / "sag.json")
    data = json.loads((tmp_path / "sag.json").read_text())
    assert data == json.loads(text) and data["grid"] == [4, 4] and data["target"] == 1
    again = AttentionGraph.from_json(text)
    assert again.nodes == g.nodes and again.edges == g.edges
    img = (x[0] / x[0].max()).clamp(0, 1)
    g.draw(img, tmp_path / "sag.png")
    from PIL import Image

    with Image.open(tmp_path / "sag.png") as im:
        assert im.size[0] > 100 and im.size[1] > 100


def test_passes_are_counted_through_the_session():
    model = PatchModel().double()
    x = patch_image(1)
    e = sl.explain(model, x, "structured_attention_graph", target=1, size=4, steps=5, iterations=2,
                   candidates=16, max_patches=3, depth=1)
    assert e.cost.backward_images == 2 * 5  # the coarse I-GOS gradient passes
    assert e.cost.forward_images > 2 * 5 + 16  # plus its line search, the beam search and the graph


def test_the_coarse_igos_is_the_public_one_with_the_same_image_ids():
    """SAG's ordering comes from igos.explain with this call's ids: same importance as calling it directly."""
    from saliencylab.methods.igos import IGOS

    model = PatchModel().double()
    x = patch_image(2)
    ids = ["p.png", "q.png"]
    e = build("structured_attention_graph", model, size=4, steps=5, iterations=2, max_patches=2,
              depth=0).explain(x, target=1, image_ids=ids)
    direct = IGOS(model, size=4, steps=5, iterations=2, score="softmax", batch_size=10).explain(x, target=1,
                                                                                               image_ids=ids)
    assert torch.equal(e.extras["igos"], direct.maps)
    halves = [build("structured_attention_graph", model, size=4, steps=5, iterations=2, max_patches=2,
                    depth=0).explain(x[j:j + 1], target=1, image_ids=ids[j:j + 1]) for j in range(2)]
    assert torch.allclose(e.maps, torch.cat([h.maps for h in halves]), atol=1e-9)
