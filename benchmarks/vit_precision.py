"""How sensitive the ViT methods' maps are to float rounding: float32 and float64, CPU and (if present)
CUDA with TF32 off, on a ViT-Tiny-sized timm-style model (random weights, seeded) and 4 bundled photos.
Prints, per method, the max |difference| / map scale and the min correlation of each pair against CPU
float64. Usage: python benchmarks/vit_precision.py [--tiny]"""

import sys

import torch

import saliencylab as sl
from saliencylab.models.vit import small_vit
from saliencylab.runs.leaderboard import embedded_photos

METHODS = ("transformer_attribution", "attnlrp", "cp_lrp", "gradient_rollout")


def compare(a, b):
    a, b = a.double().cpu().flatten(1), b.double().cpu().flatten(1)
    rel = ((a - b).abs().amax(1) / b.abs().amax(1).clamp_min(1e-30)).max().item()
    a, b = a - a.mean(1, keepdim=True), b - b.mean(1, keepdim=True)
    return rel, ((a * b).sum(1) / (a.norm(dim=1) * b.norm(dim=1)).clamp_min(1e-30)).min().item()


def main(argv):
    tiny = "--tiny" in argv
    cfg = dict(img_size=32, patch_size=8, dim=32, depth=2, heads=2) if tiny else \
        dict(img_size=224, patch_size=16, dim=192, depth=12, heads=3)
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    torch.manual_seed(0)
    base = small_vit(1000, **cfg).eval()
    _, photos, _ = embedded_photos()
    x = torch.nn.functional.interpolate(photos[:4], size=(cfg["img_size"],) * 2, mode="bilinear", align_corners=False)
    with torch.no_grad():
        target = base(x).argmax(1)
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    for name in METHODS:
        maps = {}
        for device in devices:
            for dtype in (torch.float32, torch.float64):
                m = small_vit(1000, **cfg).eval().to(device=device, dtype=dtype)
                m.load_state_dict({k: v.to(dtype) for k, v in base.state_dict().items()})
                for p in m.parameters():
                    p.requires_grad_(False)
                maps[(device, dtype)] = sl.explain(m, x.to(device, dtype), name, target=target.to(device)).maps
        ref = maps[("cpu", torch.float64)]
        for key, got in maps.items():
            if key != ("cpu", torch.float64):
                rel, corr = compare(got, ref)
                print(f"{name:24s} {key[0]:4s} {str(key[1]):14s} vs cpu float64: max rel {rel:.2e}  min corr {corr:.6f}",
                      flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
