"""The Ray engine (`evaluate --data DIR --engine ray`): on a local Ray with 2 CPUs its rows equal the local
engine's row for row, a resumed run computes only the missing rows, the CLI runs it, and without Ray it
fails with one line naming the extra to install."""

import builtins
import json
import os
import sys
from pathlib import Path

import pytest

from saliencylab.core.errors import ConfigError
from saliencylab.runs import shards
from saliencylab.runs.dataset import evaluate_folder
from saliencylab.runs.store import RunStore
from zoo import write_image_folder

TESTS = Path(__file__).resolve().parents[1]
SRC = TESTS.parent / "src"
MODEL = "zoo:make_small_cnn"  # module:factory, importable on the actors through the PYTHONPATH below
METHODS = ["gradient", "smoothgrad"]  # smoothgrad: noise keyed by image id, so batching must not change it
METRICS = ["sparseness", "deletion"]
PARAMS = {"metric_params": {"deletion": {"steps": 4}}, "method_params": {"smoothgrad": {"samples": 4}}}


def test_missing_ray_is_one_clear_line(monkeypatch, tmp_path, capsys):
    """Runs with or without Ray: a missing Ray is reported before any work (monkeypatched import)."""
    from saliencylab.cli import main
    from saliencylab.runs import ray_engine

    real = builtins.__import__

    def no_ray(name, *args, **kwargs):
        if name == "ray" or name.startswith("ray."):
            raise ImportError(f"No module named {name!r}")
        return real(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_ray)
    for mod in [m for m in sys.modules if m == "ray" or m.startswith("ray.")]:
        monkeypatch.delitem(sys.modules, mod)
    with pytest.raises(ConfigError) as err:
        ray_engine.evaluate_folder_ray(MODEL, tmp_path, METHODS, METRICS, out=tmp_path / "out")
    assert str(err.value) == ray_engine.RAY_MISSING and "pip install saliencylab[ray]" in str(err.value)
    assert "\n" not in str(err.value)
    capsys.readouterr()
    assert main(["evaluate", "--data", str(tmp_path), "--model", MODEL, "--engine", "ray", "--out",
                 str(tmp_path / "out")]) == 2
    assert "pip install saliencylab[ray]" in "".join(capsys.readouterr())


def test_import_saliencylab_does_not_import_ray():
    import subprocess

    code = "import sys, saliencylab, saliencylab.runs, saliencylab.runs.ray_engine, saliencylab.cli; " \
           "print('ray' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={**os.environ, "PYTHONPATH": os.pathsep.join([str(SRC), str(TESTS)])})
    assert out.stdout.strip() == "False"


@pytest.fixture(scope="module")
def local_ray():
    """One local Ray on 2 CPUs for the module; actors find saliencylab and the test zoo on PYTHONPATH.
    The tests that need it are skipped, with the reason, only where Ray cannot be imported."""
    ray = pytest.importorskip("ray", reason="Ray is not installed (pip install saliencylab[ray]); the Ray "
                                            "engine tests need it")
    path = os.pathsep.join([str(SRC), str(TESTS), str(Path(__file__).parent), os.environ.get("PYTHONPATH", "")])
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level="ERROR",
             runtime_env={"env_vars": {"PYTHONPATH": path, "OMP_NUM_THREADS": "1",
                                       "SALIENCYLAB_PROGRESS": "0"}})
    yield ray
    ray.shutdown()


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return write_image_folder(tmp_path_factory.mktemp("data"), 10, broken="broken.png")


def pooled_small_cnn():
    """The zoo's SmallCNN behind a 7x7 average pool: the CLI's 224 px inputs cost what 32 px ones do."""
    from torch import nn
    from zoo import make_small_cnn

    return nn.Sequential(nn.AvgPool2d(7), make_small_cnn())


def small(spec=MODEL):
    from saliencylab import io

    return io.load_model(spec, size=32, mean="0.5,0.5,0.5", std="0.25,0.25,0.25")


@pytest.fixture(scope="module")
def reference(folder, tmp_path_factory):
    out = tmp_path_factory.mktemp("local")
    run = evaluate_folder(small(), folder, METHODS, METRICS, out=out, target="label", chunk_size=3, **PARAMS)
    return run, {r.key: r for r in RunStore(out).rows()}


def assert_same_rows(rows, reference):
    """Keys exact; scores and curves to float rounding (other images in a batch may round differently)."""
    got = {r.key: r for r in rows}
    assert len(got) == len(rows) and sorted(got) == sorted(reference)
    for key, row in got.items():
        ref = reference[key]
        assert (row.image_id, row.method, row.metric, row.target) == (ref.image_id, ref.method, ref.metric, ref.target)
        assert row.score == pytest.approx(ref.score, rel=1e-6, abs=1e-9)
        if row.curves:
            for k, v in row.curves["image"].items():
                assert v == pytest.approx(ref.curves["image"][k], rel=1e-6, abs=1e-9)


def test_ray_rows_equal_the_local_engine_and_resume(local_ray, folder, reference, tmp_path):
    """A local run of shard 0/2 killed after its first chunk, then the Ray engine on the whole folder (a model
    object pickled once into the object store, 2 actors, batches of another size than the local chunks):
    it computes exactly the missing rows, and the merged rows equal the local engine's row for row."""
    from saliencylab.runs.ray_engine import evaluate_folder_ray

    local_run, ref = reference
    assert len(ref) == 10 * 4 and local_run.skipped

    def stop(chunk):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        evaluate_folder(small(), folder, METHODS, METRICS, out=tmp_path, target="label", shard="0/2", chunk_size=2,
                        on_chunk=stop, **PARAMS)
    partial = RunStore(tmp_path / "rows-shard-0-of-2.jsonl")
    assert 0 < len(partial) < 40
    seen, batches = [], []
    run = evaluate_folder_ray(small(), folder, METHODS, METRICS, out=tmp_path, target="label", batch_size=4,
                              num_actors=2, on_rows=seen.extend, on_chunk=batches.append, **PARAMS)
    assert run.images == local_run.images == 11 and run.rows_file == tmp_path / "rows.jsonl"
    assert run.computed == 40 - len(partial) == len(seen)  # only the missing rows
    assert not {r.key for r in seen} & {r.key for r in partial.rows()}
    assert sorted(i for b in batches for i in b.ids) == sorted(r.image_id for r in ref.values())[::4]
    assert run.skipped == local_run.skipped  # the broken file, with the local engine's reason
    assert (tmp_path / "skipped.csv").read_text() == (local_run.out / "skipped.csv").read_text()
    lines = [json.loads(x)["key"] for x in run.rows_file.read_text().splitlines()]
    assert len(lines) == len(set(lines)) == len(seen)  # one writer, nothing twice
    assert_same_rows(shards.merge_rows(tmp_path), ref)


def test_cli_engine_ray(local_ray, folder, tmp_path, capsys):
    from saliencylab.cli import main

    common = ["evaluate", "--data", str(folder), "--model", f"{__name__}:pooled_small_cnn", "--methods", "gradient",
              "--metrics", "sparseness", "--target", "label"]
    assert main([*common, "--out", str(tmp_path / "local")]) == 1  # 1: the broken file was skipped
    capsys.readouterr()
    code = main([*common, "--engine", "ray", "--actors", "2", "--chunk-size", "4", "--out", str(tmp_path / "ray")])
    out = capsys.readouterr()
    assert code == 1, out  # 1: a file was skipped (the broken one), as for the local engine
    assert "11 images, 10 new rows" in out.out and "skipped 1 file" in out.err
    assert_same_rows(RunStore(tmp_path / "ray").rows(), {r.key: r for r in RunStore(tmp_path / "local").rows()})
    assert (tmp_path / "ray" / "leaderboard.md").exists()
    assert main([*common, "--engine", "ray", "--actors", "0", "--out", str(tmp_path / "bad")]) == 2
    bad = capsys.readouterr()
    assert "--actors must be a positive int" in bad.err + bad.out


def test_more_gpus_than_the_cluster_has_is_one_line_not_a_hang(local_ray, folder, tmp_path):
    from saliencylab.core.errors import ConfigError
    from saliencylab.runs.ray_engine import evaluate_folder_ray

    with pytest.raises(ConfigError, match="GPU"):
        evaluate_folder_ray(small(), folder, ["gradient"], ["sparseness"], out=tmp_path / "out",
                            num_actors=1, num_gpus_per_actor=1)
