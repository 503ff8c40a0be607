"""A larger photo set for the faithfulness leaderboard that needs no network: crops of the bundled photos
and of scikit-image's own offline images, written as a flat image folder for `saliencylab evaluate --data`.

Sources (19, in this order): the 5 bundled photos (`saliencylab.images`: chelsea, coffee, rocket,
astronaut, camera) and the 14 further photographs that scikit-image ships inside its wheel
(`skimage.data`, read from `skimage.data.data_dir`, no download; the images that would need `pooch` and
a network are not used, nor scikit-image's copies of the bundled photos, its synthetic images or its
binary/alpha ones). Crops per source (6, square, as fractions of the short side): the centred whole
square, the four corners at 3/4, the centre at 1/2; each resized to 256 x 256 (Pillow, bicubic: the
embedded model's resize size, so that its preprocessing only centre-crops 224 x 224). Files are PNG
(lossless) named `NNN-<source>-<crop>.png` in the order: every source's whole square, then the corner
crops, then the centre crops, so `--count N` (the first N files) covers as many sources as it can.
`manifest.json` lists every file with its source, crop box and SHA-256: the set is deterministic for
a given Pillow and scikit-image (checked with `--check`).

The leaderboard on it (the faithfulness suite's methods, presets and metric settings; targets: the
predicted class; 1 thread):

    python benchmarks/offline_set.py --out offline-set
    saliencylab --threads 1 evaluate --data offline-set --out offline-leaderboard \\
        --methods gradient,input_x_gradient,integrated_gradients,smoothgrad,guided_backprop,gradcam,\\
gradcam_plus_plus,layercam,fullgrad,occlusion,rise,iba,igos \\
        --metrics deletion,insertion,road,morf_lerf,sensitivity_n,sparseness --preset photo \\
        --metric-param deletion.protocol=igos --metric-param deletion.steps=25 \\
        --metric-param insertion.protocol=igos --metric-param insertion.steps=25 \\
        --metric-param morf_lerf.tile=14 --metric-param morf_lerf.steps=32 --chunk-size 2

`--chunk-size 2`: images are explained and measured two at a time, so a run stopped early leaves whole
images (every method and metric) behind, not a part of a larger chunk; the scores do not depend on it
(randomness is keyed by image; batches move them by float rounding only).
`python benchmarks/offline_set.py --print-command` prints that command from the suite's own tables
(`runs.leaderboard.PHOTO_DEFAULT_METHODS`, `FAITHFULNESS_METRICS`, `_FAITHFULNESS_METRIC_PARAMS`), so
it cannot drift from them. The run streams in chunks and resumes (rows.jsonl): rerun the same command
after an interruption, or after writing more files with a larger `--count`.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
from pathlib import Path

from PIL import Image

SIZE = 256  # the embedded model's resize size: its preprocessing then only centre-crops 224 x 224
# scikit-image's offline photographs (file in skimage.data.data_dir), without its copies of the bundled
# photos (chelsea, coffee, rocket, astronaut, camera), its synthetic or binary images and its
# near-duplicates (motorcycle_right: the stereo pair's other eye)
SKIMAGE_FILES = (
    ("motorcycle", "motorcycle_left.png"), ("hubble", "hubble_deep_field.jpg"), ("ihc", "ihc.png"),
    ("retina", "retina.jpg"), ("coins", "coins.png"), ("clock", "clock_motion.png"), ("moon", "moon.png"),
    ("grass", "grass.png"), ("gravel", "gravel.png"), ("brick", "brick.png"), ("page", "page.png"),
    ("text", "text.png"), ("cell", "cell.png"), ("microaneurysms", "microaneurysms.png"),
)
# (name, side as a fraction of the short side, (fx, fy): where the square sits, 0 = left/top, 1 = right/bottom)
CROPS = (("whole", 1.0, (0.5, 0.5)),
         ("tl", 0.75, (0.0, 0.0)), ("tr", 0.75, (1.0, 0.0)), ("bl", 0.75, (0.0, 1.0)), ("br", 0.75, (1.0, 1.0)),
         ("centre", 0.5, (0.5, 0.5)))


def sources() -> list[tuple[str, Path]]:
    """(name, file) of every source photo, in order: the bundled ones, then scikit-image's."""
    from saliencylab import images

    out = [(name, photo.path) for name, photo in images.samples().items()]
    try:
        import skimage.data
    except ImportError:
        sys.exit("scikit-image is needed for its offline images: pip install scikit-image")
    root = Path(skimage.data.data_dir)
    for name, file in SKIMAGE_FILES:
        if not (root / file).exists():
            sys.exit(f"scikit-image {skimage.__version__} has no {file} in {root}")
        out.append((name, root / file))
    return out


def crop_box(width: int, height: int, side: float, where) -> tuple[int, int, int, int]:
    s = int(round(min(width, height) * side))
    x0 = int(round((width - s) * where[0]))
    y0 = int(round((height - s) * where[1]))
    return x0, y0, x0 + s, y0 + s


def plan() -> list[dict]:
    """Every file of the set, in order: crop by crop, source by source."""
    items = []
    for crop, side, where in CROPS:
        for name, path in sources():
            items.append({"source": name, "source_file": path.name, "crop": crop, "side": side, "where": where,
                          "path": path})
    for i, it in enumerate(items):
        it["file"] = f"{i:03d}-{it['source']}-{it['crop']}.png"
    return items


def render(item: dict) -> Image.Image:
    with Image.open(item["path"]) as im:
        im = im.convert("RGB")  # grey and palette images as RGB, as the model's reader does
        box = crop_box(*im.size, item["side"], item["where"])
        item["box"] = list(box)
        return im.crop(box).resize((SIZE, SIZE), Image.BICUBIC)


def write(out: Path, count: int | None = None) -> list[dict]:
    out.mkdir(parents=True, exist_ok=True)
    items = plan()[:count]
    manifest = []
    for it in items:
        img = render(it)
        target = out / it["file"]
        img.save(target, format="PNG", optimize=False)
        manifest.append({"file": it["file"], "source": it["source"], "source_file": it["source_file"],
                         "crop": it["crop"], "box": it["box"], "sha256": _sha256(target)})
    (out / "manifest.json").write_text(json.dumps(manifest, indent=1))
    return manifest


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def check(out: Path) -> list[str]:
    """Files of `out` whose bytes differ from a fresh rendering (empty: the set is reproduced)."""
    manifest = json.loads((out / "manifest.json").read_text())
    bad = []
    by_file = {it["file"]: it for it in plan()}
    for entry in manifest:
        img = render(by_file[entry["file"]])
        fresh = hashlib.sha256()
        import io

        buf = io.BytesIO()
        img.save(buf, format="PNG", optimize=False)
        fresh.update(buf.getvalue())
        if fresh.hexdigest() != entry["sha256"] or _sha256(out / entry["file"]) != entry["sha256"]:
            bad.append(entry["file"])
    return bad


def command(data: str = "offline-set", out: str = "offline-leaderboard", threads: int = 1) -> str:
    """The `saliencylab evaluate --data` command of the faithfulness leaderboard (the suite's tables)."""
    from saliencylab.runs import leaderboard as lb

    params = lb._FAITHFULNESS_METRIC_PARAMS["default"]
    metric_params = [f"--metric-param {m}.{k}={json.dumps(v) if not isinstance(v, str) else v}"
                     for m in lb.FAITHFULNESS_METRICS for k, v in params.get(m, {}).items()]
    return (f"saliencylab --threads {threads} evaluate --data {data} --out {out} "
            f"--methods {','.join(lb.PHOTO_DEFAULT_METHODS)} --metrics {','.join(lb.FAITHFULNESS_METRICS)} "
            f"--preset photo {' '.join(metric_params)} --chunk-size 2")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="offline-set", help="folder to write (default: %(default)s)")
    p.add_argument("--count", type=int, default=None, help="only the first N files (default: all)")
    p.add_argument("--check", action="store_true", help="verify the folder against its manifest")
    p.add_argument("--print-command", action="store_true", help="print the leaderboard command and exit")
    args = p.parse_args(argv)
    if args.print_command:
        print(command(args.out))
        return
    if args.check:
        bad = check(Path(args.out))
        print("reproduced" if not bad else f"{len(bad)} file(s) differ: {', '.join(bad)}")
        sys.exit(1 if bad else 0)
    manifest = write(Path(args.out), args.count)
    print(f"{len(manifest)} images from {len({m['source'] for m in manifest})} sources in {args.out}")
    print(command(args.out))


if __name__ == "__main__":
    main()
