"""The shared zoo of known-answer test models: one definition of each, imported by every test.

- SmallCNN / make_small_cnn: conv/BN/ReLU/pool/linear, every layer kind the methods meet;
- ColourNet: four classes, one per corner of the RGB cube (model-knows-best patches in a second);
- PatchModel: a linear model whose first logit is a given weight map against the image;
- PatchMeanModel: logits [mean of one square patch, 0]: only the patch matters;
- RegionModel: class 1's logit is scale * (mean of channel 0 over a region - offset): nothing else matters;
- sequential_cnn: the small nn.Sequential CNN the method tests index by position (layer="2", "6").
"""

import torch
from torch import nn


class SmallCNN(nn.Module):
    """Conv/BN/ReLU/pool/linear: every layer kind the methods meet, small enough for fast tests."""

    def __init__(self, classes: int = 5, channels: int = 3):
        super().__init__()
        self.conv1 = nn.Conv2d(channels, 6, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(6)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(6, 8, 3, padding=1)
        self.relu2 = nn.ReLU()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.dropout = nn.Dropout(0.5)
        self.fc = nn.Linear(8, classes)

    def forward(self, x):
        x = self.relu1(self.bn1(self.conv1(x)))
        x = self.relu2(self.conv2(x))
        return self.fc(self.dropout(self.pool(x).flatten(1)))


def make_small_cnn(seed: int = 0, dtype=torch.float32) -> SmallCNN:
    torch.manual_seed(seed)
    model = SmallCNN().to(dtype)
    with torch.no_grad():  # non-trivial BN statistics so eval and train modes differ
        model.bn1.running_mean.uniform_(-0.5, 0.5)
        model.bn1.running_var.uniform_(0.5, 2.0)
        model.bn1.weight.uniform_(0.5, 1.5)
        model.bn1.bias.uniform_(-0.2, 0.2)
    return model.eval()


class ColourNet(nn.Module):
    """Four classes, each firing on one corner of the RGB cube (1x1 colour detectors, BN, ReLU, 3x3 conv,
    global average pool): model-knows-best patches for it are generated in about a second."""

    def __init__(self, scale: float = 30.0):
        super().__init__()
        d = torch.tensor([[1.0, 1, 1], [1, -1, -1], [-1, 1, -1], [-1, -1, 1]])  # tetrahedron corners
        self.detect = nn.Conv2d(3, 4, 1)
        self.bn = nn.BatchNorm2d(4)
        self.relu = nn.ReLU()
        self.smooth = nn.Conv2d(4, 4, 3, padding=1)
        self.relu2 = nn.ReLU()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.dropout = nn.Dropout(0.5)
        self.fc = nn.Linear(4, 4)
        with torch.no_grad():
            self.detect.weight.copy_(d[:, :, None, None])
            self.detect.bias.copy_(-0.5 * d.sum(1))
            self.bn.running_mean.zero_()
            self.bn.running_var.fill_(1.0)
            self.smooth.weight.zero_()
            self.smooth.bias.zero_()
            for k in range(4):
                self.smooth.weight[k, k] = 1 / 9
            self.fc.weight.copy_(torch.eye(4) * scale)
            self.fc.bias.zero_()

    def forward(self, x):
        h = self.relu2(self.smooth(self.relu(self.bn(self.detect(x)))))
        return self.fc(self.dropout(self.pool(h).flatten(1)))


class PatchModel(nn.Module):
    """A linear model with two logits, the second 0; the first is the given weight map (zero off the
    relevant patch) summed against the image: the relevant pixels are known by construction."""

    def __init__(self, weight):
        super().__init__()
        self.fc = nn.Linear(weight.numel(), 2, bias=False)
        with torch.no_grad():
            self.fc.weight.zero_()
            self.fc.weight[0] = weight.flatten()

    def forward(self, x):
        return self.fc(x.flatten(1))




class PatchMeanModel(nn.Module):
    """Logits [mean of a size x size patch at (top, left), 0]: only the patch matters, and more of it is better."""

    def __init__(self, top=9, left=3, size=4):
        super().__init__()
        self.top, self.left, self.size = top, left, size

    def forward(self, x):
        patch = x[:, :, self.top:self.top + self.size, self.left:self.left + self.size].mean((1, 2, 3))
        return torch.stack([patch, torch.zeros_like(patch)], 1)


class RegionModel(nn.Module):
    """Class 1's logit is scale * (mean of channel 0 over rows x cols - offset); class 0's is 0."""

    def __init__(self, rows, cols, scale=20.0, offset=1.2):
        super().__init__()
        self.rows, self.cols, self.scale, self.offset = rows, cols, scale, offset

    def forward(self, x):
        r = x[:, 0, self.rows, self.cols].mean((1, 2))
        return torch.stack([torch.zeros_like(r), self.scale * (r - self.offset)], 1)


def sequential_cnn(seed=0, *, batchnorm=True, third_conv=False, pool=1, classes=5, act=nn.ReLU, inplace=False,
                   dtype=torch.float32) -> nn.Sequential:
    """conv(3->6) [BN] act conv(6->8) act [maxpool conv(8->8) act] avgpool(pool) flatten linear, in eval mode.

    Positions: with BN, "2" is the first activation and "6" the third conv (third_conv=True)."""
    torch.manual_seed(seed)
    kw = {"inplace": True} if inplace else {}
    layers = [nn.Conv2d(3, 6, 3, padding=1)] + ([nn.BatchNorm2d(6)] if batchnorm else [])
    layers += [act(**kw), nn.Conv2d(6, 8, 3, padding=1), act(**kw)]
    if third_conv:
        layers += [nn.MaxPool2d(2), nn.Conv2d(8, 8, 3, padding=1), act(**kw)]
    layers += [nn.AdaptiveAvgPool2d(pool), nn.Flatten(), nn.Linear(8 * pool * pool, classes)]
    return nn.Sequential(*layers).to(dtype).eval()


class BasicBlock(nn.Module):
    """torchvision's ResNet BasicBlock structure: conv-bn-relu-conv-bn, `out += identity` in place, relu."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels)

    def forward(self, x):
        identity = x
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        out += identity
        return self.relu(out)


class ResNetLike(nn.Module):
    """A two-block ResNet with torchvision's module names (conv1, bn1, relu, maxpool, layer1, avgpool, fc)."""

    def __init__(self, classes: int = 4, width: int = 6, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.conv1 = nn.Conv2d(3, width, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(2)
        self.layer1 = nn.Sequential(BasicBlock(width), BasicBlock(width))
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(width, classes)
        with torch.no_grad():
            for m in self.modules():
                if isinstance(m, nn.BatchNorm2d):
                    m.running_mean.uniform_(-0.3, 0.3)
                    m.running_var.uniform_(0.5, 2.0)
                    m.weight.uniform_(0.5, 1.5)
                    m.bias.uniform_(-0.2, 0.2)

    def forward(self, x):
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer1(x)
        return self.fc(torch.flatten(self.avgpool(x), 1))


class VGGLike(nn.Module):
    """torchvision's VGG structure (features / avgpool / classifier Sequentials), with batch norm."""

    def __init__(self, classes: int = 4, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        layers, cin = [], 3
        for v in (8, "M", 12, "M", 16, 16, "M"):
            if v == "M":
                layers.append(nn.MaxPool2d(2, 2))
            else:
                layers += [nn.Conv2d(cin, v, 3, padding=1), nn.BatchNorm2d(v), nn.ReLU(inplace=True)]
                cin = v
        self.features = nn.Sequential(*layers)
        self.avgpool = nn.AdaptiveAvgPool2d((2, 2))
        self.classifier = nn.Sequential(nn.Linear(16 * 4, 32), nn.ReLU(True), nn.Dropout(), nn.Linear(32, classes))

    def forward(self, x):
        x = self.avgpool(self.features(x))
        return self.classifier(torch.flatten(x, 1))


class SmoothToy(nn.Module):
    """conv - tanh - conv (stride 2) - softplus - average pool - linear; 2x6x6 inputs, 3 classes. Smooth (no
    kinks for finite differences to straddle): the network of the double-backprop tests."""

    def __init__(self, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.conv1 = nn.Conv2d(2, 3, 3, padding=1)
        self.act1 = nn.Tanh()
        self.conv2 = nn.Conv2d(3, 4, 3, stride=2, padding=1)
        self.act2 = nn.Softplus()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        return self.fc(self.pool(self.act2(self.conv2(self.act1(self.conv1(x))))).flatten(1))


def central_differences(f, weight: torch.Tensor, entries: int, *, seed: int | None = 3, eps: float = 1e-6):
    """(indices, d f / d weight at those flat indices by central differences): `entries` weights chosen
    at random (fixed by `seed`; seed=None: the first ones); f() -> a scalar, re-evaluated with each weight
    moved by +-eps."""
    index = (torch.arange(min(entries, weight.numel())) if seed is None
             else torch.randperm(weight.numel(), generator=torch.Generator().manual_seed(seed))[:entries])
    fd = torch.zeros(len(index), dtype=torch.float64)
    flat = weight.data.view(-1)
    for j, i in enumerate(index.tolist()):
        old = float(flat[i])
        flat[i] = old + eps
        plus = float(f())
        flat[i] = old - eps
        minus = float(f())
        flat[i] = old
        fd[j] = (plus - minus) / (2 * eps)
    return index, fd


def write_image_folder(root, n: int, *, classes: int | None = 2, broken: str | None = None, prefix: str = "img",
                       size: int = 32, seed: int = 0):
    """n random PNG images under root: in class subfolders `str(i % classes)` (flat with classes=None), plus
    an unreadable file named `broken` in the last class folder when given (folder-run tests)."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    for i in range(n):
        path = root / (str(i % classes) if classes else "") / f"{prefix}{i:02d}.png"
        path.parent.mkdir(exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(path)
    if broken:
        (root / (str(classes - 1) if classes else "") / broken).write_bytes(b"not a png")
    return root


def same_weights(a: nn.Module, b: nn.Module) -> bool:
    """The two modules hold equal state (parameters and buffers), key for key."""
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
