"""Image folders: layouts and labels, the background loader's memory bound, skipped files, folder runs."""

import csv
import json

import numpy as np
import pytest
import torch
from PIL import Image

from saliencylab.core.errors import ConfigError
from saliencylab.models import LoadedModel
from saliencylab.runs.dataset import (ChunkLoader, LoaderStats, evaluate_folder, imagenet_synsets, read_labels_file,
                                      resolve_label, scan)
from saliencylab.runs.store import RunStore
from zoo import make_small_cnn

pytestmark = pytest.mark.usefixtures("one_thread")


def write_png(path, seed, size=32):
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(path)


def small_loaded():
    return LoadedModel(name="small", model=make_small_cnn(), labels=["zero", "one", "two", "three", "four"],
                       mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25), input_size=32, resize_size=32,
                       interpolation="bilinear")


def test_synsets_map_to_the_embedded_models_indices():
    from saliencylab.models import imagenet_labels

    ids = imagenet_synsets()
    assert len(ids) == 1000 and len(set(ids)) == 1000
    labels = imagenet_labels()
    # known pairs of the ILSVRC-2012 order
    for wnid, name in (("n01440764", "tench"), ("n01443537", "goldfish"), ("n02123045", "tabby"),
                       ("n07920052", "espresso"), ("n15075141", "toilet tissue")):
        assert labels[resolve_label(wnid)] == name
    assert resolve_label("7") == 7 and resolve_label(3) == 3
    assert resolve_label("Tabby", labels) == labels.index("tabby")
    with pytest.raises(ConfigError, match="not an ImageNet-1k synset"):
        resolve_label("n00000001")
    with pytest.raises(ConfigError, match="neither a class index"):
        resolve_label("no such class", labels)


def test_scan_class_folders_and_label_files(tmp_path):
    root = tmp_path / "data"
    write_png(root / "n01443537" / "a.png", 0)
    write_png(root / "3" / "b.png", 1)
    write_png(root / "3" / "deep" / "c.png", 2)
    (root / "3" / "notes.txt").write_text("not an image")
    write_png(root / ".hidden" / "d.png", 3)
    items, missing = scan(root)
    assert [it.image_id for it in items] == ["3/b.png", "3/deep/c.png", "n01443537/a.png"]
    assert [resolve_label(it.label) for it in items] == [3, 3, 1] and missing == []

    flat = tmp_path / "flat"
    for i in range(3):
        write_png(flat / f"img{i}.png", i)
    (tmp_path / "labels.csv").write_text("file,label\nimg0.png,2\n./img1.png,n01440764\ngone.png,1\n")
    items, missing = scan(flat, tmp_path / "labels.csv")
    assert [(it.image_id, it.label) for it in items] == [("img0.png", "2"), ("img1.png", "n01440764"),
                                                         ("img2.png", None)]
    assert [m[0] for m in missing] == ["gone.png"] and "not found" in missing[0][1]
    (tmp_path / "labels.json").write_text(json.dumps([{"file": "img2.png", "label": 4}]))
    assert read_labels_file(tmp_path / "labels.json") == {"img2.png": 4}
    (tmp_path / "l2.json").write_text(json.dumps({"img0.png": "tench"}))
    assert read_labels_file(tmp_path / "l2.json") == {"img0.png": "tench"}
    (tmp_path / "bad.csv").write_text("img0.png\n")
    with pytest.raises(ConfigError, match="expected file,label"):
        read_labels_file(tmp_path / "bad.csv")
    with pytest.raises(ConfigError, match="is not a folder"):
        scan(tmp_path / "nope")


def test_loader_holds_at_most_two_chunks_and_skips_broken_files(tmp_path):
    root = tmp_path / "data"
    for i in range(40):
        write_png(root / f"{i:02d}.png", i)
    (root / "07.png").write_bytes(b"\x89PNG broken")
    items, _ = scan(root)
    stats = LoaderStats()
    loaded = small_loaded()
    seen, skipped, during = [], [], []
    for chunk in ChunkLoader(items, loaded.preprocess, chunk_size=6, workers=2, stats=stats):
        during.append(stats.held)
        seen += chunk.ids
        skipped += chunk.skipped
        assert chunk.x.shape[1:] == (3, 32, 32) and chunk.x.shape[0] == len(chunk.items) <= 6
    assert len(seen) == 39 and "07.png" not in seen and seen == sorted(seen)
    assert [s[0] for s in skipped] == ["07.png"] and skipped[0][1]
    assert max(during) <= 12 and stats.peak <= 12 and stats.held == 0  # current chunk + the one being decoded
    assert stats.chunks == 7 and stats.largest_chunk == 6
    # without threads: one chunk at a time, same images
    stats0 = LoaderStats()
    ids0 = [i for c in ChunkLoader(items, loaded.preprocess, chunk_size=6, workers=0, stats=stats0) for i in c.ids]
    assert ids0 == seen and stats0.peak <= 6


def test_folder_run_is_flat_in_memory_and_lists_skipped_files(tmp_path, monkeypatch):
    root = tmp_path / "data"
    for i in range(40):
        write_png(root / str(i % 5) / f"{i:02d}.png", i)
    (root / "2" / "corrupt.png").write_bytes(b"nope")
    batches = []
    import saliencylab.runs.dataset as ds

    real = ds.run_rows

    def spy(model, x, *a, **kw):
        batches.append(x.shape[0])
        return real(model, x, *a, **kw)

    monkeypatch.setattr(ds, "run_rows", spy)
    stats = LoaderStats()
    out = tmp_path / "out"
    result = evaluate_folder(small_loaded(), root, ["gradient"], ["sparseness"], out=out, target="label",
                             chunk_size=8, workers=2, stats=stats)
    assert max(batches) <= 8 and sum(batches) == 40 and stats.peak <= 16 and stats.held == 0
    assert result.images == 41 and result.computed == 40
    with (out / "skipped.csv").open() as f:
        rows = list(csv.reader(f))
    assert rows[0] == ["image_id", "reason"] and [r[0] for r in rows[1:]] == ["2/corrupt.png"]
    stored = RunStore(out).rows()
    assert len(stored) == 40
    assert {r.image_id: r.target for r in stored} == {f"{i % 5}/{i:02d}.png": i % 5 for i in range(40)}
    # a rerun computes nothing; a fixed target computes the rows of the images whose label was another class
    assert evaluate_folder(small_loaded(), root, ["gradient"], ["sparseness"], out=out, target="label",
                           chunk_size=8).computed == 0
    again = evaluate_folder(small_loaded(), root, ["gradient"], ["sparseness"], out=out, target=1, chunk_size=16)
    assert again.computed == 32 and len(RunStore(out)) == 72


def test_folder_run_errors_before_loading(tmp_path):
    root = tmp_path / "data"
    write_png(root / "x" / "a.png", 0)
    with pytest.raises(ConfigError, match="neither a class index"):
        evaluate_folder(small_loaded(), root, ["gradient"], ["sparseness"], out=tmp_path / "o", target="label")
    with pytest.raises(ConfigError, match="needs boxes"):
        evaluate_folder(small_loaded(), root, ["gradient"], ["pointing_game"], out=tmp_path / "o")
    with pytest.raises(ConfigError, match="target must be"):
        evaluate_folder(small_loaded(), root, ["gradient"], ["sparseness"], out=tmp_path / "o", target="best")
    with pytest.raises(ConfigError, match="preprocess="):
        evaluate_folder(make_small_cnn(), root, ["gradient"], ["sparseness"], out=tmp_path / "o")
    assert not (tmp_path / "o" / "rows.jsonl").exists()
    # a plain module with its own preprocessing
    pre = lambda p: torch.from_numpy(np.asarray(Image.open(p).convert("RGB"), dtype=np.float32)).permute(2, 0, 1) / 255
    run = evaluate_folder(make_small_cnn(), root, ["gradient"], ["sparseness"], out=tmp_path / "o", preprocess=pre)
    assert run.computed == 1
