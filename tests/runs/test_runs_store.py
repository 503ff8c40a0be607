"""The rows store: complete keys, append-only JSON lines, resume after an interrupted write."""

import json

import pytest
import torch

from saliencylab.runs.store import IDENTITY, Row, RunStore, callable_description, row_key, spec_value


def make_row(**change):
    fields = dict(image_id="a.jpg", image_digest="d0", model="m0", method="gradient", method_params={"x": 1},
                  metric="deletion", metric_params={"steps": 4}, target=3, score=0.5)
    fields.update(change)
    return Row(**fields)


def test_key_covers_every_identity_field_and_nothing_else():
    base = make_row()
    changed = {"image_id": "b.jpg", "image_digest": "d1", "model": "m1", "method": "smoothgrad",
               "method_params": {"x": 2}, "metric": "insertion", "metric_params": {"steps": 5}, "target": 4,
               "settings": "s1"}
    assert set(changed) == set(IDENTITY)
    keys = {base.key} | {make_row(**{k: v}).key for k, v in changed.items()}
    assert len(keys) == len(IDENTITY) + 1
    same = make_row(score=0.9, cost={"explain": {"seconds": 1.0}}, curves={"image": {}, "shared": {}})
    assert same.key == base.key
    assert make_row(method_params={"x": 1}).key == base.key  # parameter order does not matter
    assert row_key(**base.identity()) == base.key
    with pytest.raises(TypeError):
        row_key(image_id="a")


def test_settings_digest_follows_defaults_and_revisions(monkeypatch):
    """A changed default or a bumped revision gives rows another key: old rows are not served as current."""
    from saliencylab import metrics
    from saliencylab.runs.store import settings_digest

    cls = metrics.get("road")
    before = settings_digest("gradient", {}, "road", {})
    assert settings_digest("gradient", {}, "road", {}) == before
    assert settings_digest("gradient", {"batch_size": 4}, "road", {}) != before
    monkeypatch.setattr(cls, "revision", getattr(cls, "revision", 0) + 1)
    assert settings_digest("gradient", {}, "road", {}) != before
    monkeypatch.undo()
    from saliencylab.core.registry import Param
    monkeypatch.setattr(cls, "noise", Param(0.02, "a changed default"))
    assert settings_digest("gradient", {}, "road", {}) != before


def test_tensor_and_callable_settings_are_told_apart():
    a, b = torch.zeros(2, 3), torch.ones(2, 3)
    assert spec_value(a) != spec_value(b) and spec_value(a) == spec_value(a.clone())
    assert make_row(method_params={"data": a}).key != make_row(method_params={"data": b}).key
    f, g = (lambda out: out[:, 0]), (lambda out: out[:, 1])
    assert callable_description(f) != callable_description(g)
    assert callable_description(f) == callable_description(f)

    def scale(k):
        return lambda out: out[:, 0] * k

    assert callable_description(scale(1)) != callable_description(scale(2))


def test_round_trip_keeps_every_field(tmp_path):
    store = RunStore(tmp_path)
    rows = [make_row(image_id=str(i), target=[1, 2], score=float("nan") if i == 0 else i,
                     curves={"image": {"scores": [1.0, 0.5]}, "shared": {"fraction": [0.0, 1.0]}})
            for i in range(3)]
    assert store.append(rows) == rows
    again = RunStore(tmp_path / "rows.jsonl")
    assert len(again) == 3
    for r in rows:
        got = again.get(r.key)
        assert got.target == [1, 2] and got.curves == r.curves and got.method_params == {"x": 1}
        assert got.score == r.score or (got.score != got.score and r.score != r.score)


def test_append_never_duplicates(tmp_path):
    store = RunStore(tmp_path)
    row = make_row()
    assert store.append([row, row]) == [row]
    assert store.append([make_row()]) == []
    assert len((tmp_path / "rows.jsonl").read_text().splitlines()) == 1
    assert len(RunStore(tmp_path)) == 1


def test_a_line_cut_short_is_dropped_and_the_next_row_starts_clean(tmp_path):
    path = tmp_path / "rows.jsonl"
    RunStore(path).append([make_row(image_id="0"), make_row(image_id="1")])
    text = path.read_text()
    cut = make_row(image_id="2")
    path.write_text(text + json.dumps(cut.to_dict())[:50])  # interrupted in the middle of a line
    store = RunStore(path)
    assert len(store) == 2 and cut.key not in store
    assert path.read_text() == text  # the partial line is gone, the complete ones untouched
    store.append([cut])
    reopened = RunStore(path)
    assert len(reopened) == 3 and reopened.skipped == 0
    assert len(path.read_text().splitlines()) == 3


def test_a_complete_last_row_without_its_newline_is_kept(tmp_path):
    path = tmp_path / "rows.jsonl"
    last = make_row(image_id="1")
    path.write_text(json.dumps(make_row(image_id="0").to_dict()) + "\n" + json.dumps(last.to_dict()))
    store = RunStore(path)
    assert last.key in store and len(store) == 2
    store.append([make_row(image_id="2")])
    assert len(RunStore(path)) == 3 and len(path.read_text().splitlines()) == 3


def test_unreadable_or_edited_lines_are_skipped_with_a_warning(tmp_path):
    path = tmp_path / "rows.jsonl"
    good = make_row()
    edited = make_row(image_id="x").to_dict()
    edited["method"] = "other"  # its key no longer matches its fields
    path.write_text("not json\n" + json.dumps(edited) + "\n" + json.dumps(good.to_dict()) + "\n")
    with pytest.warns(UserWarning, match="skipped 2"):
        store = RunStore(path)
    assert len(store) == 1 and good.key in store


def test_in_memory_store_writes_nothing(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    store = RunStore(None)
    store.append([make_row()])
    assert len(store) == 1 and list(tmp_path.iterdir()) == []


def test_settings_digest_follows_what_a_protocol_expands_to(monkeypatch):
    from saliencylab.metrics import faithfulness
    from saliencylab.runs.store import settings_digest

    before = settings_digest("gradient", {}, "deletion", {"protocol": "igos"})
    changed = {**faithfulness.PROTOCOLS["igos"], "steps": 40}
    monkeypatch.setitem(faithfulness.PROTOCOLS, "igos", changed)
    assert settings_digest("gradient", {}, "deletion", {"protocol": "igos"}) != before


def test_rows_scored_against_other_boxes_are_computed_again(tmp_path):
    """A row's key includes the boxes its metric read: new boxes give new rows, the same boxes none."""
    from saliencylab.runs import RunStore, run_rows

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3, padding=1), torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(1),
                                torch.nn.Flatten(), torch.nn.Linear(4, 3)).eval()
    x = torch.rand(2, 3, 16, 16)
    first = [[0, 0, 8, 8], [4, 4, 12, 12]]
    store = RunStore(tmp_path)
    rows = run_rows(model, x, ["gradient"], ["energy_pointing_game", "sparseness"], boxes=first, store=store)
    again = run_rows(model, x, ["gradient"], ["energy_pointing_game", "sparseness"], boxes=first, store=store)
    assert [r.key for r in again] == [r.key for r in rows] and len(store) == 4
    moved = [[8, 8, 16, 16], [4, 4, 12, 12]]
    third = run_rows(model, x, ["gradient"], ["energy_pointing_game", "sparseness"], boxes=moved, store=store)
    epg = {r.image_id: r for r in third if r.metric == "energy_pointing_game"}
    old = {r.image_id: r for r in rows if r.metric == "energy_pointing_game"}
    assert epg["0"].key != old["0"].key and epg["0"].score != old["0"].score  # image 0's box moved
    assert epg["1"].key == old["1"].key                                        # image 1's did not
    assert {r.key for r in third if r.metric == "sparseness"} == {r.key for r in rows if r.metric == "sparseness"}
    assert len(store) == 5


def test_numpy_masks_key_rows_by_their_contents(tmp_path):
    """Masks given as numpy arrays: each image gets its own mask, and other masks give other rows."""
    import numpy as np

    from saliencylab.runs import RunStore, run_rows

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3, padding=1), torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(1),
                                torch.nn.Flatten(), torch.nn.Linear(4, 3)).eval()
    x = torch.rand(2, 3, 40, 40)
    a = np.zeros((2, 40, 40), dtype=bool)
    a[:, 5:15, 5:15] = True
    b = np.zeros((2, 40, 40), dtype=bool)
    b[:, 20:35, 20:35] = True
    store = RunStore(tmp_path)
    first = run_rows(model, x, ["gradient"], ["energy_pointing_game"], masks=a, store=store, target=0)
    second = run_rows(model, x, ["gradient"], ["energy_pointing_game"], masks=b, store=store, target=0)
    fresh = run_rows(model, x, ["gradient"], ["energy_pointing_game"], masks=torch.as_tensor(b), target=0)
    assert [r.score for r in second] == pytest.approx([r.score for r in fresh])
    assert [r.score for r in second] != pytest.approx([r.score for r in first])
