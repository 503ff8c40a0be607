"""Our EfficientNet-Lite0 against the reference port, plus load() and from_spec()."""

import uuid

import numpy as np
import pytest
import torch
from torch import nn

from saliencylab.core.errors import ConfigError, InputError
from saliencylab.images import samples
from saliencylab.models import available, from_spec, load
from saliencylab.models.efficientnet_lite import SamePadConv2d, efficientnet_lite0, weights_path

ATOL = 1e-4


@pytest.fixture(scope="module")
def ours():
    return efficientnet_lite0()


def _reference(**override):
    ref_pkg = pytest.importorskip("efficientnet_lite_pytorch")
    # Built by name and loaded from the weight file on disk (never the package's download path).
    model = ref_pkg.EfficientNet.from_name("efficientnet-lite0", num_classes=1000, **override)
    model.load_state_dict(torch.load(weights_path(), map_location="cpu", weights_only=True))
    return model.eval()


@pytest.fixture(scope="module")
def reference():
    return _reference()  # static padding computed for 224


@pytest.fixture(scope="module")
def reference_dynamic():
    return _reference(image_size=None)  # pads per call, like ours


@pytest.fixture(scope="module")
def photo_batch():
    lm = load()
    return lm.preprocess_batch([p.path for p in samples().values()])


@torch.no_grad()
def test_matches_reference_on_random_input(ours, reference):
    torch.manual_seed(0)
    x = torch.randn(1, 3, 224, 224)
    a, b = ours(x), reference(x)
    assert a.shape == (1, 1000)
    torch.testing.assert_close(a, b, atol=ATOL, rtol=0)


@torch.no_grad()
def test_matches_reference_on_photos(ours, reference, photo_batch):
    a, b = ours(photo_batch), reference(photo_batch)
    torch.testing.assert_close(a, b, atol=ATOL, rtol=0)
    # Not a degenerate comparison: the photos get different, confident answers.
    assert len(set(a.argmax(1).tolist())) == len(photo_batch)


@pytest.mark.parametrize("size", [(256, 256), (199, 199), (150, 97)])
@torch.no_grad()
def test_matches_reference_at_other_sizes(ours, reference_dynamic, size):
    torch.manual_seed(1)
    x = torch.randn(1, 3, *size)
    a = ours(x)
    assert a.shape == (1, 1000)
    torch.testing.assert_close(a, reference_dynamic(x), atol=ATOL, rtol=0)


def test_same_padding_is_asymmetric_like_tf():
    conv = SamePadConv2d(1, 1, 3, stride=2)
    nn.init.ones_(conv.weight)
    # 4x4 of ones, stride 2, k=3: TF pads 0 top/left and 1 bottom/right.
    out = conv(torch.ones(1, 1, 4, 4))
    assert out.shape == (1, 1, 2, 2)
    assert out[0, 0].tolist() == [[9.0, 6.0], [6.0, 4.0]]


def test_module_names(ours):
    names = dict(ours.named_modules())
    for name in ["stem.conv", "stem.bn", "stem.act", "head.conv", "head.bn", "head.act",
                 "pool", "dropout", "classifier", "blocks.0.depthwise_conv", "blocks.0.project_conv",
                 "blocks.1.expand_conv", "blocks.1.bn0", "blocks.1.act0", "blocks.15.act1", "blocks.15.bn2"]:
        assert name in names, name
    assert [n for n in names if n.count(".") == 1 and n.startswith("blocks.")] == [f"blocks.{i}" for i in range(16)]
    assert "blocks.16" not in names and "blocks.0.expand_conv" not in names
    assert isinstance(names["classifier"], nn.Linear)
    assert (names["classifier"].in_features, names["classifier"].out_features) == (1280, 1000)
    assert not ours.training


def test_every_activation_is_a_distinct_module_used_once(ours):
    acts = [m for m in ours.modules() if isinstance(m, (nn.ReLU, nn.ReLU6, nn.SiLU, nn.Hardswish))]
    assert len(acts) == 1 + 15 * 2 + 1 + 1  # stem, blocks (blocks.0 has no expansion), head
    assert all(isinstance(m, nn.ReLU6) and not m.inplace for m in acts)
    calls = {id(m): 0 for m in acts}
    handles = [m.register_forward_hook(lambda mod, i, o: calls.__setitem__(id(mod), calls[id(mod)] + 1)) for m in acts]
    try:
        with torch.no_grad():
            ours(torch.zeros(1, 3, 64, 64))
    finally:
        for h in handles:
            h.remove()
    assert set(calls.values()) == {1}


def test_input_gradients_flow(ours):
    x = torch.randn(1, 3, 96, 96, requires_grad=True)
    ours(x)[0, 281].backward()
    assert x.grad is not None and x.grad.abs().sum() > 0


# --- load() -----------------------------------------------------------------

def test_load_returns_everything_needed():
    lm = load()
    assert available() == ["efficientnet_lite0"] and lm.name == "efficientnet_lite0"
    assert not lm.model.training and lm.input_size == 224
    assert len(lm.labels) == 1000 and lm.labels[281] == "tabby" and lm.labels[967] == "espresso"
    assert len(set(lm.labels)) == 1000
    assert lm.mean == pytest.approx((127 / 255,) * 3) and lm.std == pytest.approx((128 / 255,) * 3)


def test_preprocess_accepts_path_pil_and_array():
    lm = load()
    photo = samples(["coffee"])["coffee"]
    from_path = lm.preprocess(photo.path)
    from_str = lm.preprocess(str(photo.path))
    from_pil = lm.preprocess(photo.image)
    from_array = lm.preprocess(np.asarray(photo.image))
    assert from_path.shape == (3, 224, 224) and from_path.dtype == torch.float32
    for other in (from_str, from_pil, from_array):
        assert torch.equal(from_path, other)
    # The TF normalization maps pixel 0 -> -127/128 and 255 -> 1.
    assert from_path.min() >= -127 / 128 - 1e-6 and from_path.max() <= 1 + 1e-6
    back = lm.denormalize(from_path)
    assert back.min() >= 0 and back.max() <= 1
    assert torch.allclose(back, from_path * (128 / 255) + 127 / 255, atol=1e-6)
    gray = lm.preprocess(np.full((300, 500), 128, dtype=np.uint8))
    assert gray.shape == (3, 224, 224) and torch.allclose(gray, torch.full_like(gray, 1 / 128), atol=1e-6)
    batch = lm.preprocess_batch([photo.path, photo.image])
    assert batch.shape == (2, 3, 224, 224) and torch.equal(batch[0], batch[1])


@pytest.mark.parametrize("bad, words", [
    (np.zeros((10, 10, 3), dtype=np.float32), "uint8"),
    (np.zeros((10, 10, 4), dtype=np.uint8), "(H, W, 3)"),
    (12, "int"),
])
def test_preprocess_rejects_bad_input(bad, words):
    with pytest.raises(InputError, match=rf"{__import__('re').escape(words)}"):
        load().preprocess(bad)


def test_load_unknown_name():
    with pytest.raises(ConfigError, match="unknown model 'resnet9000'.*efficientnet_lite0"):
        load("resnet9000")


# --- from_spec() ------------------------------------------------------------

class _Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 2)

    def forward(self, x):
        return self.fc(x)


@pytest.fixture
def user_module(tmp_path, monkeypatch):
    name = f"user_models_{uuid.uuid4().hex[:8]}"
    (tmp_path / f"{name}.py").write_text(
        "import torch\n"
        "from torch import nn\n"
        "def make():\n"
        "    torch.manual_seed(0)\n"
        "    return nn.Sequential(nn.Linear(4, 2)).train()\n"
        "def broken():\n"
        "    raise RuntimeError('out of coffee')\n"
        "def not_a_model():\n"
        "    return 42\n"
        "NUMBER = 3\n"
        "INSTANCE = nn.Linear(4, 2)\n"
    )
    (tmp_path / f"{name}_bad.py").write_text("raise ImportError('needs a GPU driver')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    return name


def test_from_spec_factory(user_module):
    model = from_spec(f"{user_module}:make")
    assert isinstance(model, nn.Sequential) and not model.training
    assert isinstance(from_spec(f"{user_module}:INSTANCE"), nn.Linear)


def test_from_spec_embedded_name():
    model = from_spec("efficientnet_lite0")
    assert not model.training and model(torch.zeros(1, 3, 64, 64)).shape == (1, 1000)


@pytest.mark.filterwarnings("ignore:.*torch.jit.script.* is deprecated:DeprecationWarning")
def test_from_spec_torchscript_file(tmp_path):
    tiny = _Tiny().eval()
    path = tmp_path / "tiny.pt"
    torch.jit.script(tiny).save(str(path))
    model = from_spec(str(path))
    x = torch.randn(3, 4)
    assert not model.training
    torch.testing.assert_close(model(x), tiny(x))


def test_from_spec_weights(tmp_path, user_module):
    source = nn.Sequential(nn.Linear(4, 2))
    path = tmp_path / "w.pth"
    torch.save(source.state_dict(), path)
    model = from_spec(f"{user_module}:make", weights=str(path))
    assert torch.equal(model[0].weight, source[0].weight)
    # A training checkpoint with the state dict nested inside also works.
    torch.save({"epoch": 3, "state_dict": source.state_dict()}, tmp_path / "ckpt.pth")
    model = from_spec(f"{user_module}:make", weights=str(tmp_path / "ckpt.pth"))
    assert torch.equal(model[0].bias, source[0].bias)


@pytest.mark.parametrize("spec, error, pattern", [
    ("no_such_pkg_xyz.models:make", ConfigError, "cannot import module 'no_such_pkg_xyz.models'"),
    ("{mod}:missing", ConfigError, "has no attribute 'missing'"),
    ("{mod}:NUMBER", ConfigError, "not a callable model factory"),
    ("{mod}:broken", ConfigError, "calling model factory .* failed: RuntimeError: out of coffee"),
    ("{mod}:not_a_model", ConfigError, "returned a int, not a torch.nn.Module"),
    ("{mod}_bad:make", ConfigError, "importing module .* failed: ImportError: needs a GPU driver"),
    ("{mod}:", ConfigError, "must look like 'package.module:factory'"),
    ("just_a_word", ConfigError, "neither 'package.module:factory'"),
    ("", ConfigError, "model spec is empty"),
    ("missing_model.pt", InputError, "cannot read model file 'missing_model.pt': no such file"),
])
def test_from_spec_errors(user_module, spec, error, pattern):
    with pytest.raises(error, match=pattern):
        from_spec(spec.format(mod=user_module))


def test_from_spec_garbage_model_file(tmp_path):
    path = tmp_path / "garbage.pt"
    path.write_bytes(b"this is not a zip archive")
    with pytest.raises(InputError, match="cannot read model file .*garbage.pt' as TorchScript"):
        from_spec(str(path))


def test_from_spec_weight_errors(tmp_path, user_module):
    spec = f"{user_module}:make"
    with pytest.raises(InputError, match="cannot read weights file .*nope.pth': no such file"):
        from_spec(spec, weights=str(tmp_path / "nope.pth"))

    (tmp_path / "garbage.pth").write_bytes(b"\x00garbage")
    with pytest.raises(InputError, match="cannot read weights file .*garbage.pth'"):
        from_spec(spec, weights=str(tmp_path / "garbage.pth"))

    torch.save([1, 2, 3], tmp_path / "list.pth")
    with pytest.raises(ConfigError, match="does not contain a state dict.*list"):
        from_spec(spec, weights=str(tmp_path / "list.pth"))

    torch.save({"fc.weight": torch.zeros(2, 4)}, tmp_path / "other.pth")
    with pytest.raises(ConfigError, match=r"does not match the model: 2 missing keys \[0.bias, 0.weight\], "
                                          r"1 unexpected keys \[fc.weight\]"):
        from_spec(spec, weights=str(tmp_path / "other.pth"))

    torch.save({"0.weight": torch.zeros(3, 4), "0.bias": torch.zeros(3)}, tmp_path / "shape.pth")
    with pytest.raises(ConfigError, match=r"does not match the model: size mismatch for 2 tensors .*0.weight \(3, 4\) vs \(2, 4\)"):
        from_spec(spec, weights=str(tmp_path / "shape.pth"))
