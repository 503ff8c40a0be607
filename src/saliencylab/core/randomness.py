"""Randomness keyed to the image, not to the batch.

Every random draw in saliencylab comes from a generator seeded by (seed, purpose, image key, draw
index). The image key is a caller-given image id (a file name, a dataset index) or, by default, the
image's position within the call. So an image's noise does not depend on which other images share its
batch, on `batch_size`, or on how a data set is split into shards: `explain(x)` equals the
concatenation of `explain(x[:k])` and `explain(x[k:])` when image ids are passed.

`purpose` separates independent streams (SmoothGrad's noise, a uniform baseline, ROAD's imputation
noise) so that two uses of the same seed never share numbers.

>>> rng = KeyedRandom(seed=0, purpose="smoothgrad", image_ids=["cat.jpg", "dog.jpg"])
>>> noise = rng.normal(images=torch.tensor([0, 0, 1]), draws=torch.tensor([0, 1, 0]), shape=(3, 8, 8))
"""

from __future__ import annotations

import hashlib
from typing import Sequence

import torch

ImageIds = Sequence  # of str or int; None = positions 0..B-1 within the call


def derive_seed(seed: int, purpose: str, image_key, draw: int) -> int:
    """A 63-bit seed from (seed, purpose, image key, draw): stable across runs, machines and devices."""
    text = f"{int(seed)}\x1f{purpose}\x1f{image_key!s}\x1f{int(draw)}".encode()
    return int.from_bytes(hashlib.blake2b(text, digest_size=8).digest(), "little") & ((1 << 63) - 1)


def image_keys(n: int, image_ids: ImageIds | None) -> list:
    """The key of each of `n` images: the caller's ids, or positions 0..n-1."""
    if image_ids is None:
        return list(range(n))
    ids = list(image_ids)
    if len(ids) != n:
        from .errors import InputError

        raise InputError(f"got {len(ids)} image ids for {n} images; give one id per image")
    return ids


class KeyedRandom:
    """Draws keyed by (seed, purpose, image key, draw index); see the module docstring.

    `images` and `draws` are (N,) integer tensors naming each row's image (an index into the call's
    images) and its draw index; rows may come in any order and in any chunking.
    """

    def __init__(self, seed: int, purpose: str, image_ids: ImageIds | None = None, n_images: int | None = None):
        self.seed = int(seed)
        self.purpose = str(purpose)
        self.keys = None if image_ids is None else list(image_ids)
        self.n_images = n_images

    def key(self, image: int):
        return image if self.keys is None else self.keys[image]

    def generator(self, image: int, draw: int, device="cpu") -> torch.Generator:
        g = torch.Generator(device=device)
        g.manual_seed(derive_seed(self.seed, self.purpose, self.key(int(image)), int(draw)))
        return g

    def _rows(self, sampler, images, draws, shape, device, dtype):
        images = torch.as_tensor(images).flatten().tolist()
        draws = torch.as_tensor(draws).flatten().tolist()
        if len(images) != len(draws):
            raise ValueError("images and draws must have the same length")
        # One generator per row: a row's numbers depend on its key only. Numbers are drawn as float32 on
        # the CPU, so they are the same whatever the device or the images' dtype (a CUDA generator yields
        # other numbers for the same seed), and written straight into the batch when it lives there.
        direct = torch.device(device or "cpu").type == "cpu" and dtype in (None, torch.float32)
        out = torch.empty((len(images),) + tuple(shape), dtype=torch.float32)
        for r, (i, d) in enumerate(zip(images, draws)):
            sampler(tuple(shape), self.generator(i, d), out[r])
        return out if direct else out.to(device=device, dtype=dtype)

    def normal(self, images, draws, shape, *, device="cpu", dtype=torch.float32) -> torch.Tensor:
        """(N, *shape) standard normal numbers, row r keyed by (images[r], draws[r])."""
        return self._rows(lambda s, g, o: torch.randn(s, generator=g, out=o), images, draws, shape, device, dtype)

    def uniform(self, images, draws, shape, *, device="cpu", dtype=torch.float32) -> torch.Tensor:
        """(N, *shape) uniform numbers in [0, 1), row r keyed by (images[r], draws[r])."""
        return self._rows(lambda s, g, o: torch.rand(s, generator=g, out=o), images, draws, shape, device, dtype)

    def permutation(self, image: int, draw: int, n: int, *, device="cpu") -> torch.Tensor:
        """A random permutation of range(n) keyed by (image, draw)."""
        return torch.randperm(n, generator=self.generator(image, draw)).to(device)

    def integers(self, images, draws, low: int, high: int, shape=(), *, device="cpu") -> torch.Tensor:
        """(N, *shape) integers in [low, high), row r keyed by (images[r], draws[r])."""
        images = torch.as_tensor(images).flatten().tolist()
        draws = torch.as_tensor(draws).flatten().tolist()
        rows = [torch.randint(low, high, tuple(shape), generator=self.generator(i, d)) for i, d in zip(images, draws)]
        return torch.stack(rows).to(device) if rows else torch.empty((0,) + tuple(shape), dtype=torch.long,
                                                                      device=device)

    def for_images(self, index) -> "KeyedRandom":
        """The same stream for a subset of the images (keys follow the images, not their positions)."""
        index = torch.as_tensor(index).flatten().tolist()
        keys = [self.key(i) for i in index]
        return KeyedRandom(self.seed, self.purpose, keys)
