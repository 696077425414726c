"""Pre-extracted VAE latents (written by `python -m dit_fast.extract`), read memory-mapped.

Layout of a latent directory:
  meta.json              image size, latent shape, number of images and shards, class names, VAE, scale
  shard-00000/           one complete shard (written as shard-00000.tmp/ and renamed when complete)
    moments.npy          (n, 2, 2, C, h, w) float16: [image, its mirror] x [posterior mean, posterior std],
                         in DiT latent units (the VAE posterior times 0.18215)
    labels.npy           (n,) int64 class indices
Item i lives in shard i // shard_size. Training draws z = mean + std * eps of the image or its mirror, a
fresh sample and flip every time, as online encoding with random flips would.
"""

import json
import os
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

META_FILE = "meta.json"
FORMAT = "dit_fast latent shards v1"
MOMENTS_FILE = "moments.npy"
LABELS_FILE = "labels.npy"
TMP_SUFFIX = ".tmp"


def shard_name(index: int) -> str:
    return f"shard-{index:05d}"


def read_meta(root: str | os.PathLike) -> dict:
    path = Path(root) / META_FILE
    if not path.is_file():
        raise FileNotFoundError(
            f"{str(root)!r} is not a latent directory (no {META_FILE}); make one with "
            f"`python -m dit_fast.extract --data-path <images> --out {root}`"
        )
    meta = json.loads(path.read_text())
    if meta.get("format") != FORMAT:
        raise ValueError(f"{str(path)!r} has format {meta.get('format')!r}; this reader knows {FORMAT!r}")
    return meta


def sample_posterior(moments: torch.Tensor, flip: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
    """moments (N, 2, 2, C, h, w), flip (N,) bool, eps (N, C, h, w) -> z = mean + std * eps of the chosen view."""
    chosen = moments[torch.arange(len(moments), device=moments.device), flip.long()].float()  # (N, 2, C, h, w)
    mean, std = chosen.unbind(1)  # (N, C, h, w) each
    return mean + std * eps


class LatentShards(Dataset):
    """Item i is ((2, 2, C, h, w) float16 moments, label); get_batch reads a batch shard by shard."""

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)
        self.meta = read_meta(root)
        self.shard_size = self.meta["shard_size"]
        self.num_images = self.meta["num_images"]
        missing = [
            shard_name(i) for i in range(self.meta["num_shards"])
            if not (self.root / shard_name(i) / MOMENTS_FILE).is_file()
        ]  # fmt: skip
        if missing:
            raise FileNotFoundError(
                f"latent directory {str(root)!r} lacks {len(missing)} of {self.meta['num_shards']} shards "
                f"({', '.join(missing[:3])}{', ...' if len(missing) > 3 else ''}); run the same "
                f"`python -m dit_fast.extract` again to finish it (complete shards are skipped)"
            )
        self._shards: dict[int, tuple[np.ndarray, np.ndarray]] = {}  # opened lazily, once per process

    @property
    def image_size(self) -> int:
        return self.meta["image_size"]

    @property
    def num_classes(self) -> int:
        return len(self.meta["classes"])

    def __len__(self) -> int:
        return self.num_images

    def shard(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        """(moments, labels) of one shard, memory-mapped."""
        if index not in self._shards:
            folder = self.root / shard_name(index)
            self._shards[index] = (
                np.load(folder / MOMENTS_FILE, mmap_mode="r"),
                np.load(folder / LABELS_FILE, mmap_mode="r"),
            )
        return self._shards[index]

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        moments, labels = self.get_batch([index])
        return moments[0], int(labels[0])

    def __getitems__(self, indices: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """DataLoader's batched fetch: one call per batch."""
        return self.get_batch(indices)

    def get_batch(self, indices: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """(moments (N, 2, 2, C, h, w) float16, labels (N,) int64) of items `indices`, in that order."""
        indices = np.asarray(indices, dtype=np.int64)
        if len(indices) and (indices.min() < 0 or indices.max() >= self.num_images):
            raise IndexError(f"latent indices must be in [0, {self.num_images}), got {indices.min()}..{indices.max()}")
        shape = (len(indices), 2, 2, *self.meta["latent_shape"])
        moments = np.empty(shape, dtype=np.float16)
        labels = np.empty(len(indices), dtype=np.int64)
        shard_of = indices // self.shard_size
        for shard_index in np.unique(shard_of):
            rows = np.nonzero(shard_of == shard_index)[0]
            offsets = indices[rows] - shard_index * self.shard_size
            order = np.argsort(offsets)  # sorted reads of the memory map
            shard_moments, shard_labels = self.shard(int(shard_index))
            moments[rows[order]] = shard_moments[offsets[order]]
            labels[rows[order]] = shard_labels[offsets[order]]
        return torch.from_numpy(moments), torch.from_numpy(labels)
