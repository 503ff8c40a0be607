"""Shards: a deterministic partition by image id, N shards merged equal the unsharded run row for row, and an
interrupted run resumes to the same rows with nothing duplicated or lost."""

import json

import numpy as np
import pytest
from PIL import Image

from saliencylab.core.errors import ConfigError
from saliencylab.models import LoadedModel
from saliencylab.runs import shards
from saliencylab.runs.dataset import evaluate_folder
from saliencylab.runs.store import RunStore
from zoo import make_small_cnn, write_image_folder

pytestmark = pytest.mark.usefixtures("one_thread")

METHODS = ["gradient", "smoothgrad"]  # smoothgrad: noise keyed by image id, so chunking must not change it
METRICS = ["sparseness", "deletion"]
PARAMS = {"metric_params": {"deletion": {"steps": 4}}, "method_params": {"smoothgrad": {"samples": 4}}}


def loaded():
    return LoadedModel(name="small", model=make_small_cnn(), labels=[], mean=(0.5,) * 3, std=(0.25,) * 3,
                       input_size=32, resize_size=32, interpolation="bilinear")


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return write_image_folder(tmp_path_factory.mktemp("data"), 14, classes=None)


def values(rows):
    return {r.key: (r.image_id, r.method, r.metric, r.target, r.score, r.curves) for r in rows}


def assert_same_rows(rows, reference):
    """Same keys (image, digest, model, method and metric specs, target), the same scores and curves up to
    float rounding (batched kernels may round differently for another mix of images in a chunk)."""
    got = values(rows)
    assert sorted(got) == sorted(reference) and len(rows) == len(got)
    for key, (image_id, method, metric, target, score, curves) in got.items():
        ref = reference[key]
        assert (image_id, method, metric, target) == ref[:4]
        assert score == pytest.approx(ref[4], rel=1e-6, abs=1e-9)
        assert (curves is None) == (ref[5] is None)
        if curves:
            for k, v in curves["image"].items():
                assert v == pytest.approx(ref[5]["image"][k], rel=1e-6, abs=1e-9)
            assert curves["shared"] == ref[5]["shared"]


def file_keys(path):
    return [json.loads(line)["key"] for line in path.read_text().splitlines()]


def test_parse_and_partition():
    assert shards.parse_shard("1/4") == (1, 4) and shards.parse_shard(None) == (0, 1)
    assert shards.parse_shard((2, 3)) == (2, 3)
    for bad in ("4/4", "1/0", "a/b", "-1/3"):
        with pytest.raises(ConfigError):
            shards.parse_shard(bad)
    ids = [f"class{i % 7}/img{i}.jpg" for i in range(300)]
    parts = [shards.select(ids, (i, 4)) for i in range(4)]
    assert sorted(sum(parts, [])) == sorted(ids)  # disjoint and complete
    assert min(map(len, parts)) > 45  # roughly equal
    # an image's shard depends on its id only: adding images moves none of the others
    more = shards.select(ids + [f"new/{i}.jpg" for i in range(50)], (2, 4))
    assert [i for i in more if not i.startswith("new/")] == parts[2]
    assert shards.rows_filename((1, 4)) == "rows-shard-1-of-4.jsonl" and shards.rows_filename(None) == "rows.jsonl"


def test_shards_merged_equal_the_unsharded_run(folder, tmp_path):
    whole = evaluate_folder(loaded(), folder, METHODS, METRICS, out=tmp_path / "whole", chunk_size=5, **PARAMS)
    assert whole.computed == 14 * 4
    reference = values(RunStore(tmp_path / "whole").rows())
    out = tmp_path / "sharded"
    sizes = []
    for i in range(3):
        run = evaluate_folder(loaded(), folder, METHODS, METRICS, out=out, shard=f"{i}/3", chunk_size=3, **PARAMS)
        sizes.append(run.images)
    assert sum(sizes) == 14 and all(s > 0 for s in sizes)
    assert sorted(p.name for p in shards.rows_files(out)) == [f"rows-shard-{i}-of-3.jsonl" for i in range(3)]
    merged = shards.merge_rows(out)
    assert len(merged) == len(reference) == 56
    assert_same_rows(merged, reference)
    # an unsharded run into the sharded folder finds every row done
    assert evaluate_folder(loaded(), folder, METHODS, METRICS, out=out, **PARAMS).computed == 0
    assert not (out / "rows.jsonl").exists() or not (out / "rows.jsonl").read_text().strip()


def test_interrupted_run_resumes_to_the_same_rows(folder, tmp_path):
    reference_dir = tmp_path / "ref"
    evaluate_folder(loaded(), folder, METHODS, METRICS, out=reference_dir, chunk_size=4, **PARAMS)
    reference = values(RunStore(reference_dir).rows())
    out = tmp_path / "run"
    calls = {"n": 0}

    def stop_after(k):
        def hook(rows):
            calls["n"] += 1
            if calls["n"] == k:
                raise KeyboardInterrupt

        return hook

    # killed in the middle of a chunk (after 5 new (method, metric) batches), then again (after 2 more)
    for k in (5, 2):
        calls["n"] = 0
        with pytest.raises(KeyboardInterrupt):
            evaluate_folder(loaded(), folder, METHODS, METRICS, out=out, shard="1/2", chunk_size=4,
                            on_rows=stop_after(k), **PARAMS)
    path = out / "rows-shard-1-of-2.jsonl"
    partial = file_keys(path)
    assert 0 < len(partial) < len([v for v in reference.values() if shards.shard_of(v[0], 2) == 1])
    # and a line cut short by a kill in the middle of a write
    with path.open("a") as f:
        f.write('{"image_id": "img0')
    evaluate_folder(loaded(), folder, METHODS, METRICS, out=out, shard="1/2", chunk_size=4, **PARAMS)
    evaluate_folder(loaded(), folder, METHODS, METRICS, out=out, shard="0/2", chunk_size=4, **PARAMS)
    for p in shards.rows_files(out):
        keys = file_keys(p)  # every line parses: the cut line was dropped
        assert len(keys) == len(set(keys))  # nothing twice
    assert file_keys(path)[:len(partial)] == partial  # append-only: the rows before the kill are kept as written
    assert_same_rows(shards.merge_rows(out), reference)


def test_read_rows_leaves_a_line_being_written_alone(tmp_path, folder):
    evaluate_folder(loaded(), folder, ["gradient"], ["sparseness"], out=tmp_path, shard="0/2", **PARAMS)
    path = tmp_path / "rows-shard-0-of-2.jsonl"
    complete = path.read_text()
    path.write_text(complete + '{"image_id": "x"')  # another process is writing this line
    rows = shards.read_rows(path)
    assert len(rows) == len(complete.splitlines()) and path.read_text().endswith('"x"')
    # the other shard reads it as done without touching it
    store = shards.shard_store(tmp_path, "1/2")
    assert len(store) == len(rows) and path.read_text().endswith('"x"')


def test_report_uses_the_newest_rows_of_an_image_whose_pixels_changed(tmp_path):
    """An image overwritten between runs gets new rows; the report must show them, not the stale ones."""
    data = tmp_path / "data"
    data.mkdir()
    rng = np.random.default_rng(1)
    for i in range(3):
        Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(data / f"img{i}.png")
    out = tmp_path / "out"
    evaluate_folder(loaded(), data, ["gradient"], ["sparseness"], out=out)
    Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(data / "img0.png")
    assert evaluate_folder(loaded(), data, ["gradient"], ["sparseness"], out=out).computed == 1
    fresh = evaluate_folder(loaded(), data, ["gradient"], ["sparseness"], out=tmp_path / "fresh")
    with pytest.warns(UserWarning, match="pixels changed"):
        paths = shards.write_report(out)
    report = json.loads(paths["json"].read_text())
    fresh_report = json.loads(shards.write_report(tmp_path / "fresh")["json"].read_text())
    assert fresh.computed == 3
    assert report["groups"][0]["scores"] == fresh_report["groups"][0]["scores"]
