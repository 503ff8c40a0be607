"""fit / evaluate_model: metrics rows per epoch, exact resume after an interrupt, determinism, the
report, the data adapter (ShortcutData, (x, y, boxes) tuples, a folder with CSV / JSON boxes) and
one-line errors for bad input."""

import csv
import json

import numpy as np
import pytest
import torch
from PIL import Image

import saliencylab as sl
from saliencylab.core.errors import ConfigError, InputError
from saliencylab.envs.shortcut import shortcut_data
from saliencylab.training.loop import as_training_data, evaluate_model, fit, load_folder, load_model_file
from saliencylab.training.nets import small_cnn

pytestmark = pytest.mark.usefixtures("one_thread")

SIZE = 16
GUIDE = dict(loss="energy", method="input_x_gradient", weight=1.0)


@pytest.fixture(scope="module")
def data():
    return shortcut_data("train", n=32, size=SIZE, seed=0), shortcut_data("test", n=16, size=SIZE, seed=0)


def run(data, out=None, **kw):
    train, val = data
    kw.setdefault("epochs", 2)
    kw.setdefault("batch_size", 8)
    kw.setdefault("guidance", GUIDE)
    return fit(small_cnn(width=4, seed=0), train, val, out_dir=out, progress=False, examples=2, **kw)


def csv_rows(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_one_row_per_epoch_in_history_csv_and_json(tmp_path, data):
    result = run(data, tmp_path)
    assert [r["epoch"] for r in result.history] == [0, 1, 2]
    rows = csv_rows(tmp_path / "metrics.csv")
    assert [int(r["epoch"]) for r in rows] == [0, 1, 2]
    for key in ("loss", "ce", "guidance", "accuracy", "worst_group_accuracy", "epg", "iou", "guided_images"):
        assert key in rows[0]
    assert rows[0]["loss"] == "" and float(rows[1]["loss"]) > 0  # row 0: before training, no loss
    assert int(rows[1]["guided_images"]) == 32
    # the loss parts add up: total = ce + weight * guidance
    assert float(rows[2]["loss"]) == pytest.approx(float(rows[2]["ce"]) + float(rows[2]["guidance"]), rel=1e-6)
    saved = json.loads((tmp_path / "metrics.json").read_text())
    assert [r["epoch"] for r in saved["epochs"]] == [0, 1, 2]
    assert saved["config"]["guidance"]["loss"] == "energy"
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["epoch_000.pt", "epoch_001.pt", "epoch_002.pt"]
    assert not list(tmp_path.rglob("*.tmp"))


def test_interrupted_run_resumes_to_identical_weights_without_duplicate_rows(tmp_path, data):
    whole = run(data, tmp_path / "whole", epochs=3)

    def interrupt(event, info):
        if event == "batch" and info["epoch"] == 2 and info["batch"] == 1:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run(data, tmp_path / "cut", epochs=3, callback=interrupt)
    assert [int(r["epoch"]) for r in csv_rows(tmp_path / "cut" / "metrics.csv")] == [0, 1]
    resumed = run(data, tmp_path / "cut", epochs=3)
    assert resumed.resumed_from == 1
    a, b = whole.model.state_dict(), resumed.model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    rows_a, rows_b = csv_rows(tmp_path / "whole" / "metrics.csv"), csv_rows(tmp_path / "cut" / "metrics.csv")
    assert [int(r["epoch"]) for r in rows_b] == [0, 1, 2, 3]
    for ra, rb in zip(rows_a, rows_b):
        assert {k: v for k, v in ra.items() if k != "seconds"} == {k: v for k, v in rb.items() if k != "seconds"}
    # a finished run called again trains nothing and keeps its rows
    again = run(data, tmp_path / "cut", epochs=3)
    assert again.resumed_from == 3 and len(csv_rows(tmp_path / "cut" / "metrics.csv")) == 4
    assert all(torch.equal(a[k], again.model.state_dict()[k]) for k in a)


def test_keep_checkpoints_prunes_the_old_ones_and_resume_still_works(tmp_path, data):
    run(data, tmp_path, epochs=2, keep_checkpoints=1)
    assert [p.name for p in (tmp_path / "checkpoints").iterdir()] == ["epoch_002.pt"]
    assert run(data, tmp_path, epochs=3, keep_checkpoints=1).resumed_from == 2
    assert [int(r["epoch"]) for r in csv_rows(tmp_path / "metrics.csv")] == [0, 1, 2, 3]


def test_rows_written_after_the_last_checkpoint_are_dropped_on_resume(tmp_path, data):
    run(data, tmp_path, epochs=1)
    (tmp_path / "checkpoints" / "epoch_001.pt").unlink()  # as if killed between the two writes
    result = run(data, tmp_path, epochs=1)
    assert result.resumed_from == 0
    assert [int(r["epoch"]) for r in csv_rows(tmp_path / "metrics.csv")] == [0, 1]


def test_deterministic_given_seed_and_leaves_the_global_rng_alone(data):
    state = torch.get_rng_state()
    a = run(data, epochs=1, seed=3).model.state_dict()
    assert torch.equal(state, torch.get_rng_state())
    b = run(data, epochs=1, seed=3).model.state_dict()
    c = run(data, epochs=1, seed=4).model.state_dict()  # another shuffle
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)


def test_guidance_changes_training_and_start_delays_it(data):
    plain = run(data, epochs=1, guidance=None)
    delayed = run(data, epochs=1, guidance=dict(GUIDE, start=1))
    guided = run(data, epochs=1)
    assert plain.history[1]["guidance"] is None and delayed.history[1]["guidance"] is None
    p, d, g = (r.model.state_dict() for r in (plain, delayed, guided))
    assert all(torch.equal(p[k], d[k]) for k in p)
    assert not all(torch.equal(p[k], g[k]) for k in p)


def test_report_names_the_curves_and_shows_examples_before_and_after(tmp_path, data):
    result = run(data, tmp_path, epochs=1)
    html = result.report.read_text()
    assert result.report == tmp_path / "report.html"
    for name in ("accuracy", "worst-group accuracy", "EPG", "IoU", "before", "after"):
        assert name in html
    for src in ("curves.png", "curves_loss.png", "examples/before_0.png", "examples/after_1.png", "examples/image_0.png"):
        assert f'src="{src}"' in html and (tmp_path / src).is_file()


def test_model_file_rebuilds_the_trained_model(tmp_path, data):
    result = run(data, tmp_path, epochs=1, meta={"model": "saliencylab.training.nets:small_cnn",
                                                  "model_kwargs": {"width": 4}})
    loaded = load_model_file(tmp_path / "model.pt")
    x = data[1].images[:4]
    assert torch.equal(loaded(x), result.model(x))


def test_evaluate_model_against_the_metrics(data):
    _, val = data
    model = small_cnn(width=4, seed=1).eval()
    ev = evaluate_model(model, val, method="gradcam", layer="features")
    with torch.no_grad():
        pred = model(val.images).argmax(1)
    assert ev["accuracy"] == pytest.approx(float((pred == val.labels).double().mean()))
    groups = {g: float((pred == val.labels)[val.groups == g].double().mean()) for g in val.groups.unique().tolist()}
    assert ev["worst_group_accuracy"] == pytest.approx(min(groups.values()))
    maps = sl.explain(model, val.images, "gradcam", target=val.labels, layer="features").maps
    epg = sl.evaluate(None, val.images, maps, "energy_pointing_game", boxes=val.boxes)
    assert ev["epg"] == pytest.approx(float(epg.double().mean()), rel=1e-5)
    assert 0 <= ev["iou"] <= 1 and ev["n_localized"] == len(val)


def tuples(n=12, size=SIZE):
    g = torch.Generator().manual_seed(0)
    items = []
    for i in range(n):
        x = torch.rand(3, size, size, generator=g)
        box = None if i % 4 == 3 else [2, 2, 10, 10 + i % 3]
        items.append((x, i % 2, box))
    return items


def test_a_dataset_of_tuples_trains_and_images_without_boxes_are_skipped():
    items = tuples()
    data = as_training_data(items)
    assert data.masks.flatten(1).any(1).tolist() == [i % 4 != 3 for i in range(12)]
    result = fit(small_cnn(width=4, seed=0), items, items[:6], epochs=1, batch_size=6, guidance=GUIDE, progress=False)
    assert result.history[1]["guided_images"] == 9


def write_folder(root, fmt="csv", size=SIZE):
    root.mkdir(exist_ok=True)
    rng = np.random.default_rng(0)
    rows = []
    for i in range(8):
        Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(root / f"im{i}.png")
        rows.append({"file": f"im{i}.png", "label": ["cat", "dog"][i % 2], "box": [1, 2, 9, 12]})
    if fmt == "csv":
        lines = ["file,label,x0,y0,x1,y1"] + [f"{r['file']},{r['label']},{','.join(map(str, r['box']))}" for r in rows]
        lines.append("im0.png,cat,10,10,14,14")  # a second box of im0: the union
        (root / "boxes.csv").write_text("\n".join(lines) + "\n")
    else:
        (root / "boxes.json").write_text(json.dumps([{"file": r["file"], "label": r["label"], "boxes": [r["box"]]}
                                                     for r in rows]))
    return root


@pytest.mark.parametrize("fmt", ["csv", "json"])
def test_a_folder_with_a_boxes_file(tmp_path, fmt):
    root = write_folder(tmp_path / "data", fmt)
    data = load_folder(root)
    assert data.images.shape == (8, 3, SIZE, SIZE) and data.class_names == ["cat", "dog"]
    assert data.labels.tolist() == [0, 1] * 4
    assert int(data.masks[1].sum()) == 8 * 10 + 0 and bool(data.masks[1, 2, 1]) and not bool(data.masks[1, 1, 1])
    assert int(data.masks[0].sum()) == (80 + 16 if fmt == "csv" else 80)
    resized = load_folder(root, size=8)
    assert resized.images.shape == (8, 3, 8, 8) and int(resized.masks[1].sum()) == 4 * 5
    fit(small_cnn(width=4, seed=0), str(root), root, epochs=1, batch_size=4, guidance=GUIDE, progress=False)


def test_bad_input_gives_one_clear_line(tmp_path, data):
    train, val = data
    x = torch.rand(3, SIZE, SIZE)
    cases = [
        (lambda: as_training_data([(x, 0, [0, 0, SIZE + 1, 4])]), InputError, "outside the 16x16 image"),
        (lambda: as_training_data([(x, 0, [4, 4, 2, 8])]), InputError, "x1 >= x0"),
        (lambda: as_training_data([(x, 0)]), InputError, "(x, y, boxes)"),
        (lambda: as_training_data(42), InputError, "expected ShortcutData"),
        (lambda: fit(small_cnn(), train, epochs=1, guidance=dict(loss="energi")), ConfigError, "unknown guidance loss"),
        (lambda: fit(small_cnn(), train, epochs=1, guidance=dict(los="energy")), ConfigError, "unknown guidance key"),
        (lambda: fit(small_cnn(), train, epochs=1, guidance=dict(GUIDE, method="nope")), ConfigError, "nope"),
        (lambda: fit(small_cnn(), train, epochs=1, lr=-1), ConfigError, "lr must be > 0"),
        (lambda: fit(small_cnn(), train, epochs=1, distill=dict(method="gradcam")), ConfigError, "teacher"),
        (lambda: fit(small_cnn(), [(x, 0, None)] * 4, epochs=1, guidance=GUIDE), InputError, "no training image has"),
        (lambda: fit(small_cnn(), train, epochs=1, distill=dict(teacher=small_cnn(num_classes=3))), InputError,
         "disagree on the number of classes"),
        (lambda: evaluate_model(small_cnn(), val, method="input_x_gradient", layer="features"), ConfigError, "has no layer"),
        (lambda: load_folder(tmp_path / "missing"), InputError, "does not exist"),
    ]
    for call, kind, text in cases:
        with pytest.raises(kind) as info:
            call()
        message = str(info.value)
        assert text in message and "\n" not in message, message
    root = write_folder(tmp_path / "d")
    (root / "boxes.csv").write_text("file,label,x0,y0\nim0.png,0,1,1\n")
    with pytest.raises(InputError, match="missing x1, y1"):
        load_folder(root)
    (root / "boxes.csv").write_text("file,label,x0,y0,x1,y1\nnothere.png,0,1,1,2,2\n")
    with pytest.raises(InputError, match="not found"):
        load_folder(root)
    (root / "boxes.csv").write_text("file,label,x0,y0,x1,y1\nim0.png,0,1,1,2,2\nim0.png,1,1,1,2,2\n")
    with pytest.raises(InputError, match="two labels"):
        load_folder(root)


def test_resuming_with_other_settings_is_refused(tmp_path, data):
    run(data, tmp_path, epochs=1)
    with pytest.raises(ConfigError, match="other settings .*lr"):
        run(data, tmp_path, epochs=2, lr=0.01)
    restarted = run(data, tmp_path, epochs=1, lr=0.01, resume=False)
    assert restarted.resumed_from is None


def test_fit_leaves_the_callers_random_state_and_mode(tmp_path):
    import random

    import numpy as np

    from saliencylab.envs.shortcut import shortcut_data
    from saliencylab.training.loop import fit
    from saliencylab.training.nets import small_cnn

    data = shortcut_data("train", n=16, size=16)
    model = small_cnn(width=4, seed=0).eval()
    random.seed(5)
    np.random.seed(5)
    expected = (random.random(), float(np.random.rand()))
    random.seed(5)
    np.random.seed(5)
    fit(model, data, epochs=1, batch_size=8, progress=False)
    assert (random.random(), float(np.random.rand())) == expected
    assert not model.training


def test_resume_into_a_run_of_another_network_is_one_clear_error(tmp_path):
    from saliencylab.core.errors import ConfigError
    from saliencylab.envs.shortcut import shortcut_data
    from saliencylab.training.loop import fit
    from saliencylab.training.nets import small_cnn

    data = shortcut_data("train", n=16, size=16)
    fit(small_cnn(width=4, seed=0), data, epochs=1, batch_size=8, progress=False, out_dir=tmp_path, report=False)
    with pytest.raises(ConfigError, match="architecture"):
        fit(small_cnn(width=8, seed=0), data, epochs=2, batch_size=8, progress=False, out_dir=tmp_path, report=False)
