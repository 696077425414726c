"""An ImageNet-layout image folder (root/<class>/<image>), center-cropped the ADM way, for VAE encoding.

No torchvision: the folder is scanned with os and decoded with PIL. Classes are the sorted
sub-directory names (ImageNet's wnids sort into the standard class indices) and images the sorted
files with an image extension, so item i is the same file on every rank and every run.

Images come back as uint8 (N, 3, S, S), unflipped: the training loop flips per sample on the device
(`flip_where`) with randomness that depends only on the seed and step, as for pre-extracted latents.
"""

import os
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")


def center_crop_adm(image: Image.Image, size: int) -> Image.Image:
    """ADM's crop: halve with BOX while the short side is >= 2 * size, BICUBIC-resize the short side to
    `size`, then cut the central size x size square."""
    while min(image.size) >= 2 * size:
        image = image.resize(tuple(side // 2 for side in image.size), resample=Image.BOX)
    scale = size / min(image.size)
    image = image.resize(tuple(round(side * scale) for side in image.size), resample=Image.BICUBIC)
    width, height = image.size
    left, top = (width - size) // 2, (height - size) // 2
    return image.crop((left, top, left + size, top + size))


def to_uint8_tensor(image: Image.Image) -> torch.Tensor:
    """PIL RGB image -> (3, H, W) uint8."""
    return torch.from_numpy(np.asarray(image, dtype=np.uint8).copy()).permute(2, 0, 1)


def uint8_to_model_range(images: torch.Tensor) -> torch.Tensor:
    """(N, 3, H, W) uint8 -> float32 in [-1, 1], the VAE's input range."""
    return images.float() / 127.5 - 1.0


def flip_where(images: torch.Tensor, flip: torch.Tensor) -> torch.Tensor:
    """Mirror left-right the images (N, C, H, W) where flip (N,) is True."""
    return torch.where(flip.view(-1, 1, 1, 1), images.flip(-1), images)


def scan_image_folder(root: str | os.PathLike) -> tuple[list[str], list[tuple[Path, int]]]:
    """(class names, [(image path, class index)]) of an ImageNet-layout folder, both sorted."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(
            f"data path {str(root)!r} is not a directory; pass an ImageNet-layout folder (root/<class>/<image>)"
        )
    classes = sorted(entry.name for entry in os.scandir(root) if entry.is_dir())
    items = []
    for index, name in enumerate(classes):
        files = sorted(
            entry.name for entry in os.scandir(root / name)
            if entry.is_file() and entry.name.lower().endswith(IMAGE_EXTENSIONS)
        )  # fmt: skip
        items.extend((root / name / file, index) for file in files)
    if not items:
        raise FileNotFoundError(
            f"data path {str(root)!r} holds no images in class sub-directories "
            f"(extensions: {', '.join(IMAGE_EXTENSIONS)})"
        )
    return classes, items


class ImageFolder(Dataset):
    """Item i is ((3, S, S) uint8 ADM-center-cropped image, class index)."""

    def __init__(self, root: str | os.PathLike, image_size: int):
        self.root = Path(root)
        self.image_size = image_size
        self.classes, self.items = scan_image_folder(root)

    def __len__(self) -> int:
        return len(self.items)

    def load(self, index: int) -> torch.Tensor:
        path, _ = self.items[index]
        with Image.open(path) as image:
            return to_uint8_tensor(center_crop_adm(image.convert("RGB"), self.image_size))  # (3, S, S)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return self.load(index), self.items[index][1]

    def __getitems__(self, indices: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """DataLoader's batched fetch: one call per batch."""
        return self.get_batch(indices)

    def get_batch(self, indices: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """(images (N, 3, S, S) uint8, labels (N,) int64)."""
        images = torch.stack([self.load(index) for index in indices])
        labels = torch.tensor([self.items[index][1] for index in indices], dtype=torch.long)
        return images, labels
